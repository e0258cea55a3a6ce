"""Feature extraction for evaluation: one pass over the bank and test loaders."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from sslab.augment import to_float


@torch.no_grad()
def extract(
    embed: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) on the CPU for every batch of ``loader``; ``embed`` maps uint8 images to (B, D)."""
    feats, labels = [], []
    for batch in loader:
        feats.append(embed(batch["image"]).float().cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(feats), torch.cat(labels)


def raw_pixels(images: torch.Tensor) -> torch.Tensor:
    """Flattened pixels as features: the baseline every representation should beat (a validity channel of
    letterboxed images is dropped, see ``sslab.augment.crops``)."""
    return to_float(images).flatten(1)
