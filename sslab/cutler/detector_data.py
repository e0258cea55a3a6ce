"""Data for CutLER's detector: COCO-instances JSON (pseudo-masks or ground truth) as padded mask batches.

A batch is {"image": uint8 (B, 3, H, W), "masks": bool (B, K, H, W), "valid": bool (B, K), "index": (B,)}:
instances padded to the batch's largest count, so flips and copy-paste run on the whole batch at once. Boxes
are always derived from the masks (after augmentation), as the reference does after copy-paste.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset

from sslab.data.sampling import EpochShuffleSampler, ResumableDataModule
from sslab.errors import SSLabError


def load_coco(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SSLabError(f"{path}: no such COCO json; pass the pseudo-mask or annotation file")
    coco = json.loads(path.read_text())
    if "images" not in coco:
        raise SSLabError(f"{path} has no 'images' list; it must be a COCO instances file")
    return coco


def compressed_rle(segm: dict[str, Any]) -> dict[str, Any]:
    """A compressed COCO RLE as pycocotools takes it: ``counts`` as bytes (JSON files hold them as str)."""
    counts = segm["counts"]
    return {"size": segm["size"], "counts": counts.encode() if isinstance(counts, str) else counts}


def load_image(root: str | Path, file_name: str) -> torch.Tensor:
    """uint8 (3, H, W) RGB of an image listed in a COCO JSON."""
    path = Path(root) / file_name
    if not path.is_file():
        raise SSLabError(
            f"image {path} listed in the COCO JSON is missing; check images_root or rebuild the dataset"
        )
    with Image.open(path) as pil:
        return torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous()


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (RLE with str or bytes counts, uncompressed RLE, or polygons) -> uint8 (H, W)."""
    if isinstance(segm, list):  # polygons of one object
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = compressed_rle(segm)
    return mask_utils.decode(rle)


class CocoInstances(Dataset):
    """Images of a COCO json with their instance masks; images without annotations are skipped for
    training (``skip_empty``), as detectron2 does by default."""

    def __init__(self, images_root: str | Path, coco_json: str | Path, skip_empty: bool = True) -> None:
        coco = load_coco(coco_json)
        self.root = Path(images_root)
        by_image: dict[int, list[dict]] = defaultdict(list)
        for ann in coco.get("annotations", []):
            by_image[ann["image_id"]].append(ann)
        self.images = [im for im in coco["images"] if by_image[im["id"]] or not skip_empty]
        self.anns = by_image
        if not self.images:
            raise SSLabError(f"{coco_json} has no image with annotations; nothing to train the detector on")
        sizes = {(im["height"], im["width"]) for im in self.images}
        if len(sizes) > 1:
            raise SSLabError(
                f"{coco_json}: images differ in size {sorted(sizes)[:3]}; the detector trains on one size, "
                "resize the dataset first"
            )
        self.height, self.width = sizes.pop()

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, i: int) -> torch.Tensor:
        return load_image(self.root, self.images[i]["file_name"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        im = self.images[i]
        anns = self.anns[im["id"]]
        h, w = im["height"], im["width"]
        masks = (
            np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns])
            if anns
            else np.zeros((0, h, w), np.uint8)
        )
        masks = torch.from_numpy(masks).bool()
        masks = masks[masks.flatten(1).any(1)]  # an empty mask (a prediction below 0.5 everywhere) has no box
        return {"image": self.read_image(i), "masks": masks, "index": torch.tensor(i)}


def collate_padded(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack images; pad each image's masks to the batch's largest instance count, with a ``valid`` flag."""
    k = max(max(len(it["masks"]) for it in items), 1)
    b, (h, w) = len(items), items[0]["image"].shape[-2:]
    masks = torch.zeros(b, k, h, w, dtype=torch.bool)
    valid = torch.zeros(b, k, dtype=torch.bool)
    for i, it in enumerate(items):  # collation runs in the loader, off the training step
        n = len(it["masks"])
        masks[i, :n] = it["masks"]
        valid[i, :n] = True
    return {
        "image": torch.stack([it["image"] for it in items]),
        "masks": masks,
        "valid": valid,
        "index": torch.stack([it["index"] for it in items]),
    }


# -- batched geometry ----------------------------------------------------------------------------------
def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool -> (..., 4) float boxes (x1, y1, x2, y2) around the mask's pixels, edges included
    (a one-pixel mask at (x, y) gives (x, y, x + 1, y + 1), as pycocotools' toBbox); empty masks give zeros."""
    h, w = masks.shape[-2:]
    cols, rows = masks.any(-2), masks.any(-1)  # (..., W), (..., H)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x1 = torch.where(cols, xs, w).amin(-1)
    x2 = torch.where(cols, xs + 1, 0).amax(-1)
    y1 = torch.where(rows, ys, h).amin(-1)
    y2 = torch.where(rows, ys + 1, 0).amax(-1)
    box = torch.stack([x1, y1, x2, y2], -1).float()
    return torch.where(masks.flatten(-2).any(-1, keepdim=True), box, torch.zeros_like(box))


def hflip(images: torch.Tensor, masks: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the images (B, C, H, W) and masks (B, K, H, W) where ``flip`` (B,) is set."""
    f = flip.view(-1, 1, 1, 1)
    return torch.where(f, images.flip(-1), images), torch.where(f, masks.flip(-1), masks)


def copy_paste(
    images: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor,
    min_ratio: float = 0.3,
    max_ratio: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutLER's copy-paste (cutler/engine/train_loop.py), batched: every image b receives instances of image
    b - 1 (the reference pairs the batch with its reverse).

    From the source image, 1 instance if it has one, else a uniform count in [1, n - 1], chosen at random. The
    whole source image and its masks are scaled by r ~ U(min_ratio, max_ratio) and placed at a uniform offset
    inside the target. A pasted instance covering >= 50% of an existing one (intersection over the existing
    mask's area) is not pasted; the others are composited on top, occluding the existing masks, and
    existing instances left with no pixels are dropped. Returns (images, masks (B, K + K', H, W), valid).
    """
    b, _, h, w = images.shape
    dev = images.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    src_img, src_masks, src_valid = images.roll(1, 0), masks.roll(1, 0), valid.roll(1, 0)

    # which source instances: the num_copy valid ones with the smallest random keys
    n = src_valid.sum(1)
    num_copy = 1 + (rand(b) * (n - 1).clamp(min=1)).long().clamp(max=(n - 1).clamp(min=0))
    keys = torch.where(
        src_valid, rand(b, src_valid.shape[1]), torch.full_like(src_valid, 2.0, dtype=torch.float)
    )
    rank = keys.argsort(1).argsort(1)
    chosen = src_valid & (rank < num_copy[:, None])

    # scale r and offset (sx, sy) in pixels, as an affine sampling grid (align_corners=False coordinates)
    r = min_ratio + (max_ratio - min_ratio) * rand(b)
    sx, sy = rand(b) * w * (1 - r), rand(b) * h * (1 - r)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / r, 1 / r
    theta[:, 0, 2] = (w - 2 * sx) / (r * w) - 1
    theta[:, 1, 2] = (h - 2 * sy) / (r * h) - 1
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    pasted_img = F.grid_sample(src_img.float(), grid, align_corners=False).round().to(images.dtype)
    pasted = F.grid_sample(src_masks.float(), grid, align_corners=False) >= 0.5
    pasted &= chosen[..., None, None]

    # drop pasted instances covering half of an existing one, then composite
    area_t = masks.flatten(2).sum(-1).float()  # (B, K)
    inter = torch.einsum("bph,bqh->bpq", pasted.flatten(2).float(), masks.flatten(2).float())
    ioy = torch.where(valid[:, None, :], inter / area_t.clamp(min=1)[:, None, :], torch.zeros_like(inter))
    keep_p = chosen & pasted.flatten(2).any(-1) & (ioy.amax(-1) < 0.5)
    pasted &= keep_p[..., None, None]
    alpha = pasted.any(1)  # (B, H, W)
    out_img = torch.where(alpha[:, None], pasted_img, images)
    occluded = masks & ~alpha[:, None]
    still = valid & occluded.flatten(2).any(-1)
    return out_img, torch.cat([occluded, pasted], 1), torch.cat([still, keep_p], 1)


def targets_from_masks(masks: torch.Tensor, valid: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """torchvision's per-image target dicts (boxes from masks, label 1 = "object", uint8 masks)."""
    boxes = boxes_from_masks(masks)
    return [
        {
            "boxes": bx[v],
            "labels": torch.ones(int(v.sum()), dtype=torch.int64, device=masks.device),
            "masks": m[v].to(torch.uint8),
        }
        for bx, m, v in zip(boxes, masks, valid, strict=True)
    ]


class DetectionDataModule(ResumableDataModule):
    """The pseudo-mask training set in a resumable order (``EpochShuffleSampler``): a checkpoint records the
    epoch and batches done, and a resumed run skips exactly those."""

    def __init__(
        self,
        images_root: str | Path,
        train_json: str | Path,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.dataset = CocoInstances(images_root, train_json, skip_empty=True)
        if len(self.dataset) < batch_size:
            raise SSLabError(
                f"{train_json} has {len(self.dataset)} annotated images, fewer than batch_size={batch_size}; "
                "lower the batch size"
            )
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.resuming(EpochShuffleSampler(len(self.dataset), self.batch_size, self.seed)),
            drop_last=True,
            collate_fn=collate_padded,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
