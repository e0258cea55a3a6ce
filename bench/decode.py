"""Image-folder decoding throughput per CPU core: ``data.decode=cpu`` (PIL in DataLoader workers, draft +
bicubic letterbox) against ``data.decode=gpu`` (workers read the bytes, one batched ``decode_jpeg`` on
``--device`` plus the letterbox there), side by side in one process.

Both sides run the real code: ``sslab.data.imagefolder.ImageFolderDataset`` in a ``DataLoader`` with
``--workers`` persistent worker processes, over a folder of photo-like JPEGs this script writes (random sizes
between ``--min-px`` and ``--max-px``, quality 90). One timed call is one pass over the whole folder; the
passes of the two sides alternate (``_common.time_interleaved``) and the median is reported.

Why per CPU core: on a GPU machine the cores feeding the GPU are the limit of multi-crop training, so the
figure that matters is how many images one core delivers. The CPU side uses ``--workers`` cores. The device
side uses ``--workers`` cores to read bytes plus the main process, which drives the decode: one core on
CUDA, its ``--threads`` torch threads when ``--device cpu`` (then the "device" decode is libjpeg-turbo at
full resolution in the main process, without PIL's reduced-DCT ``draft``: a CPU run shows what that path
costs, not what a GPU gains). A third row times the workers' share of the device side alone (read the
bytes, parse the JPEG header): per core, what the CPU does while a GPU decodes. A first batch of each side
is compared (same shape and valid box, mean absolute pixel difference printed).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    add_common_args,
    environment,
    median,
    print_json,
    print_markdown_table,
    setup,
    spread,
    time_interleaved,
)
from PIL import Image
from torch.utils.data import DataLoader

from sslab.data.device_decode import decode_batch
from sslab.data.imagefolder import ImageFolderDataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="JPEGs written to the folder")
    p.add_argument("--min-px", type=int, default=224, help="smallest long side of a written photo")
    p.add_argument("--max-px", type=int, default=500, help="largest long side of a written photo")
    p.add_argument("--load-size", type=int, default=320, help="letterbox size (data.load_size; 320 for 224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes on each side")
    p.add_argument("--tiny", action="store_true", help="a smoke test: 8 small images, 1 timed pass")
    add_common_args(p, warmup=1, reps=3)
    args = p.parse_args(argv)
    if args.tiny:
        args.images, args.min_px, args.max_px, args.load_size, args.batch_size = 8, 48, 96, 64, 4
        args.warmup, args.reps = 1, 1
    return args


def write_folder(root: Path, n: int, min_px: int, max_px: int, seed: int) -> list[Path]:
    """``n`` photo-like JPEGs (smooth shading, edges, sensor noise) of random size and aspect 3:4 to 4:3."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        long = int(rng.integers(min_px, max_px + 1))
        short = int(long * rng.uniform(0.75, 1.0))
        w, h = (long, short) if i % 2 else (short, long)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(40, 215, 3)
        arr = base + 40 * np.sin(xx[..., None] / rng.uniform(5, 40, 3)) * np.cos(yy[..., None] / 23.0)
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(0, 255, 3)
        arr += rng.normal(0, 6, arr.shape)
        files.append(root / f"{i:05d}.jpg")
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(files[-1], quality=90)
    return files


def loader(files: list[Path], args: argparse.Namespace, encoded: bool) -> DataLoader:
    labels = np.zeros(len(files), dtype=np.int64)
    ds = ImageFolderDataset(files, labels, args.load_size, 3, encoded=encoded)
    return DataLoader(
        ds, batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0
    )


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Write the folder, compare a first batch of each side, time both sides interleaved: per side images/s,
    CPU cores and images/s per core, plus the fidelity check (also bench/gpu_suite.py's decode row)."""
    with tempfile.TemporaryDirectory(prefix="sslab_decode_bench_") as tmp:
        files = write_folder(Path(tmp), args.images, args.min_px, args.max_px, args.seed)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        cpu_loader, bytes_loader = loader(files, args, False), loader(files, args, True)
        on_device = lambda b: decode_batch(b["encoded"], b["photo_size"].tolist(), args.load_size, 3, device)  # noqa: E731

        def cpu_pass() -> None:
            for batch in cpu_loader:
                batch["image"].to(device)  # the host-to-device copy a training step makes too

        def device_pass() -> None:
            for batch in bytes_loader:
                on_device(batch)

        def bytes_pass() -> None:  # the workers' share alone: what the CPU cores do when the GPU decodes
            for _ in bytes_loader:
                pass

        first_cpu, first_dev = next(iter(cpu_loader))["image"], on_device(next(iter(bytes_loader))).cpu()
        sides = {"cpu": cpu_pass, "gpu": device_pass, "bytes": bytes_pass}
        times = time_interleaved(sides, args.warmup, args.reps, device)
    workers = max(args.workers, 1)
    cores = {
        "cpu": workers,
        "gpu": args.workers + (1 if device.type == "cuda" else args.threads),
        "bytes": workers,
    }
    ips = {k: args.images / median(v) for k, v in times.items()}
    return {
        "times": times,
        "megabytes": megabytes,
        "images_per_s": ips,
        "cores": cores,
        "per_core": {k: ips[k] / cores[k] for k in ips},
        "same_box": torch.equal(first_cpu[:, -1], first_dev[:, -1]),
        "mean_diff": (first_cpu[:, :-1].float() - first_dev[:, :-1].float()).abs().mean().item(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = setup(args)
    m = measure(args, device)
    ips, cores, per_core, times = m["images_per_s"], m["cores"], m["per_core"], m["times"]
    names = {
        "cpu": f"data.decode=cpu: PIL in {args.workers} worker(s)",
        "gpu": f"data.decode=gpu: bytes in {args.workers} worker(s), decode_jpeg on {device.type}",
        "bytes": "  its workers' share alone (read bytes, parse the header)",
    }
    print(
        f"\nimage-folder decode: {args.images} JPEGs of {args.min_px}-{args.max_px} px ({m['megabytes']:.1f} MB) "
        f"-> letterboxed {args.load_size} px, batch {args.batch_size}; median of {args.reps} passes\n"
    )
    rows = [
        [names[k], ips[k], cores[k], per_core[k], spread([args.images / t for t in times[k]])] for k in ips
    ]
    print_markdown_table(["side", "images / s", "CPU cores", "images / s / core", "min-max images / s"], rows)
    ratio = per_core["gpu"] / per_core["cpu"]
    print(
        f"\nper CPU core: data.decode=gpu delivers {ratio:.2f}x the images of data.decode=cpu; first batch: "
        f"valid boxes {'identical' if m['same_box'] else 'DIFFER'}, mean |pixel difference| {m['mean_diff']:.2f}\n"
    )
    print_json(
        {
            "bench": "decode",
            "images": args.images,
            "load_size": args.load_size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "images_per_s_cpu_decode": round(ips["cpu"], 1),
            "images_per_s_device_decode": round(ips["gpu"], 1),
            "images_per_s_per_core_cpu_decode": round(per_core["cpu"], 1),
            "images_per_s_per_core_device_decode": round(per_core["gpu"], 1),
            "images_per_s_per_core_reading_bytes": round(per_core["bytes"], 1),
            "per_core_ratio": round(ratio, 3),
            "same_valid_boxes": m["same_box"],
            "mean_abs_pixel_difference": round(m["mean_diff"], 3),
            **environment(args),
        }
    )


if __name__ == "__main__":
    main()
