"""Weighted k-NN classification on L2-normalised features (Wu et al., 2018; as evaluated in DINO).

Each of the k nearest bank items (cosine similarity s) votes for its label with weight exp(s / T).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F


def knn_search(bank: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product search with FAISS (on L2-normalised inputs this is cosine similarity)."""
    bank_np = np.ascontiguousarray(bank.detach().float().cpu().numpy())
    query_np = np.ascontiguousarray(queries.detach().float().cpu().numpy())
    index = faiss.IndexFlatIP(bank_np.shape[1])
    index.add(bank_np)
    sims, idx = index.search(query_np, k)
    return torch.from_numpy(sims), torch.from_numpy(idx)


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Class scores (Q, C) from the exp(sim / T)-weighted vote of the k nearest bank features."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    bank_labels = bank_labels.cpu().long()
    num_classes = int(num_classes or bank_labels.max() + 1)
    k = min(k, bank.shape[0])
    sims, idx = knn_search(bank, queries, k)
    weights = (sims / temperature).exp()
    votes = torch.zeros(queries.shape[0], num_classes)
    votes.scatter_add_(1, bank_labels[idx], weights)
    return votes


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in percent."""
    num_classes = int(max(bank_labels.max(), query_labels.max()) + 1)
    votes = knn_predict(bank, bank_labels, queries, k, temperature, num_classes)
    return 100.0 * (votes.argmax(1) == query_labels.cpu()).float().mean().item()
