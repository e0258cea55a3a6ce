import math

import pytest
import torch

from sslab.evaluation.knn import knn_accuracy, knn_predict, knn_search


def test_weighted_vote_matches_hand_computation():
    # bank on the unit circle; the query at angle 0
    angles = [0.1, 0.2, 1.0, 3.0]
    bank = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    votes = knn_predict(bank, labels, query, k=3, temperature=0.5, num_classes=2)
    w = [math.exp(math.cos(a) / 0.5) for a in angles[:3]]
    assert votes[0, 0].item() == pytest.approx(w[0], rel=1e-5)
    assert votes[0, 1].item() == pytest.approx(w[1] + w[2], rel=1e-5)


def test_knn_is_scale_invariant_and_agrees_with_brute_force():
    torch.manual_seed(0)
    means = torch.randn(5, 16) * 3
    bank_y = torch.arange(500) % 5
    bank = means[bank_y] + torch.randn(500, 16)
    q_y = torch.arange(100) % 5
    q = means[q_y] + torch.randn(100, 16)
    acc = knn_accuracy(bank, bank_y, q, q_y, k=20, temperature=0.07)
    assert acc == knn_accuracy(bank * 7.0, bank_y, q * 0.1, q_y, k=20, temperature=0.07)
    # brute force in torch
    sims = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top, idx = sims.topk(20, dim=1)
    votes = torch.zeros(100, 5).scatter_add_(1, bank_y[idx], (top / 0.07).exp())
    assert acc == pytest.approx(100.0 * (votes.argmax(1) == q_y).float().mean().item())
    assert acc > 90


def test_every_search_backend_finds_the_exact_neighbours():
    """The torch matmul + top-k path (DINO's eval_knn.py form) and FAISS's flat index are both exact; the
    IVF and HNSW indexes are approximate but keep most true neighbours on clustered data."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 32, generator=g)
    bank = torch.nn.functional.normalize(
        centers.repeat(300, 1) + 0.5 * torch.randn(3000, 32, generator=g), dim=1
    )
    queries = torch.nn.functional.normalize(
        centers.repeat(20, 1) + 0.5 * torch.randn(200, 32, generator=g), dim=1
    )
    exact = (queries @ bank.T).topk(10, dim=1)
    for backend in ("torch", "faiss", "auto"):
        sims, idx = knn_search(bank, queries, 10, backend)
        torch.testing.assert_close(sims, exact.values, rtol=1e-5, atol=1e-5)
        assert (idx == exact.indices).float().mean() > 0.999, backend
    for backend in ("faiss_ivf", "faiss_hnsw"):
        _, idx = knn_search(bank, queries, 10, backend)
        recall = (
            sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx, exact.indices, strict=True))
            / idx.numel()
        )
        assert recall > 0.5, (backend, recall)


def test_torch_search_works_in_chunks(monkeypatch):
    """A bank bigger than one similarity chunk gives the same answer chunk by chunk."""
    import sslab.evaluation.knn as knn

    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(500, 8, generator=g), torch.randn(37, 8, generator=g)
    whole = knn.matmul_topk(bank, queries, 5)
    monkeypatch.setattr(knn, "SIMILARITY_CHUNK_BYTES", 4 * 500 * 3)  # 3 queries per chunk
    chunked = knn.matmul_topk(bank, queries, 5)
    assert torch.equal(whole[1], chunked[1])
    torch.testing.assert_close(whole[0], chunked[0])  # GEMM blocking may change the last bits
