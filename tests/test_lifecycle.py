"""Run lifecycles that behave as typed (issue 18): which step limit applies, resume=auto in place with the same
W&B run, resume_schedules=extend, pipeline resume hints, eval.py's metrics.json and overrides without "+",
--help and --cfg job --resolve, progress lines when stdout is not a terminal, the W&B summary."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sslab.cli import open_overrides
from sslab.modules.schedules import CosineSchedule, ExtendedCosineSchedule, extend_cosine
from sslab.progress_lines import Phase, track
from tests.conftest import ROOT, TINY
from tests.wandb_file import records

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "SSLAB_PROGRESS_SECONDS": "0"}


def run(script: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """A real process with stdout piped (not a terminal), as in a job log."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


# -- fast: no training ---------------------------------------------------------------------------------
def test_help_opens_with_what_sslab_is(tmp_path):
    r = run("train.py", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()
    assert head[0].startswith("sslab: self-supervised pretraining")
    text = "\n".join(head[:30])
    assert "method=" in text and "backbone=" in text and "data=" in text
    assert text.count("python train.py") >= 3


def test_cfg_job_resolve_needs_no_build_import(tmp_path):
    r = run("train.py", "--cfg", "job", "--resolve", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "precision: 32-true" in r.stdout or "precision: bf16-mixed" in r.stdout


def test_trainer_and_data_overrides_need_no_plus():
    assert open_overrides(
        ["trainer.gradient_clip_val=1", "trainer.max_steps=5", "trainer=ddp"],
        ["trainer"],
        {"trainer.max_steps"},
    ) == ["++trainer.gradient_clip_val=1", "trainer.max_steps=5", "trainer=ddp"]
    assert open_overrides(["data.eval_bank_size=100", "+data.x=1", "ckpt=a.ckpt"], ["data"]) == [
        "++data.eval_bank_size=100",
        "+data.x=1",
        "ckpt=a.ckpt",
    ]


def test_misspelt_trainer_option_is_one_line(tmp_path):
    r = run("train.py", *TINY, "trainer.max_stepz=3", f"paths.output_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 1
    assert "error: trainer.max_stepz is not an option of pytorch_lightning.Trainer" in r.stderr
    assert "Traceback" not in r.stderr


def test_startup_noise_is_silenced(tiny_cfg, capsys):
    from sslab.cli import fit_workers, quiet_startup

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_startup()
        warnings.warn(
            "The `srun` command is available on your system but is not used. HINT: ...", stacklevel=1
        )
    assert not caught
    assert logging.getLogger("faiss.loader").getEffectiveLevel() == logging.WARNING
    tip = logging.LogRecord("x", logging.INFO, "", 0, "Tip: try installing [litlogger](...)", None, None)
    assert not logging.getLogger("pytorch_lightning.utilities.rank_zero").filter(tip)
    cfg = tiny_cfg("data.num_workers=4096")
    fit_workers(cfg)  # more workers than cores: torch's warning (twice) becomes one line of ours
    assert 1 <= cfg.data.num_workers < 4096 and "data.num_workers=4096 >" in capsys.readouterr().out


def test_step_limit_epochs_win_when_typed(tiny_cfg):
    from sslab.runs.training import step_limit

    cfg = tiny_cfg("trainer.max_epochs=3")
    assert step_limit(cfg, ["trainer.max_epochs=3"]) == (
        "training limit: 3 epochs (trainer.max_epochs; trainer.max_steps=-1)"
    )
    assert cfg.trainer.max_steps == -1
    cfg = tiny_cfg("trainer.max_epochs=3", "trainer.max_steps=50")
    line = step_limit(cfg, ["trainer.max_epochs=3", "trainer.max_steps=50"])
    assert cfg.trainer.max_steps == 50 and "50 steps or 3 epochs, whichever comes first" in line
    cfg = tiny_cfg()
    assert step_limit(cfg, []) == "training limit: 1000 steps (trainer.max_steps)"


def test_extended_cosine_is_continuous_and_ends_at_the_new_end():
    old = CosineSchedule(1.0, 0.01, 3000, 100)
    new = extend_cosine(old, 1500, 6000)
    assert isinstance(new, ExtendedCosineSchedule)
    assert new(1500) == pytest.approx(old(1500), abs=1e-12)
    assert new(1000) == pytest.approx(old(1000), abs=1e-12)  # the past is unchanged
    assert new(6000) == pytest.approx(0.01) and new(3000) > old(3000)
    assert abs(new(1501) - new(1500)) < 1e-3  # no jump
    twice = extend_cosine(new, 4000, 9000)
    assert twice(4000) == pytest.approx(new(4000)) and twice(2000) == pytest.approx(new(2000))
    assert extend_cosine(old, 50, 6000) == CosineSchedule(1.0, 0.01, 6000, 100)  # in the warm-up
    assert ExtendedCosineSchedule(**new.state_dict()) == new  # round-trips through a checkpoint


def test_phase_prints_start_periodic_and_end_lines(capsys):
    with Phase("probe", 4, "epochs", plain=True, interval=0) as phase:
        for _ in range(4):
            phase.advance()
    list(track(range(3), "features", plain=True, interval=0))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "probe: 4 epochs"
    assert "probe: 2/4 epochs (50%)" in out[2] and "eta" in out[2]
    assert out[5].startswith("probe: done in")
    assert out[6] == "features: 3 batches" and out[-1].startswith("features: done in")


def test_pipeline_resume_hint_names_the_pipeline_directory(tmp_path, capsys):
    from sslab.callbacks.preemption import Preempted
    from sslab.runs.pipeline import continue_hint, warn_ignored_overrides

    stage, pipe = tmp_path / "p" / "mae", tmp_path / "p"
    with pytest.raises(Preempted) as info, continue_hint(stage, pipe, "mae_wsp"):
        logging.getLogger("sslab.callbacks.preemption").warning("SIGTERM; continue with resume=%s", "x")
        raise Preempted(f"SIGTERM at step 3: wrote X; not requeued; continue with resume={stage}", False)
    assert str(info.value).endswith(f"continue with pipeline=mae_wsp resume={pipe}")
    warn_ignored_overrides(["trainer.max_steps=9", "seed=1"], ["seed=1"], pipe)
    err = capsys.readouterr().err
    assert "trainer.max_steps=9 is ignored" in err and "seed=1 is ignored" not in err


# -- real runs ------------------------------------------------------------------------------------------
def test_max_epochs_alone_trains_by_epochs(tmp_path):
    r = run(
        "train.py",
        *TINY,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",  # a Lightning option without "+"
        f"paths.output_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training limit: 1 epochs (trainer.max_epochs; trainer.max_steps=-1)" in r.stdout
    assert last_json(r.stdout)["global_step"] == 3


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A 4-step run with W&B and the baselines, stdout piped."""
    out = tmp_path_factory.mktemp("lifecycle") / "out"
    args = [t for t in TINY if not t.startswith(("logger=", "final_eval."))]
    r = run(
        "train.py",
        *args,
        "logger=[csv,wandb]",
        "final_eval.baselines=true",
        "method.warmup_epochs=0",
        "trainer.max_steps=4",
        f"paths.output_dir={out}",
        cwd=out.parent,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r, last_json(r.stdout)


def wandb_run(run_dir: Path) -> tuple[list[Path], dict]:
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    info: dict = {"summary": {}}
    for f in files:
        for r in records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                info["id"], info["name"] = r.run.run_id, r.run.display_name
            elif kind == "summary":
                for item in r.summary.update:
                    info["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return files, info


def test_run_prints_its_phases_and_times(first_run):
    _, r, metrics = first_run
    out = r.stdout
    for line in ("run directory:", "training limit: 4 steps", "end-of-run evaluation at step 4: k-NN"):
        assert line in out
    assert "baseline k-NN, random init: " in out and "baseline k-NN, raw pixels: done in" in out
    # training and evaluation times apart, as printed and as stored (their values are not asserted)
    assert re.search(r"^4 steps in \d+ s; evaluation \d+ s$", out, re.MULTILINE)
    assert metrics["train_time_s"] >= 0 and metrics["eval_time_s"] >= 0
    noise = r.stdout + r.stderr
    for unwanted in ("faiss.loader", "litlogger", "anonymous setting", "srun", "not writable"):
        assert unwanted not in noise, unwanted


def test_wandb_summary_holds_baselines_and_times(first_run):
    _, _, metrics = first_run
    files, info = wandb_run(Path(metrics["run_dir"]))
    assert len(files) == 1
    assert info["name"] == "dino-vit_t-fashion_mnist"
    summary = info["summary"]
    assert summary["baseline/random_init_knn_top1"] == pytest.approx(metrics["baseline/random_init_knn_top1"])
    assert summary["baseline/raw_pixels_knn_top1"] == pytest.approx(metrics["baseline/raw_pixels_knn_top1"])
    assert summary["train_time_s"] == metrics["train_time_s"] and "eval_time_s" in summary


def test_eval_writes_metrics_json_and_takes_data_without_plus(first_run, tmp_path):
    _, _, metrics = first_run
    ckpt = Path(metrics["run_dir"]) / "checkpoints" / "last.ckpt"
    env_dir = tmp_path / "evals"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            f"ckpt={ckpt}",
            "eval=knn",
            "data.eval_bank_size=150",
            "data.eval_test_size=50",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "SSLAB_EVAL_DIR": str(env_dir)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "features (bank, test): " in r.stdout and "k-NN (k=20) on 150 bank / 50 test features" in r.stdout
    (folder,) = list(env_dir.iterdir())
    assert (folder / "eval.log").is_file()
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["eval/knn_top1"] == pytest.approx(last_json(r.stdout)["eval/knn_top1"])
    bad = run("eval.py", f"ckpt={ckpt}", "data.eval_bank_sise=5", cwd=tmp_path)
    assert bad.returncode == 1 and "data.eval_bank_sise is not a field" in bad.stderr


def test_resume_auto_continues_in_place_and_extends_schedules(first_run):
    out, _, metrics = first_run
    run_dir = Path(metrics["run_dir"])
    _, before = wandb_run(run_dir)
    old_lr = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["sslab_schedules"]["lr"]
    r = run(
        "train.py",
        *[t for t in TINY if not t.startswith("logger=")],
        "resume=auto",
        "resume_schedules=extend",
        "method.warmup_epochs=0",
        "trainer.max_steps=8",
        "logger=[csv,wandb]",
        f"paths.output_dir={out}",
        cwd=out.parent,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = last_json(r.stdout)
    assert f"resume=auto: continuing {run_dir} from step 4" in r.stdout
    assert resumed["run_dir"] == str(run_dir) and resumed["global_step"] == 8
    assert len(list(out.glob("*/*/checkpoints"))) == 1  # no new run directory
    assert (run_dir / ".sslab.lock").is_file() and list((run_dir / ".hydra").glob("launch-*"))
    files, after = wandb_run(run_dir)
    assert len(files) == 2 and after["id"] == before["id"]  # the same W&B run, continued
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    kind, state = ckpt["sslab_schedules"]["lr"]
    assert kind == "ExtendedCosineSchedule" and state["total_steps"] == 8
    old = CosineSchedule(**old_lr[1])
    new = ExtendedCosineSchedule(**state)
    assert new(4) == pytest.approx(old(4)) and new(8) == pytest.approx(old.final)


def test_slurm_sweep_without_a_reachable_controller_is_one_line(tmp_path):
    """README's `-m hydra/launcher=slurm` on a machine where no SLURM controller answers: one line, not
    submitit's traceback, and nothing written. With Debian's SLURM installed (make test) `scontrol ping` is
    asked against a configuration that does not exist; without it, the missing sbatch is named."""
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "no-such-slurm.conf")}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "hydra/launcher=slurm",
            f"paths.output_dir={tmp_path}/o",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "hydra/launcher=slurm" in lines[0]
    assert ("not reachable" in lines[0]) or ("sbatch is not installed" in lines[0])
    assert not (tmp_path / "o").exists()
