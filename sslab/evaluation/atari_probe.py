"""AtariARI-style probing of frozen features for the game state in RAM (Anand et al., "Unsupervised State
Representation Learning in Atari", NeurIPS 2019; ``atariari/benchmark/probe.py``).

Per game and per state variable (a RAM byte at AtariARI's address), a linear classifier over the byte's values
is trained on frozen features of the probe-train episodes and scored on held-out probe-test episodes by
support-weighted F1. As in AtariARI: variables whose value entropy over the probe collection is below 0.6 nats
are dropped, test observations identical to a training one are removed, and the probe is trained with Adam
(lr 5e-4, eps 1e-5, batch 64) for a fixed number of epochs. Two deliberate differences, neither of which can
change a prediction's correctness: the classifier's outputs are the byte values seen in probe-train (a
256-way head would only add classes it never sees a positive example of), and features are standardised with
probe-train statistics first. AtariARI's multi-variable F1 helper passes (pred, true) to scikit-learn in swapped
order, which weights by predicted support; here the weights are the true supports (the usual definition).

``pool`` picks the frozen feature: ``cls`` (the method's ``embed``, as AtariARI probes the encoder's output
vector and the official TOV-VICReg code its CLS token), ``mean`` (the mean of the last layer's patch tokens) or
``cls+mean`` (both, concatenated). Every encoder in a table, random init included, is probed the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslab.data.atari_games import ram_labels
from sslab.errors import SSLabError
from sslab.evaluation.linear import Standardize

if TYPE_CHECKING:
    from sslab.methods.base import SSLMethod


def weighted_f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    """F1 per class present in ``target``, averaged with weights = its support in ``target`` (in [0, 1])."""
    pred, target = pred.long().flatten(), target.long().flatten()
    classes, support = torch.unique(target, return_counts=True)
    tp = torch.stack([((pred == c) & (target == c)).sum() for c in classes]).float()
    predicted = torch.stack([(pred == c).sum() for c in classes]).float()
    f1 = 2 * tp / (predicted + support.float()).clamp_min(1)
    return float((f1 * support).sum() / support.sum())


def value_entropy(values: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each column's empirical value distribution, (N, V) -> (V,)."""
    out = []
    for col in np.asarray(values).T:
        p = np.unique(col, return_counts=True)[1] / len(col)
        out.append(float(-(p * np.log(p)).sum()))
    return np.array(out)


def unseen_rows(train_obs: np.ndarray, test_obs: np.ndarray) -> np.ndarray:
    """Boolean mask of test observations that do not occur (byte for byte) among the training ones."""
    row = np.dtype((np.void, int(np.prod(train_obs.shape[1:]))))
    a = np.ascontiguousarray(train_obs).reshape(len(train_obs), -1).view(row).ravel()
    b = np.ascontiguousarray(test_obs).reshape(len(test_obs), -1).view(row).ravel()
    return ~np.isin(b, a)


class MultiVariableProbe(nn.Module):
    """One linear layer scoring every variable's candidate values: logits (N, V, K), padded classes at -inf."""

    def __init__(self, dim: int, num_classes: Sequence[int], mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.norm = Standardize(mean, std)
        self.k = max(num_classes)
        self.linear = nn.Linear(dim, len(num_classes) * self.k)
        valid = torch.arange(self.k)[None, :] < torch.tensor(num_classes)[:, None]
        self.register_buffer("valid", valid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(self.norm(x)).view(len(x), -1, self.k)
        return logits.masked_fill(~self.valid, float("-inf"))


def fit_probe(
    feats: torch.Tensor,
    labels: np.ndarray,
    epochs: int = 100,
    lr: float = 5e-4,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[MultiVariableProbe, list[np.ndarray]]:
    """Train on features (N, D) and byte labels (N, V); returns the probe and each variable's class values."""
    g = torch.Generator().manual_seed(seed)
    values = [np.unique(col) for col in labels.T]
    y = torch.from_numpy(
        np.stack([np.searchsorted(v, col) for v, col in zip(values, labels.T, strict=True)], 1)
    )
    x = feats.float()
    probe = MultiVariableProbe(x.shape[1], [len(v) for v in values], x.mean(0), x.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(probe.parameters(), lr=lr, eps=1e-5)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for idx in order.split(batch_size):
            logits = probe(x[idx])
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return probe.eval(), values


@torch.no_grad()
def predict_values(probe: MultiVariableProbe, values: list[np.ndarray], feats: torch.Tensor) -> np.ndarray:
    cls = probe(feats.float()).argmax(-1).numpy()
    return np.stack([v[cls[:, i]] for i, v in enumerate(values)], 1)


@torch.no_grad()
def embed_all(
    embed: Callable[[torch.Tensor], torch.Tensor], obs: np.ndarray, batch_size: int = 256
) -> torch.Tensor:
    return torch.cat(
        [
            embed(torch.from_numpy(obs[i : i + batch_size])).float().cpu()
            for i in range(0, len(obs), batch_size)
        ]
    )


POOLS = ("cls", "mean", "cls+mean")


def pooled_embed(model: SSLMethod, pool: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 observations -> frozen features of ``model``'s evaluation encoder, pooled as ``pool`` says."""
    if pool not in POOLS:
        raise SSLabError(f"atari_probe.pool={pool!r}: choose one of {', '.join(POOLS)}")
    if pool == "cls":
        return model.embed_uint8
    backbone = model.eval_backbone()

    def pooled(x: torch.Tensor) -> torch.Tensor:
        tokens = backbone.forward_tokens(x)
        mean = tokens["patch"].mean(1)
        return mean if pool == "mean" else torch.cat([tokens["cls"], mean], 1)

    return lambda images: model.embed_uint8(images, features=pooled)


def probe_game(
    embed: Callable[[torch.Tensor], torch.Tensor],
    game: str,
    split: Mapping[str, np.ndarray],
    entropy_threshold: float = 0.6,
    embed_batch_size: int = 256,
    **fit_kwargs: Any,
) -> dict[str, float]:
    """F1 per kept state variable of one game, for one encoder."""
    names, train_y = ram_labels(game, split["train_ram"])
    _, test_y = ram_labels(game, split["test_ram"])
    keep = value_entropy(np.concatenate([train_y, test_y])) >= entropy_threshold
    if not keep.any():
        return {}
    fresh = unseen_rows(split["train_obs"], split["test_obs"])
    train_x = embed_all(embed, split["train_obs"], embed_batch_size)
    test_x = embed_all(embed, split["test_obs"][fresh], embed_batch_size)
    probe, values = fit_probe(train_x, train_y[:, keep], **fit_kwargs)
    pred = predict_values(probe, values, test_x)
    true = test_y[fresh][:, keep]
    kept = [n for n, k in zip(names, keep, strict=True) if k]
    return {
        n: weighted_f1(torch.from_numpy(pred[:, i]), torch.from_numpy(true[:, i])) for i, n in enumerate(kept)
    }


def summarize(per_variable: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per-game mean F1 over its variables, and their mean over games (AtariARI's per-game average)."""
    per_game = {g: float(np.mean(list(v.values()))) if v else float("nan") for g, v in per_variable.items()}
    return {**per_game, "mean": float(np.nanmean(list(per_game.values())))}
