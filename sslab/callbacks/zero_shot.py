"""Periodic zero-shot classification (class-name prompts through the text tower) on the test split."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from sslab.callbacks.common import PeriodicCallback, extract_sharded, log_eval
from sslab.evaluation.zero_shot import has_text_tower, top1


class ZeroShotEval(PeriodicCallback):
    """Logs ``eval/zero_shot_top1`` every ``every_n_epochs`` epochs and once more at the end of the run.

    A method without a text tower is skipped with a one-line note, so ``callbacks=[...,zero_shot]`` can be
    left in a shared config. Under DDP each rank embeds its share of the test split (``extract_sharded``).
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        super().__init__(every_n_epochs)
        self.noted = False

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not has_text_tower(pl_module):
            if not self.noted:
                rank_zero_info(f"zero_shot: {type(pl_module).__name__} has no text tower; callback skipped")
                self.noted = True
            return
        dm = trainer.datamodule
        _, test_loader = dm.eval_dataloaders()
        images, labels = extract_sharded(pl_module.encode_image_uint8, test_loader)
        acc = top1(images, labels, pl_module.class_embeddings(dm.class_names))
        log_eval(trainer, {"eval/zero_shot_top1": acc})
