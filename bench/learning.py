"""Learning at one budget: every sslab method and its lightly-built twin on Fashion-MNIST, k-NN and linear probe.

Why: a framework whose methods cannot be seen to learn is not trusted (issue 13). This script trains every
method at one equal budget, evaluates every encoder the same way, and puts sslab's numbers beside those of
the same method built from lightly's parts, and beside random init and raw pixels.

What runs, for each seed:

- **random init** and **raw pixels**: the default config's encoder untrained (built as train.py's
  ``final_eval.baselines`` builds it: ``build_method`` after seeding) and the flattened uint8 pixels
  (``sslab.evaluation.features.raw_pixels``).
- **sslab**: ``python train.py method=M`` (``pipeline=mae_wsp`` for MAE→WSP) as a subprocess with
  ``trainer.max_steps=--steps`` and Lightning's ``trainer.max_time`` = ``--budget-min``, so no run exceeds
  the budget; ``logger=[csv] callbacks=[] final_eval.baselines=false`` and no periodic checkpoints keep the
  run lean. The pipeline's two stages share the budget: S/2 steps and N/2 minutes each, its stages' own
  callback lists replaced by none (``pipeline.stages.I.params.overrides``). images/s = steps x batch /
  ``train_time_s`` of the run's ``metrics.json`` (the time of ``trainer.fit``: training only).
- **lightly twin** (DINO, iBOT, DINOv2, MAE, VICReg; ``bench/twins.py``): the same method from lightly 1.6.0's
  transform (per sample, in a DataLoader), heads, losses, masking, ``update_momentum`` and schedule
  functions, in a plain PyTorch loop in this process; same backbone (``build_backbone`` of the same composed
  config), data, batch, steps, wall-clock cap, lr, weight decay, schedules, temperatures and head sizes.
  images/s = steps x batch / time of the loop (views included, evaluation excluded).
- **evaluation**, the same for every encoder: ``sslab.runs.evaluate`` (what ``python eval.py ckpt=...
  eval=[knn,linear]`` runs) for sslab checkpoints, and its ``evaluate_model`` for the twins and the baselines:
  features of the deterministic eval view, cosine 20-NN (T 0.07) and the offline linear probe of
  ``conf/eval.yaml``, on the class-balanced 10k bank / 2k test split of the run's data config.

Prints one table (rows: random init, raw pixels, each method; columns: sslab k-NN, linear, img/s, then the
twin's), mean ± half the range over seeds when there are several, and the wall time; writes
``learning.json`` and ``learning.png`` under ``--out``. Training logs go to ``--out/logs``.

What the twins cannot match (lightly's components allow no closer mapping of sslab's method yaml):

- Views are made per sample on the CPU with torchvision/PIL (bicubic crops for the multi-crop and MAE
  transforms, bilinear for VICReg; PIL blur with radius = sigma; solarisation at 128 of 255), not batched
  on the device with kornia. Data order: a shuffled DataLoader, not sslab's step-indexed sampler. The
  DataLoader has ``data.num_workers`` workers (0 in the Fashion-MNIST config, as sslab's loader), so the
  views are made in the training process with the run's torch threads.
- DINO / iBOT / DINOv2: one blur sigma range for all crops (the global crops' 0.1-2.0 px x size / 224;
  sslab scales it per crop size, so local crops get half of it); exactly two global crops, solarisation on
  the second only; no DINOv2 transform (DINOTransform is used). lightly's examples call backbone and head
  once per crop, so with DINO's BatchNorm head (``use_bn_in_head``, the CPU default) its statistics are per
  crop, not over the crops of one resolution. The teacher temperature warms up per step (DINO/iBOT step it
  per epoch; equal when the warm-up is 0 epochs, the CPU default). The head's last layer is frozen for
  ``freeze_last_layer_epochs`` worth of steps through lightly's epoch-based ``cancel_last_layer_gradients``.
- iBOT: lightly's ``random_block_mask`` masks exactly ``masking.probability`` of the crops with ratios
  stratified over ``masking.ratio`` (DINOv2's collate; iBOT draws per crop), and ``IBOTPatchLoss`` updates
  the patch centre from the masked tokens only (DINOv2's rule; iBOT uses all patch tokens). The mask token
  starts at zero (sslab: normal, std 0.02).
- DINOv2: Sinkhorn-Knopp centering is not offered (the twin refuses ``centering=sinkhorn_knopp``).
- Schedules come from lightly's functions: ``cosine_warmup_schedule`` (warm-up (step + 1) / W, cosine ending
  at step S - 1), ``cosine_schedule`` for weight decay and teacher momentum; sslab's closed forms differ by
  a step at the ends of warm-up and run.
- Weight decay: lightly's split (none on norm layers and biases) for every twin; sslab follows each
  reference's rule (the same set for these ViTs, except DINOv2's name rule). DINOv2's layer-wise lr decay
  and patch-embedding lr multiplier, and per-tensor gradient clipping, have no lightly helper: the twin
  applies them with a few lines of its own (torch's ``clip_grad_norm_`` per tensor).
- MAE: lightly's MAE initialisation (xavier, fixed sin-cos table: the recipe sslab's MAE follows, with other
  draws and its own table layout); the crop's upper scale is fixed at 1.0 and the flip at p 0.5 (the config's
  values). DINO, iBOT, DINOv2 and VICReg twins start from the very weights of the sslab run's backbone
  (same builder, same seed). VICReg: the crop's
  upper scale is fixed at 1.0, PIL picks the blur kernel (sslab: 7 px), only ``views.crop=resized`` exists,
  and the expander's last Linear has a bias (sslab's has none).
- WSP, MAE→WSP and DiffMAE have no lightly counterpart: their twin columns stay empty.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from _common import CONF_DIR, ROOT, START, num_cores, print_markdown_table
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from sslab.build import build_datamodule, build_method
from sslab.checkpoint_io import read_checkpoint
from sslab.evaluation.features import raw_pixels
from sslab.runs.evaluate import evaluate, evaluate_model

METHODS = ("dino", "ibot", "dinov2", "mae", "diffmae", "vicreg", "wsp", "mae_wsp")
PIPELINES = ("mae_wsp",)  # run as python train.py pipeline=NAME
EVALS = ["knn", "linear"]
# --tiny: a smoke-test size (one ViT block, a 200 / 100 evaluation split, batch 16)
TINY = ["++backbone.depth=1", "data.eval_bank_size=200", "data.eval_test_size=100", "data.batch_size=16"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    p.add_argument("--budget-min", type=float, default=15.0, help="wall-clock cap per training run, minutes")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run (trainer.max_steps)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1 (mean ± spread reported)")
    p.add_argument("--no-twins", action="store_true", help="skip the lightly twins")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "learning")
    p.add_argument("--source", choices=["auto", "embedded", "full"], default="auto", help="data.source")
    p.add_argument("--backbone", default="vit_t6", help="backbone config for every run (default: vit_t6)")
    p.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="LEARNING_JSON",
        help="print one table from result files of runs made apart (e.g. one seed per process); trains nothing",
    )
    p.add_argument("--tiny", action="store_true", help="smoke-test size: " + " ".join(TINY))
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS") or num_cores()),
        help="torch threads of every run (OMP_NUM_THREADS of the training subprocesses)",
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = p.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.steps < 1 or args.budget_min <= 0 or not args.seeds:
        p.error("--steps >= 1, --budget-min > 0 and at least one seed are needed")
    return args


# -- configs -------------------------------------------------------------------------------------------
def common_overrides(args: argparse.Namespace, seed: int) -> list[str]:
    """What every run of this seed shares: backbone, data, seed, device, and the smoke-test size."""
    ov = [f"backbone={args.backbone}", f"data.source={args.source}", f"seed={seed}"]
    if args.device == "cpu":
        ov.append("trainer.accelerator=cpu")
    return ov + (TINY if args.tiny else [])


def compose_cfg(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


def max_time(seconds: float) -> str:
    """Lightning's ``DD:HH:MM:SS``."""
    s = max(1, int(seconds))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def pipeline_stage_overrides(name: str) -> list[str]:
    """Each stage's own overrides with its callback list replaced by none (evaluations inside fit would
    count as training time and cost minutes on the CPU)."""
    spec = OmegaConf.load(CONF_DIR / "pipeline" / f"{name}.yaml")
    out = []
    for i, stage in enumerate(spec.stages):
        own = [
            o for o in (stage.get("params") or {}).get("overrides", []) if not str(o).startswith("callbacks=")
        ]
        items = ",".join(f"'{o}'" for o in [*own, "callbacks=[]"])
        out.append(f"pipeline.stages.{i}.params.overrides=[{items}]")
    return out


def stage_names(method: str) -> list[str]:
    """A pipeline's stages (each in its own directory under the run's); [] for a single method."""
    if method not in PIPELINES:
        return []
    return [str(s.name) for s in OmegaConf.load(CONF_DIR / "pipeline" / f"{method}.yaml").stages]


def sslab_command(args: argparse.Namespace, method: str, seed: int, run_dir: Path) -> tuple[list[str], int]:
    """The train.py command line and the number of steps it asks for in all (a pipeline's stages share
    the budget: S / n steps and N / n minutes each)."""
    steps, budget_s = args.steps, args.budget_min * 60
    n = len(stage_names(method)) or 1
    if method in PIPELINES:
        steps, budget_s = max(1, steps // n), budget_s / n
        what = [f"pipeline={method}", *pipeline_stage_overrides(method)]
    else:
        what = [f"method={method}"]
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *what,
        *common_overrides(args, seed),
        f"trainer.max_steps={steps}",
        f"++trainer.max_time={max_time(budget_s)}",
        "logger=[csv]",
        "callbacks=[]",
        "final_eval.baselines=false",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=0",
        f"hydra.run.dir={run_dir}",
    ]
    return cmd, steps * n


# -- runs ----------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {msg}", file=sys.stderr, flush=True)


def quiet(fn, *a, **kw):
    """Run an sslab evaluation without its own table on stdout (this script prints one table)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **kw)


def eval_cfg(args: argparse.Namespace, ckpt: str = "none") -> DictConfig:
    return compose_cfg("eval", [f"ckpt={ckpt}", "eval=[knn,linear]", f"device={args.device}"])


def scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {"knn": float(metrics["eval/knn_top1"]), "linear": float(metrics["eval/linear_top1"])}


def run_sslab(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    """Train with train.py in a subprocess, then evaluate its last checkpoint as eval.py does."""
    run_dir = args.out / "runs" / f"{method}_s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed one
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd, requested = sslab_command(args, method, seed, run_dir)
    log_path = args.out / "logs" / f"{method}_s{seed}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "offline"}
    log(f"{method} seed {seed}: sslab training ({log_path})")
    with open(log_path, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise RuntimeError(f"train.py exited with {rc}; last lines of {log_path}:\n" + "\n".join(tail))
    stage_dirs = [run_dir / s for s in stage_names(method)] or [run_dir]
    stages = [json.loads((d / "metrics.json").read_text()) for d in stage_dirs]
    batch = int(compose_cfg("config", common_overrides(args, seed)).data.batch_size)
    steps = sum(int(s["global_step"]) for s in stages)
    train_s = sum(float(s["train_time_s"]) for s in stages)
    ckpt = stage_dirs[-1] / "checkpoints" / "last.ckpt"
    log(f"{method} seed {seed}: sslab evaluation")
    torch.set_num_threads(args.threads)
    metrics = quiet(evaluate, eval_cfg(args, str(ckpt)))
    own = random_init_scores(args, ckpt)
    return {
        **scores(metrics),
        "random_init_knn": own["knn"],
        "random_init_linear": own["linear"],
        "images_per_s": round(steps * batch / train_s, 2) if train_s > 0 else None,
        "steps": steps,
        "train_time_s": round(train_s, 1),
        "stopped_by_time": steps < requested,
        "ckpt": str(ckpt),
        "command": " ".join(cmd),
    }


def random_init_scores(args: argparse.Namespace, ckpt: Path) -> dict[str, float]:
    """The run's own encoder untrained (its method's initialisation, e.g. MAE's xavier + sin-cos), built
    from the checkpoint's config as train.py's baselines build theirs: the fair floor for that method."""
    run_cfg = OmegaConf.create(read_checkpoint(ckpt, "ckpt")["sslab_config"])
    dm = build_datamodule(run_cfg)
    torch.manual_seed(run_cfg.seed)
    model = build_method(run_cfg, dm).to(args.device)
    bank_loader, test_loader = dm.eval_dataloaders()
    device = torch.device(args.device)
    return scores(
        quiet(evaluate_model, eval_cfg(args), EVALS, model, dm, run_cfg, bank_loader, test_loader, device)
    )


def run_twin(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    from twins import train_twin

    cfg = compose_cfg("config", [f"method={method}", *common_overrides(args, seed)])
    dm = build_datamodule(cfg)
    dm.setup()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    log(f"{method} seed {seed}: lightly twin training")
    twin, stats = train_twin(cfg, dm.train_set.images, args.steps, args.budget_min * 60, device, seed)
    log(f"{method} seed {seed}: lightly twin evaluation")
    bank_loader, test_loader = dm.eval_dataloaders()
    metrics = quiet(evaluate_model, eval_cfg(args), EVALS, twin, dm, cfg, bank_loader, test_loader, device)
    return {**scores(metrics), **stats}


def run_baselines(args: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    """Random init (the default config's encoder, built as train.py's baselines build it) and raw pixels."""
    cfg = compose_cfg("config", common_overrides(args, seed))
    dm = build_datamodule(cfg)
    torch.manual_seed(cfg.seed)  # as sslab.runs.training.baseline_knn
    random_model = build_method(cfg, dm).to(args.device)
    bank_loader, test_loader = dm.eval_dataloaders()
    ecfg = eval_cfg(args)
    device = torch.device(args.device)
    log(f"seed {seed}: random init and raw pixels")
    rand = quiet(evaluate_model, ecfg, EVALS, random_model, dm, cfg, bank_loader, test_loader, device)
    pixels = SimpleNamespace(embed_uint8=raw_pixels, probe_batchnorm=False)
    raw = quiet(evaluate_model, ecfg, EVALS, pixels, dm, cfg, bank_loader, test_loader, device)
    return {"random init": scores(rand), "raw pixels": scores(raw)}


@dataclass
class Collected:
    """Every seed's results: baselines per seed, and per method the runs of each side (None = failed)."""

    baselines: list[dict[str, dict[str, float]]]
    sslab: dict[str, list[dict[str, Any] | None]]
    twins: dict[str, list[dict[str, Any] | None]]
    errors: list[str]
    walls: list[float]


# -- results -------------------------------------------------------------------------------------------
def summary(values: list[float | None]) -> dict[str, Any]:
    """Mean and spread (half the range: mean ± spread covers every seed) of the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "spread": None, "values": values}
    return {"mean": sum(xs) / len(xs), "spread": (max(xs) - min(xs)) / 2, "values": values}


def cell(s: dict[str, Any] | None, digits: int = 2) -> str:
    if not s or s["mean"] is None:
        return "-"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['spread']:.{digits}f}" if len(s["values"]) > 1 else "")


def side_summary(runs: list[dict[str, Any] | None], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: summary([r.get(k) if r else None for r in runs]) for k in keys}


def write_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {r["name"]: r for r in rows if r["kind"] == "baseline"}
    methods = [r for r in rows if r["kind"] == "method"]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(methods) + 4) * 1.6, 4.8))
    x = list(range(len(methods)))
    w = 0.38
    names = {"sslab": "sslab", "lightly": "lightly twin"}
    for ax, metric, label in zip(axes, EVALS, ["k-NN top-1 (%)", "linear probe top-1 (%)"], strict=True):
        for side, offset, color in (("sslab", -w / 2, "tab:blue"), ("lightly", w / 2, "tab:orange")):
            means = [(r[side] or {}).get(metric, {}).get("mean") for r in methods]
            errs = [(r[side] or {}).get(metric, {}).get("spread") or 0.0 for r in methods]
            ys = [m if m is not None else math.nan for m in means]
            yerr = errs if len(rows[0]["sslab"]["knn"]["values"]) > 1 else None
            ax.bar([i + offset for i in x], ys, w, yerr=yerr, capsize=3, color=color, label=names[side])
        for name, style in (("random init", "--"), ("raw pixels", ":")):
            mean = base.get(name, {}).get("sslab", {}).get(metric, {}).get("mean")
            if mean is not None:
                ax.axhline(mean, color="black", linestyle=style, linewidth=1, label=f"{name} {mean:.1f}")
        finite = [
            v
            for r in rows
            for side in ("sslab", "lightly")
            if r.get(side)
            for v in [r[side].get(metric, {}).get("mean")]
            if v is not None
        ]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
        ax.set_xticks(x, [r["name"] for r in methods], rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect(args: argparse.Namespace) -> Collected:
    """Train and evaluate every (seed, method, side); a failed run is recorded and the others go on."""
    from twins import TWINS

    got = Collected(
        baselines=[],
        sslab={m: [] for m in args.methods},
        twins={m: [] for m in args.methods if m in TWINS and not args.no_twins},
        errors=[],
        walls=[],
    )
    for seed in args.seeds:
        got.baselines.append(run_baselines(args, seed))
        for m in args.methods:  # sslab, then its twin: drifts of the machine's load hit both alike
            for side, runs, fn in (("sslab", got.sslab, run_sslab), ("lightly", got.twins, run_twin)):
                if m not in runs:
                    continue
                try:
                    runs[m].append(fn(args, m, seed))
                except Exception as e:  # one failed run must not lose the others: record it, go on
                    got.errors.append(f"{m} seed {seed} ({side}): {e}")
                    log(f"FAILED {got.errors[-1]}\n{traceback.format_exc()}")
                    runs[m].append(None)
    got.walls.append(time.perf_counter() - START)
    return got


# what must agree between result files for --combine to put them in one table
SAME_SETTINGS = ("steps", "budget_min", "source", "backbone", "tiny", "batch_size", "methods", "device")


def merge_results(args: argparse.Namespace, paths: list[Path]) -> Collected:
    """Seeds run apart (two machines, or two processes on one) as one table: per-seed values are read back
    from each ``learning.json`` (its rows keep every seed's value), so the spread is over all of them."""
    results = [json.loads(p.read_text()) for p in paths]
    first = results[0]
    for path, r in zip(paths, results, strict=True):
        differ = [k for k in SAME_SETTINGS if r.get(k) != first.get(k)]
        if differ:
            raise SystemExit(
                f"--combine: {path} differs from {paths[0]} in {', '.join(differ)}; combine runs of one setting"
            )
    for k in ("steps", "budget_min", "source", "backbone", "tiny", "threads", "device", "methods"):
        setattr(args, k, first[k])
    args.seeds = [s for r in results for s in r["seeds"]]
    args.no_twins = not first["twins"]
    got = Collected(baselines=[], sslab={}, twins={}, errors=[], walls=[])
    for r in results:
        rows = {row["name"]: row for row in r["rows"]}
        for i in range(len(r["seeds"])):
            got.baselines.append(
                {
                    name: {m: rows[name]["sslab"][m]["values"][i] for m in ("knn", "linear")}
                    for name in ("random init", "raw pixels")
                }
            )
        for m in r["methods"]:
            got.sslab.setdefault(m, []).extend(rows[m]["runs"]["sslab"])
            if rows[m]["lightly"]:
                got.twins.setdefault(m, []).extend(rows[m]["runs"]["lightly"])
        got.errors.extend(r["errors"])
        got.walls.append(float(r["wall_s"]))
    return got


def main() -> None:
    args = parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    got = merge_results(args, args.combine) if args.combine else collect(args)
    report(args, got)
    sys.exit(1 if got.errors else 0)


def report(args: argparse.Namespace, got: Collected) -> None:
    """Print the table and write ``learning.json`` and ``learning.png`` under ``--out``."""
    rows: list[dict[str, Any]] = []
    for name in ("random init", "raw pixels"):
        rows.append(
            {
                "name": name,
                "kind": "baseline",
                "sslab": side_summary([b[name] for b in got.baselines], ("knn", "linear")),
                "lightly": None,
            }
        )
    keys = ("knn", "linear", "images_per_s", "steps", "train_time_s")
    own_keys = ("random_init_knn", "random_init_linear")
    for m in args.methods:
        twin = got.twins.get(m)
        rows.append(
            {
                "name": m,
                "kind": "method",
                "sslab": side_summary(got.sslab[m], keys + own_keys),
                "lightly": side_summary(twin, keys) if twin else None,
                "runs": {"sslab": got.sslab[m], "lightly": twin or []},
            }
        )
    cfg = compose_cfg("config", common_overrides(args, args.seeds[0]))
    batch, n_train = int(cfg.data.batch_size), None
    with contextlib.suppress(Exception):
        dm = build_datamodule(cfg)
        dm.setup()
        n_train = len(dm.train_set)
    title = (
        f"Fashion-MNIST ({args.source}, {n_train} train images), {args.backbone}"
        f"{' (tiny)' if args.tiny else ''}, {args.steps} steps x {batch} or {args.budget_min:g} min per run, "
        f"seeds {','.join(map(str, args.seeds))}, {args.threads} thread(s), {args.device}"
    )
    print(f"\n{title}\n")
    headers = [
        "encoder",
        "sslab k-NN",
        "sslab linear",
        "sslab img/s",
        "lightly k-NN",
        "lightly linear",
        "lightly img/s",
    ]
    table = []
    for r in rows:
        s, t = r["sslab"], r["lightly"]
        table.append(
            [
                r["name"],
                cell(s.get("knn")),
                cell(s.get("linear")),
                cell(s.get("images_per_s"), 0),
                cell(t and t.get("knn")),
                cell(t and t.get("linear")),
                cell(t and t.get("images_per_s"), 0),
            ]
        )
    print_markdown_table(headers, table)
    own = [f"{r['name']} {cell(r['sslab']['random_init_knn'])}" for r in rows if r["kind"] == "method"]
    print(
        f"\neach method's own encoder at random init (k-NN; MAE's init differs from the rows above): {', '.join(own)}"
    )
    wall = max(got.walls)  # combined seeds ran side by side: the longest is the wall time
    walls = ", ".join(f"{int(w // 60)} min {w % 60:.0f} s" for w in got.walls)
    print(f"\nwall time of the whole run: {walls}" + (" (one per combined file)" if args.combine else ""))
    if got.errors:
        print("failed runs:\n  " + "\n  ".join(e.splitlines()[0] for e in got.errors))

    import lightly

    result = {
        "bench": "learning",
        "title": title,
        "methods": args.methods,
        "seeds": args.seeds,
        "steps": args.steps,
        "budget_min": args.budget_min,
        "source": args.source,
        "train_images": n_train,
        "batch_size": batch,
        "backbone": args.backbone,
        "tiny": args.tiny,
        "twins": not args.no_twins,
        "spread": "half the range over seeds (mean ± spread covers every seed)",
        "rows": rows,
        "errors": got.errors,
        "wall_s": round(wall, 1),
        "threads": args.threads,
        "device": args.device,
        "torch": torch.__version__,
        "lightly": lightly.__version__,
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "combined_from": [str(p) for p in args.combine or []],
    }
    (args.out / "learning.json").write_text(json.dumps(result, indent=2))
    write_plot(rows, args.out / "learning.png", title)
    print(f"wrote {args.out / 'learning.json'} and {args.out / 'learning.png'}")


if __name__ == "__main__":
    main()
