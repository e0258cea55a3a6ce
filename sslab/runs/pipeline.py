"""Multi-stage recipes (``python train.py pipeline=mae_wsp``): stages run in order, each in its own directory.

A pipeline config lists stages; each has a ``kind`` (a function in ``STAGE_KINDS``), ``params`` and
``inputs`` that name earlier stages' outputs (``mae.ckpt``, ``maskcut.json``). A stage that finished wrote
``stage.json`` (its outputs, atomically), so a stopped pipeline rerun with ``resume=<pipeline dir>`` (or
``resume=auto``) skips finished stages and resumes the unfinished one from its own last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from sslab.errors import SSLabError
from sslab.runs.cutler import detector_stage, maskcut_stage, self_train_stage

log = logging.getLogger(__name__)
STAGE_FILE = "stage.json"
PIPELINE_FILE = "pipeline.json"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


# -- stage kinds ---------------------------------------------------------------------------------------
def train_stage(stage_dir: Path, overrides: list[str], params: dict[str, Any], **inputs: str) -> dict:
    """One ``train.py`` run composed from the pipeline's overrides plus the stage's own; ``init_from``
    (an earlier stage's checkpoint) initialises its backbone. Resumes from its own last.ckpt if present."""
    from sslab.runs.training import train

    if params.get("ckpt"):  # a given checkpoint stands in for this stage (e.g. pipeline.dino_ckpt=PATH)
        if not Path(params["ckpt"]).is_file():
            raise SSLabError(f"{params['ckpt']}: no such checkpoint; pass a .ckpt written by train.py")
        return {"ckpt": str(params["ckpt"]), "metrics": {}}
    stage_overrides = [*overrides, *params.get("overrides", [])]
    if "init_from" in inputs:
        stage_overrides.append(f"init_from={inputs['init_from']}")
    cfg = compose(config_name="config", overrides=stage_overrides)
    last = stage_dir / "checkpoints" / "last.ckpt"
    with open_dict(cfg):
        cfg.run_dir = str(stage_dir)
        cfg.resume = str(last) if last.is_file() else None
        cfg.pipeline = None
        wandb = (cfg.get("logger") or {}).get("wandb")
        if wandb is not None:  # one W&B group per pipeline, the stage as the job type
            wandb.group = wandb.group or str(stage_dir.parent)[-128:]
            wandb.job_type = wandb.job_type or stage_dir.name
    metrics = train(cfg, overrides=stage_overrides)
    return {"ckpt": str(last), "metrics": _scalars(metrics)}


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


# every stage kind a pipeline config may name (the CutLER ones: sslab.runs.cutler)
STAGE_KINDS: dict[str, Callable[..., dict]] = {
    "train": train_stage,
    "maskcut": maskcut_stage,
    "detector": detector_stage,
    "self_train": self_train_stage,
}


# -- the runner ----------------------------------------------------------------------------------------
def user_overrides() -> list[str]:
    """The command line's overrides that apply to every stage (all but pipeline and resume)."""
    if not HydraConfig.initialized():
        return []
    skip = ("pipeline", "+pipeline", "resume", "hydra.")
    return [o for o in HydraConfig.get().overrides.task if not o.split("=", 1)[0].startswith(skip)]


def find_pipeline_dir(resume: str, output_dir: str | Path, name: str) -> Path:
    """``auto``: the newest directory under output_dir holding this pipeline's pipeline.json; or a path."""
    if resume == "auto":
        found = [
            p.parent
            for p in Path(output_dir).glob(f"**/{PIPELINE_FILE}")
            if json.loads(p.read_text()).get("name") == name
        ]
        if not found:
            raise SSLabError(
                f"resume=auto found no pipeline={name} under {output_dir}; start it without resume"
            )
        return max(found, key=lambda d: (d / PIPELINE_FILE).stat().st_mtime)
    path = Path(resume).expanduser()
    if not (path / PIPELINE_FILE).is_file():
        raise SSLabError(f"resume={resume}: no {PIPELINE_FILE} there; pass the pipeline's directory")
    return path


def warn_ignored_overrides(given: list[str], recorded: list[str], pipeline_dir: Path) -> None:
    """A resumed pipeline runs with the overrides it started with (its stages must agree with each other);
    say so once for each new override the command line gives, naming it."""
    for override in given:
        if override not in recorded:
            message = (
                f"pipeline resume: {override} is ignored; the stages keep the overrides the pipeline started "
                f"with ({PIPELINE_FILE} in {pipeline_dir}: {' '.join(recorded) or 'none'}); start a new "
                "pipeline to change them"
            )
            log.warning(message)
            print(f"warning: {message}", file=sys.stderr, flush=True)


class _PipelineHint(logging.Filter):
    """Rewrites a stage's ``continue with resume=<stage dir>`` (the checkpoint's run) into the command that
    continues the pipeline, in log records emitted while the stage runs."""

    def __init__(self, old: str, new: str) -> None:
        super().__init__()
        self.old, self.new = old, new

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and self.old in record.msg:
            record.msg = record.msg.replace(self.old, self.new)
        return True


@contextlib.contextmanager
def continue_hint(stage_dir: Path, pipeline_dir: Path, name: str):
    """A stage stopped by a signal names its own directory to resume, which is not how a pipeline
    continues: point at the pipeline directory instead (``pipeline=NAME resume=<pipeline dir>``)."""
    from sslab.callbacks.preemption import Preempted

    old, new = f"resume={stage_dir}", f"pipeline={name} resume={pipeline_dir}"
    hint = _PipelineHint(old, new)
    logger = logging.getLogger("sslab.callbacks.preemption")
    logger.addFilter(hint)
    try:
        yield
    except Preempted as e:
        raise Preempted(str(e).replace(old, new), e.requeued) from None
    finally:
        logger.removeFilter(hint)


def resolve_inputs(inputs: dict[str, str], done: dict[str, dict]) -> dict[str, str]:
    """``{"init_from": "mae.ckpt"}`` -> the path stage ``mae`` reported as its ``ckpt`` output."""
    resolved = {}
    for key, ref in inputs.items():
        stage, _, output = str(ref).partition(".")
        if stage not in done or output not in done[stage]:
            raise SSLabError(f"pipeline input {key}={ref}: stage {stage!r} has no output {output!r}")
        resolved[key] = done[stage][output]
    return resolved


def run_pipeline(cfg: DictConfig, pipeline_dir: Path) -> dict[str, dict]:
    """Run every stage not yet finished; returns each stage's outputs by name."""
    spec = cfg.pipeline
    stages = OmegaConf.to_container(spec.stages, resolve=True)
    names = [s["name"] for s in stages]
    if len(set(names)) != len(names):
        raise SSLabError(f"pipeline={spec.name}: stage names must be unique, got {names}")
    unknown = [s["kind"] for s in stages if s["kind"] not in STAGE_KINDS]
    if unknown:
        raise SSLabError(
            f"pipeline={spec.name}: unknown stage kind {unknown}; choose from {sorted(STAGE_KINDS)}"
        )

    pipeline_dir.mkdir(parents=True, exist_ok=True)
    record = pipeline_dir / PIPELINE_FILE
    if record.is_file():  # resumed: the stages see the overrides the pipeline started with
        overrides = json.loads(record.read_text())["overrides"]
        warn_ignored_overrides(user_overrides(), overrides, pipeline_dir)
    else:
        overrides = [*spec.get("overrides", []), *user_overrides()]
        write_json_atomic(record, {"name": spec.name, "overrides": overrides, "stages": names})

    done: dict[str, dict] = {}
    for stage in stages:
        stage_dir = pipeline_dir / stage["name"]
        marker = stage_dir / STAGE_FILE
        if marker.is_file():
            done[stage["name"]] = json.loads(marker.read_text())
            print(f"pipeline {spec.name}: stage {stage['name']} already done, skipped")
            continue
        stage_dir.mkdir(parents=True, exist_ok=True)
        print(f"pipeline {spec.name}: stage {stage['name']} ({stage['kind']}) -> {stage_dir}")
        inputs = resolve_inputs(stage.get("inputs") or {}, done)
        with continue_hint(stage_dir, pipeline_dir, spec.name):
            outputs = STAGE_KINDS[stage["kind"]](stage_dir, overrides, stage.get("params") or {}, **inputs)
        write_json_atomic(marker, outputs)
        done[stage["name"]] = outputs
    return done


def pipeline_main(cfg: DictConfig) -> dict[str, dict]:
    """``python train.py pipeline=NAME [resume=DIR|auto]``: run (or continue) a pipeline, print its stages."""
    from sslab.report import print_table
    from sslab.runs.training import run_dir_of

    name = cfg.pipeline.name
    if cfg.get("resume"):
        pipeline_dir = find_pipeline_dir(str(cfg.resume), cfg.paths.output_dir, name)
    else:
        pipeline_dir = run_dir_of(cfg)
    done = run_pipeline(cfg, pipeline_dir)
    columns = list(cfg.pipeline.get("report") or [])
    label = {c: c.rsplit("/", 1)[-1] for c in columns}  # eval/knn_top1 -> knn_top1
    rows = {
        stage: {label[c]: outputs["metrics"][c] for c in columns if c in outputs.get("metrics", {})}
        for stage, outputs in done.items()
    }
    rows = {stage: values for stage, values in rows.items() if values}  # stages that report something
    if rows:
        print_table(f"pipeline {name}", rows, list(label.values()))
    print(f"pipeline directory: {pipeline_dir}")
    return done
