"""Weighted k-NN classification on L2-normalised features (Wu et al., 2018; as evaluated in DINO).

Each of the k nearest bank items (cosine similarity s) votes for its label with weight exp(s / T).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F

# ``auto`` searches with FAISS's exact flat index (the engine of the design), on the GPU when faiss-gpu is
# installed; a bank already on a GPU without faiss-gpu is searched in place by chunked matmul + top-k (torch),
# which saves the copy to host memory. Measured on this project's 2-core CPU (bench/knn_eval.py, 60k x 384
# bank, 10k queries): FAISS flat 2.37 s, torch matmul + top-k 3.47 s, scikit-learn brute force 4.92 s.
SIMILARITY_CHUNK_BYTES = 256 * 1024**2  # one query chunk's (chunk x bank) similarity matrix
SEARCH_BACKENDS = ("auto", "torch", "faiss", "faiss_ivf", "faiss_hnsw")


def knn_search(
    bank: torch.Tensor, queries: torch.Tensor, k: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest inner products of each query with the bank, (Q, k) similarities and indices,
    sorted. On L2-normalised inputs this is cosine similarity.

    ``auto``: exact FAISS (``faiss_search``), or ``matmul_topk`` for a bank on a GPU when faiss-gpu is
    missing.
    ``faiss_ivf`` / ``faiss_hnsw``: approximate FAISS indexes for banks of millions (recall in the bench).
    """
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"k-NN backend {backend!r} is not one of {', '.join(SEARCH_BACKENDS)}")
    if backend == "auto":
        on_gpu = bank.is_cuda and not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)
        backend = "torch" if on_gpu else "faiss"
    if backend == "torch":
        return matmul_topk(bank, queries, k)
    return faiss_search(bank, queries, k, index=backend)


def matmul_topk(bank: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search on the tensors' device: queries in chunks whose similarity matrix stays within
    ``SIMILARITY_CHUNK_BYTES``, one GEMM and one ``topk`` per chunk (no copy to numpy, no float64)."""
    bank = bank.detach().float()
    queries = queries.detach().float().to(bank.device)
    chunk = max(1, SIMILARITY_CHUNK_BYTES // (4 * max(1, bank.shape[0])))
    sims, idx = [], []
    for q in queries.split(chunk):
        s, i = torch.topk(q @ bank.T, k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims).cpu(), torch.cat(idx).cpu()


def faiss_search(
    bank: torch.Tensor, queries: torch.Tensor, k: int, index: str = "faiss"
) -> tuple[torch.Tensor, torch.Tensor]:
    """FAISS search: ``faiss`` = exact ``IndexFlatIP`` (on the GPU when faiss-gpu is installed and a GPU is
    there), ``faiss_ivf`` = IVF-Flat with sqrt(N) lists probing 1/8 of them, ``faiss_hnsw`` = HNSW (M 32,
    efSearch 128). The approximate indexes pay their build inside the call and only win on banks of millions;
    their recall is in bench/knn_eval.py --curve."""
    bank_np = np.ascontiguousarray(bank.detach().float().cpu().numpy())
    query_np = np.ascontiguousarray(queries.detach().float().cpu().numpy())
    n, dim = bank_np.shape
    if index == "faiss_ivf":
        lists = max(1, int(np.sqrt(n)))
        flat = faiss.IndexFlatIP(dim)
        built = faiss.IndexIVFFlat(flat, dim, lists, faiss.METRIC_INNER_PRODUCT)
        built.train(bank_np)
        built.nprobe = max(1, lists // 8)
    elif index == "faiss_hnsw":
        built = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        built.hnsw.efSearch = 128
    else:
        built = faiss.IndexFlatIP(dim)
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            built = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, built)
    built.add(bank_np)
    sims, idx = built.search(query_np, k)
    return torch.from_numpy(sims), torch.from_numpy(idx)


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Class scores (Q, C) from the exp(sim / T)-weighted vote of the k nearest bank features (k and T:
    conf/knn/default.yaml, read by the knn callback and eval.py)."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    bank_labels = bank_labels.cpu().long()
    num_classes = int(num_classes or bank_labels.max() + 1)
    k = min(k, bank.shape[0])
    sims, idx = knn_search(bank, queries, k, backend)
    weights = (sims / temperature).exp()
    votes = torch.zeros(queries.shape[0], num_classes)
    votes.scatter_add_(1, bank_labels[idx], weights)
    return votes


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    temperature: float,
    backend: str = "auto",
) -> float:
    """Top-1 accuracy in percent."""
    num_classes = int(max(bank_labels.max(), query_labels.max()) + 1)
    votes = knn_predict(bank, bank_labels, queries, k, temperature, num_classes, backend)
    return 100.0 * (votes.argmax(1) == query_labels.cpu()).float().mean().item()
