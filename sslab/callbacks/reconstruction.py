"""Pictures of what a reconstructing method sees and produces, for W&B and the run directory.

Any method with ``reconstruct(images_uint8, seed=...) -> {column name: (B, 3, H, W) in [0, 1]}`` gets a grid
with one row per image and one column per entry: MAE shows masked input | reconstruction | original,
DiffMAE the denoising chain from noise to sample. For other methods the callback does nothing, so it can sit
in the default callback list.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import WandbLogger
from torchvision.utils import make_grid

from sslab.callbacks.common import PeriodicCallback


def image_grid(columns: dict[str, torch.Tensor], min_size: int = 96, padding: int = 2) -> torch.Tensor:
    """{name: (B, 3, H, W)} -> one (3, H', W') image, rows = images, columns in dict order; small images are
    enlarged by an integer factor (nearest) so that each cell is at least ``min_size`` pixels."""
    stacked = torch.stack([c.detach().float().cpu() for c in columns.values()], dim=1)  # (B, K, 3, H, W)
    k = stacked.shape[1]
    cells = stacked.flatten(0, 1)
    factor = max(1, -(-min_size // cells.shape[-1]))
    if factor > 1:
        cells = F.interpolate(cells, scale_factor=factor, mode="nearest")
    return make_grid(cells.clamp(0, 1), nrow=k, padding=padding, pad_value=1.0)


def save_png(grid: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(path)


class ReconstructionImages(PeriodicCallback):
    """Every ``every_n_epochs`` epochs and at the end of training: reconstruct the first ``num_images`` test
    images (the same images and masks each time, drawn from ``seed``), save
    ``<run dir>/images/reconstruction_step<N>.png`` and log it to W&B as ``key``."""

    def __init__(
        self, num_images: int = 8, every_n_epochs: int = 1, seed: int = 0, key: str = "images/reconstruction"
    ) -> None:
        super().__init__(every_n_epochs)
        self.num_images, self.seed, self.key = num_images, seed, key
        self.saved: list[Path] = []

    def fixed_images(self, trainer: pl.Trainer) -> torch.Tensor:
        dm = trainer.datamodule
        dm.setup()
        n = min(self.num_images, len(dm.test_set))
        return torch.stack([dm.test_set[i]["image"] for i in range(n)])

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.reconstructs or not trainer.is_global_zero:
            return
        step = trainer.global_step
        columns = pl_module.reconstruct(self.fixed_images(trainer), seed=self.seed)
        grid = image_grid(columns)
        path = Path(trainer.default_root_dir) / "images" / f"reconstruction_step{step:06d}.png"
        save_png(grid, path)
        self.saved.append(path)
        caption = "columns: " + " | ".join(columns)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(self.key, [grid.permute(1, 2, 0).numpy()], step=step, caption=[caption])
