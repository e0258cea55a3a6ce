"""DINO ViT-S/16 cost model: how the training-step time grows with batch, local crops and resolution, so a
short run on the target device predicts a full-scale one.

What is measured: sslab's real DINO step (``bench/dino_step.py``'s sslab side: kornia views on the device,
student and teacher, loss, backward, clipping, AdamW, EMA; the paper's head with 65536 prototypes) at
settings that vary one factor at a time around the largest one: ``--batches`` (with the most local crops at
the highest resolution), ``--locals`` (local crops) and ``--resolutions`` (global crop size; local crops
scale with it, 96 px at 224). For each setting the script counts the model FLOPs per image
(``torch.utils.flop_counter``, as bench/gpu_suite.py) and times the step (median after warm-up).

Why a linear fit of time against FLOPs: the step is matmul-bound once the device is busy, so its time is a
fixed per-step overhead (kernel launches, optimizer, EMA, Python) plus the model FLOPs divided by an
effective throughput. The fit ``ms/step = a + FLOPs / throughput`` gives both, with the error of the fit at
every measured setting; ``--predict`` turns them into the step time and total hours of a target run
(default: the paper's ViT-S/16 recipe per device, batch 64, 2 x 224 + 10 x 96 crops, 100 ImageNet epochs).
The prediction holds for the device, precision and software it was measured with, and within the memory
the measured batches fit in.

``--tiny``: toy sizes (ViT depth 1, 32-48 px, batch 2-4) as a CPU smoke test; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import START, median, num_cores, print_json, print_markdown_table, setup, time_interleaved
from gpu_suite import build_dino, dino_flops_per_image, peak_tflops_for, source_images

PAPER_HEAD = (2048, 256, 65536)  # hidden, bottleneck, prototypes
TINY_HEAD = (64, 32, 256)
IMAGENET_TRAIN = 1_281_167


def local_size(resolution: int, patch: int) -> int:
    """Local crop size for a global crop size: 96 px at 224 px (DINO), scaled, a multiple of the patch."""
    return max(patch, round(resolution * 96 / 224 / patch) * patch)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_target(text: str) -> dict[str, int]:
    """'batch=64,locals=10,res=224,steps=2000000' -> dict (missing keys: the paper's recipe)."""
    target = {"batch": 64, "locals": 10, "res": 224, "steps": 100 * IMAGENET_TRAIN // 64}
    for part in text.split(","):
        if part:
            key, value = part.split("=")
            if key not in target:
                raise SystemExit(f"--predict: unknown key {key!r}; use batch, locals, res, steps")
            target[key] = int(value)
    return target


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--threads", type=int, default=num_cores(), help="torch intra-op threads")
    p.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default=None,
        help="autocast of the step (default: bf16 on a GPU, fp32 on a CPU, as train.py's auto precision)",
    )
    p.add_argument("--batches", type=ints, default=None, help="default 32,64,128 on a GPU, 8,16,32 on a CPU")
    p.add_argument("--locals", type=ints, default=[0, 2, 4, 8], help="local crops per image")
    p.add_argument("--resolutions", type=ints, default=[112, 160, 224], help="global crop sizes")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--grid", action="store_true", help="every combination instead of one factor at a time")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--predict",
        action="append",
        default=[],
        help="target run, e.g. batch=64,locals=10,res=224,steps=2000000 (repeatable; default: the paper's "
        "ViT-S/16 recipe, 100 ImageNet epochs at batch 64 on this one device)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak for MFU (default: from the GPU name)"
    )
    p.add_argument("--tiny", action="store_true", help="toy sizes: a CPU smoke test")
    args = p.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.tiny:
        args.batches = args.batches or [2, 4]
        args.locals, args.resolutions, args.patch = [0, 2], [32, 48], 8
        args.warmup, args.reps = 1, 2
        args.predict = args.predict or ["batch=8,locals=2,res=48,steps=1000"]
    args.batches = args.batches or ([32, 64, 128] if args.device == "cuda" else [8, 16, 32])
    args.predict = args.predict or [""]
    return args


def settings(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """(batch, local crops, resolution): one factor at a time around the largest setting, or the grid."""
    if args.grid:
        return [(b, n, r) for b in args.batches for n in args.locals for r in args.resolutions]
    base_b, base_n, base_r = max(args.batches), max(args.locals), max(args.resolutions)
    out = [(b, base_n, base_r) for b in args.batches]
    out += [(base_b, n, base_r) for n in args.locals]
    out += [(base_b, base_n, r) for r in args.resolutions]
    return list(dict.fromkeys(out))


class Measurer:
    """Builds the DINO step for one setting and returns its FLOPs per image and (optionally) its time."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.depth = 1 if args.tiny else None
        self.head = TINY_HEAD if args.tiny else PAPER_HEAD

    def __call__(self, batch: int, n_local: int, res: int, timed: bool = True) -> dict[str, float]:
        a, device = self.args, self.device
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous setting's model and activations are gone by now
        side = build_dino(
            device, batch, res, local_size(res, a.patch), n_local, a.patch, self.depth, self.head
        )
        images = source_images(batch, res).to(device)
        views = side.make_views(images)
        flops_img = dino_flops_per_image(side, views, min(4, batch))
        out = {"flops_per_image": flops_img}
        if timed:
            amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")

            def step() -> None:
                v = side.make_views(images)  # outside autocast, as Lightning makes them
                with amp:
                    side.step(images, v)

            out["step_s"] = median(time_interleaved({"step": step}, a.warmup, a.reps, device)["step"])
        return out


def fit_line(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least-squares y = a + b x; returns a, b and R^2 (b = 0 when every x is equal)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((yi - my) ** 2 for yi in y)
    ss_res = sum((yi - a - b * xi) ** 2 for xi, yi in zip(x, y, strict=True))
    return a, b, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup(args)
    torch.set_float32_matmul_precision("high")  # as train.py
    peak, peak_source = peak_tflops_for(device, args.peak_tflops)
    measure = Measurer(args, device)

    rows = []
    for b, n, r in settings(args):
        m = measure(b, n, r)
        rows.append({"batch": b, "locals": n, "res": r, "local_res": local_size(r, args.patch), **m})
        print(
            f"[{time.perf_counter() - START:5.0f} s] batch {b}, {n} local, {r} px: "
            f"{1e3 * m['step_s']:.1f} ms/step",
            flush=True,
        )
    x = [row["flops_per_image"] * row["batch"] for row in rows]  # FLOPs per step
    y = [row["step_s"] for row in rows]
    a, slope, r2 = fit_line(x, y)
    throughput = 1.0 / slope if slope > 0 else float("nan")  # FLOP/s the step's FLOPs run at

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    depth = ", depth 1" if args.tiny else ""
    print(
        f"\nDINO ViT-S/{args.patch}{depth} step time on {where}, {args.precision}, head {measure.head[2]}, "
        f"views on the device, median of {args.reps} steps; local crops scale with the global size "
        f"(96 px at 224)\n"
    )
    table = []
    for row, flops_step, t in zip(rows, x, y, strict=True):
        pred = a + slope * flops_step
        achieved = flops_step / t
        mfu = f"{100 * achieved / (peak * 1e12):.1f}%" if peak else "n/a"
        table.append(
            [
                row["batch"],
                f"2 x {row['res']} + {row['locals']} x {row['local_res']}",
                row["flops_per_image"] / 1e9,
                1e3 * t,
                1e3 * t / row["batch"],
                row["batch"] / t,
                achieved / 1e12,
                mfu,
                f"{100 * (pred - t) / t:+.1f}%",
            ]
        )
    print_markdown_table(
        [
            "batch",
            "crops (px)",
            "GFLOP / img",
            "ms / step",
            "ms / img",
            "img / s",
            "TFLOP/s",
            "MFU",
            "fit error",
        ],
        table,
    )
    print(
        f"\nfit: ms/step = {1e3 * a:.2f} + GFLOP/step / {throughput / 1e9:,.1f}  "
        f"(fixed {1e3 * a:.2f} ms per step, {throughput / 1e12:.3f} TFLOP/s on the model FLOPs; R^2 {r2:.4f})\n"
    )

    predictions = []
    for text in args.predict:
        t = parse_target(text)
        flops_img = measure(t["batch"], t["locals"], t["res"], timed=False)["flops_per_image"]
        step_s = a + slope * flops_img * t["batch"]
        predictions.append(
            [
                t["batch"],
                f"2 x {t['res']} + {t['locals']} x {local_size(t['res'], args.patch)}",
                flops_img / 1e9,
                1e3 * step_s,
                t["batch"] / step_s,
                t["steps"],
                step_s * t["steps"] / 3600,
            ]
        )
    print("prediction from the fit (one device; memory not checked):\n")
    print_markdown_table(
        ["batch", "crops (px)", "GFLOP / img", "ms / step", "img / s", "steps", "hours"], predictions
    )
    print()
    print_json(
        {
            "bench": "cost_model",
            "device": args.device,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "precision": args.precision,
            "tiny": args.tiny,
            "fit_fixed_ms": round(1e3 * a, 3),
            "fit_tflops": round(throughput / 1e12, 4),
            "fit_r2": round(r2, 4),
            "rows": [
                {**row, "flops_per_image": round(row["flops_per_image"]), "step_s": round(row["step_s"], 5)}
                for row in rows
            ],
            "predictions": [
                dict(
                    zip(
                        [
                            "batch",
                            "crops",
                            "gflop_per_image",
                            "ms_per_step",
                            "images_per_s",
                            "steps",
                            "hours",
                        ],
                        [v if isinstance(v, int | str) else round(v, 3) for v in pred],
                        strict=True,
                    )
                )
                for pred in predictions
            ],
            "peak_tflops": peak,
            "peak_source": peak_source,
            "threads": args.threads,
            "torch": torch.__version__,
            "wall_s": round(time.perf_counter() - START, 1),
        }
    )


if __name__ == "__main__":
    main()
