"""MaskCut throughput: sslab's batched ``maskcut`` against the same algorithm run one image at a time.

Three sides cut the same patch keys (a random-init timm ViT-T's last-block keys of seeded random images; the
features are extracted once and their time reported separately, since every side needs them):

- **sslab batched**: ``sslab.cutler.maskcut.maskcut`` on ``--batch-size`` images at once (one batched
  ``torch.linalg.eigh`` over (B, N, N) per round, batched flood fill), float32;
- **torch per image**: the same function called with one image at a time (a Python loop over the images);
- **scipy per image** (the reference's way, facebookresearch/CutLER ``maskcut.py``): ``maskcut_numpy``,
  ``scipy.linalg.eigh(D - A, D)`` (float64 generalised solver) and ``scipy.ndimage.label`` per image.

Why the comparison is fair: identical features, tau and number of masks; the same rules on all sides (the
script reports how many images get identical masks from batched sslab and scipy); each side's time covers
everything from the keys to the patch-grid masks; all run with the same torch / BLAS threads; warm-up first,
then timed repetitions alternate between the sides and the median is reported. The reference's dense CRF at
image resolution is not part of any side (sslab skips it).
"""

from __future__ import annotations

import argparse
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

from sslab import backbones
from sslab.cutler.maskcut import maskcut, maskcut_numpy, patch_keys


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="images cut per repetition")
    p.add_argument("--batch-size", type=int, default=64, help="images per batched call (sslab side)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--depth", type=int, default=2, help="ViT-T depth (the features only)")
    p.add_argument("--n-masks", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.15)
    add_common_args(p, warmup=1, reps=3)
    return p.parse_args()


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time every side on the same keys; returns the per-side times (seconds per repetition) and how many
    images get identical masks from batched sslab and scipy. Shared by this script and bench/gpu_suite.py."""
    vit = backbones.build("vit_t", img_size=args.image_size, patch_size=args.patch_size, depth=args.depth)
    vit = vit.to(device).eval()
    images = torch.rand(args.images, 3, args.image_size, args.image_size, device=device) * 2 - 1

    def features() -> torch.Tensor:
        return torch.cat([patch_keys(vit, x) for x in images.split(args.batch_size)])

    keys = features()
    keys_np = keys.double().cpu().numpy()

    def batched() -> list[torch.Tensor]:
        return [maskcut(k, args.n_masks, args.tau).masks for k in keys.split(args.batch_size)]

    def per_image_torch() -> list[torch.Tensor]:
        return [maskcut(keys[i : i + 1], args.n_masks, args.tau).masks for i in range(len(keys))]

    def per_image_scipy() -> list[np.ndarray]:
        return [maskcut_numpy(k, args.n_masks, args.tau)[0] for k in keys_np]

    fns = {
        "features (ViT keys, shared)": features,
        "sslab batched": batched,
        "torch per image": per_image_torch,
        "scipy per image (reference)": per_image_scipy,
    }
    times = time_interleaved(fns, args.warmup, args.reps, device)
    ours = torch.cat(batched()).cpu().numpy()
    ref = np.stack(per_image_scipy())
    same = int((ours == ref).reshape(len(ours), -1).all(1).sum())
    same_first = int((ours[:, 0] == ref[:, 0]).reshape(len(ours), -1).all(1).sum())
    return {"times": times, "same": same, "same_first": same_first}


def main() -> None:
    args = parse_args()
    device = setup(args)
    measured = measure(args, device)
    times, same, same_first = measured["times"], measured["same"], measured["same_first"]

    n = args.images
    t_feat = median(times["features (ViT keys, shared)"])
    t_ours = median(times["sslab batched"])
    rows, result = [], {}
    for name, ts in times.items():
        t = median(ts)
        with_feat = None if name.startswith("features") else n / (t + t_feat)
        rows.append(
            [name, t * 1e3, spread(ts, 1e3), n / t, "-" if with_feat is None else with_feat, t / t_ours]
        )
        result[name] = {"ms": round(t * 1e3, 2), "images_per_s": round(n / t, 1)}
    grid = args.image_size // args.patch_size
    print(
        f"MaskCut, {n} images {args.image_size} px, patch {args.patch_size} ({grid}x{grid} = {grid * grid} "
        f"patches), N={args.n_masks} masks, tau={args.tau}, batch {args.batch_size}, ViT-T depth {args.depth}, "
        f"{args.device}, {args.threads} threads"
    )
    print_markdown_table(
        [
            "side",
            "ms / rep (median)",
            "min-max",
            "images/s",
            "images/s incl. features",
            "time / sslab batched",
        ],
        rows,
    )
    print(f"identical masks, sslab batched vs scipy: all rounds {same}/{n}, first round {same_first}/{n}")
    print_json(
        {
            **result,
            "speedup_vs_torch_per_image": round(median(times["torch per image"]) / t_ours, 2),
            "speedup_vs_scipy_per_image": round(median(times["scipy per image (reference)"]) / t_ours, 2),
            "identical_all_rounds": same,
            "identical_first_round": same_first,
            "images": n,
            "patches": grid * grid,
            **environment(args),
        }
    )


if __name__ == "__main__":
    main()
