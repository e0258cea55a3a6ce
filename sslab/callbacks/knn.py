"""Periodic k-NN evaluation (cosine, weighted vote) on the DataModule's bank and test splits, and for the DINO
family a picture of a few test images with their nearest bank images (``sslab.callbacks.pictures``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from sslab.augment import eval_view
from sslab.callbacks.common import FeatureEvaluation, log_eval
from sslab.callbacks.pictures import neighbour_grid, save_picture
from sslab.evaluation.knn import knn_accuracy, knn_search


class KNNEval(FeatureEvaluation):
    """Logs ``eval/knn_top1`` (k=``k``) and ``eval/knn_top1_k{k'}`` for each ``extra_k``, every
    ``every_n_epochs`` epochs and once more at the end of the run.

    ``neighbours``: ``auto`` draws, for DINO, iBOT and DINOv2 runs, ``num_queries`` fixed test images (evenly
    spaced) and their ``num_neighbours`` nearest bank images from the features this evaluation extracted
    (``neighbours/stepNNNNNN.png``, W&B key ``neighbours``); ``true`` / ``false`` for every method / none."""

    def __init__(
        self,
        k: int,
        temperature: float,
        extra_k: Sequence[int] = (),
        every_n_epochs: int = 1,
        neighbours: bool | str = "auto",
        num_queries: int = 4,
        num_neighbours: int = 5,
        neighbours_key: str = "neighbours",
        max_size: int = 1024,
        skip: bool = False,
    ):
        super().__init__(every_n_epochs, skip)  # skip: trainer=debug, off, said in one line
        self.k, self.temperature, self.extra_k = k, temperature, list(extra_k)
        self.neighbours, self.num_queries, self.num_neighbours = neighbours, num_queries, num_neighbours
        self.neighbours_key, self.max_size = neighbours_key, max_size

    def score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, f: dict[str, torch.Tensor]) -> None:
        metrics = {}
        for k in [self.k, *self.extra_k]:
            acc = knn_accuracy(f["bank"], f["bank_labels"], f["test"], f["test_labels"], k, self.temperature)
            metrics["eval/knn_top1" if k == self.k else f"eval/knn_top1_k{k}"] = acc
        log_eval(trainer, metrics)
        if self.draws_neighbours(pl_module):
            self.draw_neighbours(trainer, pl_module, f)

    def draws_neighbours(self, pl_module: pl.LightningModule) -> bool:
        if self.neighbours == "auto":
            from sslab.methods.dino import DINO  # iBOT and DINOv2 derive from it

            return isinstance(pl_module, DINO)
        return bool(self.neighbours)

    def draw_neighbours(self, trainer: pl.Trainer, pl_module: pl.LightningModule, f: dict) -> np.ndarray:
        """Query = evenly spaced test images; neighbours by cosine similarity of the cached features."""
        dm = trainer.datamodule
        n_test, n_bank = len(f["test"]), len(f["bank"])
        picks = np.linspace(0, n_test - 1, min(self.num_queries, n_test)).round().astype(int)
        k = min(self.num_neighbours, n_bank)
        bank = F.normalize(f["bank"].float(), dim=1)
        queries = F.normalize(f["test"][picks].float(), dim=1)
        _, idx = knn_search(bank, queries, k)
        same = f["bank_labels"][idx] == f["test_labels"][picks].unsqueeze(1)
        size = pl_module.data.image_size

        def pictures(dataset, indices) -> torch.Tensor:
            images = torch.stack([dataset[int(i)]["image"] for i in indices])
            return eval_view(images, size, (0.0,) * 3, (1.0,) * 3)

        query_pics = pictures(dm.test_set, picks)
        neighbour_pics = pictures(dm.bank_set, idx.flatten()).view(len(picks), k, 3, size, size)
        labelled = bool((f["test_labels"][picks] >= 0).all())
        grid = neighbour_grid(query_pics, neighbour_pics, same if labelled else None, max_size=self.max_size)
        caption = (
            f"step {trainer.global_step}: each row = a test image, then its {k} nearest bank images by cosine "
            "similarity (green frame: same class, red: another)"
        )
        save_picture(
            trainer, "neighbours", f"step{trainer.global_step:06d}", grid, self.neighbours_key, caption
        )
        return grid
