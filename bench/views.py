"""DINO multi-crop view generation throughput: sslab's batched kornia ``MultiCropViews`` against the same
recipe as per-sample torchvision transforms.

The recipe (DINO's): per crop, random resized crop (bicubic; scale 0.4-1 global, 0.05-0.4 local), horizontal
flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, greyscale with p 0.2, Gaussian blur with p 1.0 / 0.1 on
the two global crops and 0.5 on local crops (sigma 0.1-2.0 px at 224 px, scaled to the crop size, as sslab
does), solarisation (threshold 0.5 on [0, 1] images) with p 0.2 on the second global crop, normalisation.
Each source image gives 2 global and ``--num-local`` local crops; throughput is source images per second.

- **sslab**: one ``MultiCropViews`` call on the uint8 (B, C, H, W) batch (on ``--device``), which returns
  the crops as batched float tensors.
- **torchvision (tensor)**: ``torchvision.transforms.v2`` pipelines applied image by image in a Python loop,
  as a DataLoader worker does, on uint8 CHW tensors (greyscale repeated to RGB, converted to float in [0, 1]
  first, like sslab), then collated into one batch per crop (``torch.stack``).
- **torchvision (PIL)** (unless ``--no-pil``): the same pipelines on PIL RGB images, which is the common
  per-sample route (torchvision datasets yield PIL images), converted to normalised tensors at the end.

Why the comparison is fair: same source images, same crop counts and sizes, same operations and
probabilities, the same output (normalised float crops batched per crop position) on both sides. sslab's
pipeline gets ``--threads`` torch threads (all cores by default). The per-sample baselines run in the main
process with ``--worker-threads`` torch threads (default 1), exactly as inside one DataLoader worker, which
sets torch to 1 thread: on images this small, more intra-op threads make them much slower, not faster
(thread wake-ups cost more than the work). The baseline numbers are therefore one worker's throughput; W
worker processes on W spare cores would scale them up to about W times, while sslab's pipeline runs on
the training device. Warm-up calls first, then the timed calls alternate between the implementations in
rotating order, and the median is reported. torchvision's resize keeps its default ``antialias=True``.

Source images: Fashion-MNIST (embedded subset) at 28 px; for other ``--size`` values the same images are
resized to ``--size`` so that crops come from a ``--size`` px source (sslab's datasets load images at the
global crop size).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    add_common_args,
    environment,
    median,
    print_json,
    print_markdown_table,
    setup,
    spread,
    time_interleaved,
    torch_threads,
)
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from sslab.augment import MultiCropViews

MEAN, STD = [0.286] * 3, [0.353] * 3  # Fashion-MNIST statistics, as in conf/data/fashion_mnist.yaml


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=28, help="global crop size = source image size")
    p.add_argument("--local-size", type=int, default=None, help="local crop size (default: size // 2)")
    p.add_argument("--num-local", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256, help="source images per call")
    p.add_argument("--no-pil", action="store_true", help="skip the PIL baseline")
    add_common_args(p, warmup=1, reps=5, per_sample_baseline=True)
    return p.parse_args()


def source_images(n: int, size: int) -> torch.Tensor:
    """uint8 (n, 1, size, size) Fashion-MNIST images, resized from 28 px when ``size`` differs."""
    from sslab.data.fashion_mnist import load_embedded

    (x, _), _ = load_embedded()
    reps = math.ceil(n / len(x))
    images = torch.from_numpy(np.concatenate([x] * reps)[:n]).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images.contiguous()


def crop_pipeline(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float, pil: bool):
    sigma = (0.1 * size / 224.0, 2.0 * size / 224.0)
    kernel = 2 * math.ceil(3 * sigma[1]) + 1
    ops = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma)], p=blur_p))
    if solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128 if pil else 0.5, p=solarize_p))
    if pil:
        ops += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
    else:
        ops.insert(0, v2.ToDtype(torch.float32, scale=True))
    ops.append(v2.Normalize(MEAN, STD))
    return v2.Compose(ops)


class PerSampleViews:
    """The multi-crop recipe with torchvision, one image at a time, collated per crop position."""

    def __init__(self, global_size: int, local_size: int, num_local: int, pil: bool) -> None:
        self.pil = pil
        self.transforms = [
            crop_pipeline(global_size, (0.4, 1.0), 1.0, 0.0, pil),
            crop_pipeline(global_size, (0.4, 1.0), 0.1, 0.2, pil),
        ] + [crop_pipeline(local_size, (0.05, 0.4), 0.5, 0.0, pil)] * num_local

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.pil:
            arrays = images.permute(0, 2, 3, 1).numpy()
            samples = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in arrays]
        else:
            samples = [im.expand(3, -1, -1) if im.shape[0] == 1 else im for im in images]
        per_sample = [[t(s) for t in self.transforms] for s in samples]
        return [torch.stack(crops) for crops in zip(*per_sample, strict=True)]


def main() -> None:
    args = parse_args()
    device = setup(args)
    local_size = args.local_size or args.size // 2
    images = source_images(args.batch_size, args.size)
    ours = MultiCropViews(
        global_size=args.size,
        local_size=local_size,
        mean=MEAN,
        std=STD,
        num_global=2,
        num_local=args.num_local,
    ).to(device)

    def in_worker(views: PerSampleViews) -> list[torch.Tensor]:
        with torch_threads(args.worker_threads):
            return views(images)

    tv_tensor = PerSampleViews(args.size, local_size, args.num_local, pil=False)
    tv_pil = PerSampleViews(args.size, local_size, args.num_local, pil=True)
    variant_fns = {
        "sslab (kornia, batched)": lambda: ours(images.to(device, non_blocking=True)),
        "torchvision v2 per sample (tensor)": lambda: in_worker(tv_tensor),
    }
    if not args.no_pil:
        variant_fns["torchvision v2 per sample (PIL)"] = lambda: in_worker(tv_pil)

    # same output layout everywhere: 2 + num_local batched crops, global ones first
    shapes = {k: [tuple(c.shape) for c in f()] for k, f in variant_fns.items()}
    if len({tuple(s) for s in shapes.values()}) != 1:
        raise RuntimeError(f"crop shapes differ: {shapes}")

    times = time_interleaved(variant_fns, args.warmup, args.reps, device)
    sec = {k: median(v) for k, v in times.items()}
    ips = {k: args.batch_size / s for k, s in sec.items()}
    ours_name = "sslab (kornia, batched)"
    n_crops = 2 + args.num_local
    print(
        f"\nDINO multi-crop views: {args.batch_size} source images of {args.size} px -> 2 x {args.size} px + "
        f"{args.num_local} x {local_size} px crops each; sslab on {args.device}, torch threads: {args.threads}, "
        f"per-sample baselines with {args.worker_threads} (as in a DataLoader worker); median of {args.reps} calls\n"
    )
    rows = []
    for name in variant_fns:
        ratio = "" if name == ours_name else f"{sec[name] / sec[ours_name]:.2f}x"
        rows.append(
            [name, 1000 * sec[name], spread(times[name], 1000), ips[name], n_crops * ips[name], ratio]
        )
    print_markdown_table(
        ["implementation", "ms / batch", "min-max ms", "images / s", "crops / s", "sslab speed-up"], rows
    )
    print()
    result = {
        "bench": "views",
        "size": args.size,
        "local_size": local_size,
        "num_local": args.num_local,
        "batch_size": args.batch_size,
        "images_per_s_sslab": round(ips[ours_name], 2),
        "images_per_s_torchvision_tensor": round(ips["torchvision v2 per sample (tensor)"], 2),
        "speedup_vs_torchvision_tensor": round(sec["torchvision v2 per sample (tensor)"] / sec[ours_name], 3),
        **environment(args),
    }
    if not args.no_pil:
        result["images_per_s_torchvision_pil"] = round(ips["torchvision v2 per sample (PIL)"], 2)
        result["speedup_vs_torchvision_pil"] = round(
            sec["torchvision v2 per sample (PIL)"] / sec[ours_name], 3
        )
    print_json(result)


if __name__ == "__main__":
    main()
