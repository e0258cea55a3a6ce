"""DDP scaling on CPU: DINO training throughput (images/s) of 1 process vs 2 gloo processes.

Each variant is the real command a user types (``python train.py ...``, the Lightning Trainer, our DataModule
shards, kornia views, the DINO step, DDP's gradient all-reduce, the center all-reduce, AdamW, EMA), with the
same global batch, and is read from the ``train/images_per_sec`` the Throughput callback logs (global images
per second of wall time between steps, so start-up and evaluation are excluded; the first ``--skip`` steps
are dropped as warm-up). Variants:

- ``1 proc x 1 thread``, global batch G: the per-core baseline;
- ``1 proc x 2 threads``, batch G: the same 2 cores used by intra-op threading;
- ``2 procs x 1 thread`` (``trainer=ddp trainer.devices=2``), per-rank batch G/2: the same 2 cores used by DDP.

Why 2 x 1 against 1 x 2: the machine has 2 cores, so "2 processes vs 1 process" is only fair when both use
both cores; comparing 2 processes with one single-threaded process would credit DDP with the second core.
Scaling efficiency (the usual definition) = throughput(2 procs) / (2 x throughput(1 proc x 1 thread));
the practical figure is DDP / (1 proc x 2 threads). Variants run one after another, in rotating order over
``--reps`` rounds; the median per variant is reported.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, num_cores, print_json, print_markdown_table, warn_if_busy

VARIANTS = {  # name: (processes, threads per process)
    "1 proc x 1 thread": (1, 1),
    "1 proc x 2 threads": (1, 2),
    "2 procs x 1 thread (DDP, gloo)": (2, 1),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (per rank: batch / processes)")
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--skip", type=int, default=15, help="steps dropped as warm-up")
    p.add_argument("--reps", type=int, default=1, help="rounds over all variants")
    p.add_argument("--backbone", default="vit_t6")
    return p.parse_args()


def run_variant(procs: int, threads: int, args: argparse.Namespace, out: Path) -> float:
    """Median logged images/s after warm-up for one ``python train.py`` run."""
    cmd = [
        sys.executable,
        "train.py",
        f"backbone={args.backbone}",
        "data.source=embedded",
        f"data.batch_size={args.batch_size // procs}",
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        "logger=[csv]",
        "callbacks=[throughput]",
        "final_eval.baselines=false",
        "checkpoint.every_n_steps=0",
        f"paths.output_dir={out}",
    ]
    if procs > 1:
        cmd += ["trainer=ddp", f"trainer.devices={procs}"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "WANDB_MODE": "disabled",
    }
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    (metrics,) = out.glob("**/csv/metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/images_per_sec")]
    values = [float(r["train/images_per_sec"]) for r in rows if int(r["step"]) >= args.skip]
    if not values:
        raise SystemExit(f"no train/images_per_sec after step {args.skip} in {metrics}")
    return statistics.median(values)


def main() -> None:
    args = parse_args()
    if num_cores() < 2:
        print("warning: fewer than 2 cores; the 2-process variant shares one core", file=sys.stderr)
    warn_if_busy()
    names = list(VARIANTS)
    results: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.reps):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                out = Path(tmp) / f"{r}-{names.index(name)}"
                results[name].append(run_variant(*VARIANTS[name], args, out))
    ips = {n: statistics.median(v) for n, v in results.items()}
    base1, base2, ddp = (ips[n] for n in names)
    efficiency = ddp / (2 * base1)
    rows = [
        [
            n,
            f"{ips[n]:.1f}",
            f"{VARIANTS[n][0]} x {args.batch_size // VARIANTS[n][0]}",
            f"{ips[n] / base2:.2f}x",
        ]
        for n in names
    ]
    print_markdown_table(["variant", "images/s", "procs x batch", "vs 1 proc x 2 threads"], rows)
    print(f"scaling efficiency (2 procs vs 2 x 1 proc x 1 thread): {efficiency:.2f}")
    print_json(
        {
            "benchmark": "ddp_scaling",
            "backbone": args.backbone,
            "global_batch": args.batch_size,
            "steps": args.steps,
            "images_per_sec": {n: round(v, 1) for n, v in ips.items()},
            "scaling_efficiency": round(efficiency, 3),
            "ddp_vs_threads": round(ddp / base2, 3),
            "load_avg_1min": round(os.getloadavg()[0], 2),
        }
    )


if __name__ == "__main__":
    main()
