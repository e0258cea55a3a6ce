"""End-to-end fine-tuning of a pretrained encoder with a linear head: MAE's headline evaluation.

The recipe follows MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Table 9;
facebookresearch/mae ``main_finetune.py``): AdamW with betas (0.9, 0.999), lr = ``base_lr`` x batch / 256,
layer-wise lr decay (BEiT; ``sslab.modules.lr_decay``: block i of L gets decay^(L - i), the embeddings
decay^(L + 1), the head 1; 0.75 is main_finetune.py's default), weight decay 0.05 except on biases, norms
and tokens, per-step linear warm-up then half-cycle cosine to ``min_lr``, label smoothing 0.1, head weights
drawn with std 2e-5. Sized for minutes on a CPU, it keeps random resized crop + horizontal flip (scale 0.8-1
by default: MAE's 0.08-1 is made for 100 epochs and, in a 3-epoch run on 1k Fashion-MNIST images, cost 30
points against no crop) and drops RandAugment, mixup/cutmix, random erasing and drop path. ``pool="cls"`` classifies the CLS token;
``pool="mean"`` averages the patch tokens like MAE's ``global_pool`` (without its extra norm).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslab.augment.crops import CropPipeline, RandomResizedCrop, valid_boxes
from sslab.augment.multicrop import eval_view, normalize, to_float
from sslab.errors import SSLabError
from sslab.modules.param_groups import adamw_param_groups
from sslab.modules.schedules import CosineSchedule
from sslab.progress_lines import Phase, track


class Classifier(nn.Module):
    """Encoder + linear head on the CLS token (``pool="cls"``) or the mean patch token (``pool="mean"``)."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "cls") -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise SSLabError(f"finetune.pool={pool}: choose cls or mean")
        self.encoder, self.pool = encoder, pool
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder.forward_tokens(x)
        return self.head(out["cls"] if self.pool == "cls" else out["patch"].mean(1))


def finetune_param_groups(
    model: Classifier, weight_decay: float, layer_decay: float | None
) -> list[dict[str, Any]]:
    """The pretraining groups (``adamw_param_groups``); only the encoder gets layer-wise decay, the head
    keeps scale 1."""
    return adamw_param_groups([model.encoder, model.head], weight_decay, layer_decay, model.encoder)


def train_views(size: int, crop_scale: Sequence[float]) -> CropPipeline:
    """Random resized crop (inside each image's valid region, see ``sslab.augment.crops``) + horizontal
    flip, batched on the device; call it as ``views(to_float(images), valid_boxes(images))``."""
    return CropPipeline(RandomResizedCrop(size, crop_scale), K.RandomHorizontalFlip())


@torch.no_grad()
def classifier_accuracy(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> float:
    """Top-1 accuracy in percent over the labelled items of ``loader``, on the deterministic eval view."""
    model.eval()
    correct, total = 0, 0
    for batch in loader:
        x = eval_view(batch["image"].to(device), image_size, mean, std)
        y = batch["label"].to(device)
        known = y >= 0
        correct += (model(x).argmax(1)[known] == y[known]).sum().item()
        total += int(known.sum())
    return 100.0 * correct / max(1, total)


def finetune(
    encoder: nn.Module,
    train_set: Dataset,
    test_loader: Iterable[dict[str, torch.Tensor]],
    *,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    epochs: int = 2,
    batch_size: int = 128,
    base_lr: float = 4e-3,
    min_lr: float = 1e-6,
    warmup_epochs: float = 0.2,
    weight_decay: float = 0.05,
    layer_decay: float | None = 0.75,
    label_smoothing: float = 0.1,
    crop_scale: Sequence[float] = (0.8, 1.0),
    pool: str = "cls",
    num_workers: int = 0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Fine-tune a copy of ``encoder`` (the caller's stays untouched) + a linear head on ``train_set`` and
    return {"top1": test accuracy in percent, "epoch_loss": mean training loss per epoch, "model": the
    fine-tuned classifier}."""
    device = torch.device(device)
    if len(train_set) < 1 or epochs < 1:
        raise SSLabError("fine-tuning needs a non-empty labelled split and finetune.epochs >= 1")
    encoder = copy.deepcopy(encoder)
    if callable(getattr(encoder, "set_patch_size", None)):
        encoder.set_patch_size(None)  # train and test at the encoder's evaluation patch size
    for p in encoder.parameters():
        p.requires_grad_(True)
    model = Classifier(encoder, num_classes, pool).to(device)
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(train_set))
    loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=g, num_workers=num_workers
    )
    steps_per_epoch = len(loader)
    total = epochs * steps_per_epoch
    lr = CosineSchedule(base_lr * batch_size / 256, min_lr, total, int(warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(
        finetune_param_groups(model, weight_decay, layer_decay), lr=lr(0), betas=(0.9, 0.999)
    )
    views = train_views(image_size, crop_scale).to(device)
    epoch_loss: list[float] = []
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), Phase("fine-tune", total, "steps") as phase:
        torch.manual_seed(seed)
        step = 0
        for _ in range(epochs):
            model.train()
            running = torch.zeros((), device=device)
            for batch in loader:
                for group in optimizer.param_groups:
                    group["lr"] = lr(step) * group["lr_scale"]
                y = batch["label"].to(device)
                known = y >= 0
                with torch.no_grad():
                    images = batch["image"].to(device)
                    x = normalize(views(to_float(images), valid_boxes(images)), mean, std)
                loss = F.cross_entropy(model(x[known]), y[known], label_smoothing=label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += loss.detach()
                step += 1
                phase.advance()
            epoch_loss.append(float(running) / steps_per_epoch)
            phase.note(f"epoch {len(epoch_loss)}/{epochs}: loss {epoch_loss[-1]:.3f}")
    top1 = classifier_accuracy(
        model, track(test_loader, "fine-tune: test accuracy"), image_size, mean, std, device
    )
    return {"top1": top1, "epoch_loss": epoch_loss, "model": model}
