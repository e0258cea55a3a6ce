"""Helpers shared by the benchmark scripts: device and thread set-up, interleaved timing, output."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

START = time.perf_counter()  # this module is imported first: wall time of the whole script from here
ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# `python bench/x.py` puts bench/, not the repo root, on sys.path; make `import sslab` work even when the
# package is not (or not correctly) pip-installed. The scripts import this module before sslab.
if importlib.util.find_spec("sslab") is None:
    sys.path.insert(0, str(ROOT))


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def add_common_args(
    parser: argparse.ArgumentParser, warmup: int, reps: int, per_sample_baseline: bool = False
) -> None:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    parser.add_argument(
        "--threads", type=int, default=num_cores(), help="torch intra-op threads (default: all cores)"
    )
    if per_sample_baseline:
        parser.add_argument(
            "--worker-threads",
            type=int,
            default=1,
            help="torch threads while per-sample (DataLoader-style) transforms run; DataLoader workers use 1",
        )
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions per side first")
    parser.add_argument("--reps", type=int, default=reps, help="timed repetitions per side (median reported)")
    parser.add_argument("--seed", type=int, default=0)


def setup(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    torch.manual_seed(getattr(args, "seed", 0))
    warn_if_busy()
    return torch.device(args.device)


def warn_if_busy() -> None:
    """Other processes on the CPU make every timing here unreliable, most of all with several torch threads
    per process (a thread that waits for a core stalls the others at each parallel region)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    if load > 0.5:
        print(
            f"warning: 1-min load average is {load:.1f} on {num_cores()} cores before the benchmark starts; "
            "other processes are running and the timings will not be reliable",
            file=sys.stderr,
            flush=True,
        )


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads, e.g. 1 as in a DataLoader worker process."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], warmup: int, reps: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of every function: ``warmup`` untimed rounds, then ``reps`` timed rounds.

    Every round calls each function once, the starting function rotating from round to round, so slow
    drifts of the machine (another process, clock changes) fall on all sides alike.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def compile_seconds(step: Callable[[], object], device: torch.device) -> float:
    """Seconds the first calls of a freshly compiled ``step`` spend compiling: two calls (the forward and
    backward graphs, and a possible recompile, e.g. for a no-grad teacher) minus two steady calls after them."""
    pairs = []
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        step()
        step()
        sync(device)
        pairs.append(time.perf_counter() - start)
    return max(0.0, pairs[0] - pairs[1])


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float], scale: float = 1.0) -> str:
    """'min-max' of the timed repetitions, to show how noisy the median is."""
    lo, hi = min(xs) * scale, max(xs) * scale
    digits = 0 if hi >= 100 else 2
    return f"{lo:,.{digits}f}-{hi:,.{digits}f}"


def print_markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    for row in cells[1:]:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("| " + " | ".join(padded) + " |")


def print_json(result: Mapping[str, object]) -> None:
    print(json.dumps(dict(result), sort_keys=True), flush=True)


def environment(args: argparse.Namespace) -> dict[str, object]:
    env: dict[str, object] = {
        "device": args.device,
        "threads": args.threads,
        **({"worker_threads": args.worker_threads} if hasattr(args, "worker_threads") else {}),
        "torch": torch.__version__,
        "warmup": args.warmup,
        "reps": args.reps,
        "wall_s": round(time.perf_counter() - START, 1),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


# -- where a step's time goes -------------------------------------------------------------------------------
# aten op name -> group, first match wins; the GEMM group is what no framework code can make cheaper
OP_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GEMM (linear, matmul, conv)", ("addmm", "aten::mm", "bmm", "matmul", "linear", "conv")),
    ("attention (SDPA)", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    ("norms (LayerNorm, BatchNorm)", ("layer_norm", "batch_norm")),
    ("optimizer and clipping", ("_foreach", "adam", "linalg_vector_norm", "lerp", "addcdiv", "addcmul")),
    ("activations (GELU, softmax)", ("gelu", "softmax", "tanh", "sigmoid")),
    ("copies and layout", ("copy_", "contiguous", "clone", "aten::cat", "stack", "_to_copy", "index", "pad")),
)


def profile_op_groups(fn: Callable[[], object], steps: int) -> dict[str, float]:
    """Self CPU milliseconds per step of each op group (``OP_GROUPS``, the rest as "other") over ``steps``
    calls of ``fn``, from ``torch.profiler``: where a step's time goes, so two implementations of one
    method can be compared op by op, and the share of GEMMs says how much any framework could still gain."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    out = {name: 0.0 for name, _ in OP_GROUPS} | {"other": 0.0}
    for ev in prof.key_averages():
        key = ev.key.lower()
        group = next((name for name, pats in OP_GROUPS if any(p in key for p in pats)), "other")
        out[group] += ev.self_cpu_time_total / 1000 / steps
    return out


def add_profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile STEPS model-only steps of each side (torch.profiler): ms per op group",
    )


def profile_model_only(variants: Mapping[str, Callable[[], object]], steps: int) -> None:
    """``--profile``: the op-group table of the "sslab, model only" and "lightly, model only" variants."""
    if steps:
        print(f"where a model-only step's time goes (torch.profiler, self CPU time, {steps} steps each):\n")
        print_profile(
            {s: profile_op_groups(variants[f"{s}, model only"], steps) for s in ("sslab", "lightly")}
        )
        print()


def print_profile(sides: Mapping[str, Mapping[str, float]]) -> None:
    """One row per op group, one column per side: ms per step and share of that side's step."""
    names = list(next(iter(sides.values())))
    totals = {s: sum(g.values()) for s, g in sides.items()}
    rows = [
        [name, *(f"{g[name]:.1f} ({100 * g[name] / totals[s]:.0f}%)" for s, g in sides.items())]
        for name in names
    ]
    rows.append(["total (self CPU)", *(f"{totals[s]:.1f}" for s in sides)])
    print_markdown_table(["op group, ms / step (share)", *sides], rows)
