"""Linear probe on frozen features, trained offline (full-batch features already extracted)."""

from __future__ import annotations

import torch
from torch import nn


def train_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    batchnorm: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Standardised features -> (optional BatchNorm without affine, MAE's probe) -> Linear, trained with AdamW
    and a cosine learning rate. Returns the probe in eval mode (standardisation folded in)."""
    g = torch.Generator().manual_seed(seed)
    x = train_feats.float().cpu()
    y = train_labels.long().cpu()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    num_classes = int(y.max()) + 1
    layers: list[nn.Module] = [Standardize(mean, std)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(x.shape[1], affine=False))
    linear = nn.Linear(x.shape[1], num_classes)
    nn.init.normal_(linear.weight, std=0.01, generator=g)
    nn.init.zeros_(linear.bias)
    probe = nn.Sequential(*layers, linear)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = loss_fn(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


class Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def probe_accuracy(probe: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    pred = probe(feats.float().cpu()).argmax(1)
    return 100.0 * (pred == labels.cpu()).float().mean().item()


def linear_probe_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    **kwargs,
) -> float:
    probe = train_linear_probe(train_feats, train_labels, **kwargs)
    return probe_accuracy(probe, test_feats, test_labels)
