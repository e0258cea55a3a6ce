"""k-NN evaluation time: sslab's ``knn_accuracy`` against scikit-learn's ``KNeighborsClassifier``.

Both sides compute the same thing from the same float32 features: L2-normalise bank and queries, find each
query's k nearest bank items by cosine similarity (exact, brute force), let each neighbour vote for its label
with weight exp(similarity / T), and report top-1 accuracy.

- **sslab**: ``sslab.evaluation.knn.knn_accuracy`` with its default search (``auto``: FAISS's exact
  ``IndexFlatIP`` on the CPU), and the same call with the torch path (chunked matmul + top-k,
  ``backend=torch``, what ``auto`` takes for a bank on a GPU without faiss-gpu), vote in torch.
- **scikit-learn**: ``KNeighborsClassifier(algorithm="brute", metric="euclidean", weights=callable)`` on the
  L2-normalised features. On unit vectors Euclidean distance d and cosine similarity s give the same
  neighbours (d^2 = 2 - 2s), and the weight callable turns d back into exp(s / T). Euclidean is scikit-learn's
  fastest exact path (GEMM-based pairwise-distance reduction); ``--sklearn-metric cosine`` is also offered.

Why the comparison is fair: the same features, k and T on both sides; each side's time covers everything
from the raw features to the accuracy (normalisation, index build or fit, search, vote); both run with the
same number of threads (FAISS's OpenMP, scikit-learn's OpenMP/BLAS via threadpoolctl, torch); warm-up calls
on a slice of the queries come first, then the timed calls alternate between the two sides and the median
is reported. The script also checks that both accuracies agree within 0.5 points (exit status 1 if not).

Features: by default synthetic, seeded and clustered (10 class means plus Gaussian noise), sized like a
ViT-S k-NN evaluation on a 60k-image bank; ``--real`` uses raw Fashion-MNIST pixels (784-d) instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from _common import (
    add_common_args,
    environment,
    median,
    print_json,
    print_markdown_table,
    setup,
    spread,
    time_interleaved,
)
from omegaconf import OmegaConf

from sslab.evaluation.knn import knn_accuracy

KNN = OmegaConf.load(
    Path(__file__).resolve().parents[1] / "conf" / "knn" / "default.yaml"
)  # the runs' k and T


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bank", type=int, default=60000, help="bank size (synthetic features)")
    p.add_argument("--queries", type=int, default=10000, help="number of queries (synthetic features)")
    p.add_argument("--dim", type=int, default=384, help="feature dimension (synthetic features)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument(
        "--noise",
        type=float,
        default=6.0,
        help="per-dimension noise std (class means are N(0, 1)); 6 gives ~77%% top-1",
    )
    p.add_argument("--k", type=int, default=KNN.k)
    p.add_argument("--temperature", type=float, default=KNN.temperature)
    p.add_argument("--sklearn-metric", choices=["euclidean", "cosine"], default="euclidean")
    p.add_argument(
        "--real", action="store_true", help="raw Fashion-MNIST pixels (the full set when installed)"
    )
    p.add_argument("--warmup-queries", type=int, default=500, help="queries used by the warm-up calls")
    p.add_argument(
        "--curve",
        action="store_true",
        help="instead: search time vs bank size (10k, 60k, 250k, 1M) for every search path, with recall",
    )
    p.add_argument("--curve-sizes", default="10000,60000,250000,1000000")
    p.add_argument("--curve-queries", type=int, default=1000)
    add_common_args(p, warmup=1, reps=3)
    p.set_defaults(device="cpu")  # FAISS-CPU and scikit-learn: both sides run on the CPU
    return p.parse_args()


def synthetic(args: argparse.Namespace):
    g = torch.Generator().manual_seed(args.seed)
    means = torch.randn(args.classes, args.dim, generator=g)
    bank_y = torch.randint(args.classes, (args.bank,), generator=g)
    query_y = torch.randint(args.classes, (args.queries,), generator=g)
    bank = means[bank_y] + args.noise * torch.randn(args.bank, args.dim, generator=g)
    queries = means[query_y] + args.noise * torch.randn(args.queries, args.dim, generator=g)
    return bank, bank_y, queries, query_y, f"synthetic clustered features, {args.classes} classes"


def fashion_mnist_pixels():
    from sslab.data.fashion_mnist import full_available, load

    (xtr, ytr), (xte, yte) = load("auto")
    source = "full 60k/10k" if full_available() else "embedded 10k/2k subset"
    flat = lambda x: torch.from_numpy(x.reshape(len(x), -1)).float()  # noqa: E731
    return (
        flat(xtr),
        torch.from_numpy(ytr),
        flat(xte),
        torch.from_numpy(yte),
        f"Fashion-MNIST raw pixels, {source}",
    )


def sklearn_accuracy(bank, bank_labels, queries, query_labels, k, temperature, metric, n_jobs) -> float:
    """Top-1 accuracy in percent of an exp(cos / T)-weighted k-NN vote, in scikit-learn."""
    from sklearn.neighbors import KNeighborsClassifier

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    if metric == "euclidean":

        def weights(d: np.ndarray) -> np.ndarray:  # unit vectors: cos = 1 - d^2 / 2
            return np.exp((1.0 - 0.5 * d * d) / temperature)

    else:

        def weights(d: np.ndarray) -> np.ndarray:  # cosine distance = 1 - cos
            return np.exp((1.0 - d) / temperature)

    clf = KNeighborsClassifier(
        n_neighbors=k, weights=weights, algorithm="brute", metric=metric, n_jobs=n_jobs
    )
    clf.fit(unit(bank), bank_labels)
    pred = clf.predict(unit(queries))
    return 100.0 * float(np.mean(pred == query_labels))


SSLAB, SSLAB_TORCH = "sslab (auto: FAISS flat)", "sslab (torch matmul + top-k)"


def cost_curve(args: argparse.Namespace) -> None:
    """Search time of every path against bank size, on clustered features like the main comparison's
    (``--classes`` means plus ``--noise``); the approximate FAISS indexes also report their recall@k against
    the exact neighbours (build time included in their time)."""
    import time

    from sslab.evaluation.knn import knn_search

    sizes = [int(x) for x in args.curve_sizes.split(",")]
    g = torch.Generator().manual_seed(args.seed)
    means = torch.randn(args.classes, args.dim, generator=g)

    def clustered(n: int) -> torch.Tensor:
        x = means[torch.randint(args.classes, (n,), generator=g)] + args.noise * torch.randn(
            n, args.dim, generator=g
        )
        return torch.nn.functional.normalize(x, dim=1)

    queries = clustered(args.curve_queries)
    rows = []
    for n in sizes:
        bank = clustered(n)
        exact = None
        for backend in ("torch", "faiss", "faiss_ivf", "faiss_hnsw"):
            start = time.perf_counter()
            _, idx = knn_search(bank, queries, args.k, backend)
            seconds = time.perf_counter() - start
            if exact is None:
                exact = idx
            hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx, exact, strict=True))
            rows.append([n, backend, seconds, hits / exact.numel()])
        start = time.perf_counter()
        sklearn_accuracy(
            bank.numpy(),
            np.zeros(n, dtype=np.int64),
            queries.numpy(),
            np.zeros(len(queries), dtype=np.int64),
            args.k,
            args.temperature,
            args.sklearn_metric,
            args.threads,
        )
        rows.append([n, "scikit-learn (brute)", time.perf_counter() - start, 1.0])
        del bank
    print(
        f"\nk-NN search time vs bank size ({args.curve_queries} queries, dim {args.dim}, k={args.k}, "
        f"{args.threads} threads; one run each)\n"
    )
    print_markdown_table(["bank", "path", "seconds", "recall@k vs exact"], rows)
    print_json({"bench": "knn_curve", "rows": rows, **environment(args)})


def main() -> None:
    args = parse_args()
    if args.device != "cpu":
        print(
            f"note: both sides run on the CPU (FAISS CPU build, scikit-learn); --device {args.device} ignored"
        )
        args.device = "cpu"
    setup(args)
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(args.threads)
    bank, bank_y, queries, query_y, what = fashion_mnist_pixels() if args.real else synthetic(args)
    bank_np, bank_y_np = bank.numpy(), bank_y.numpy()
    queries_np, query_y_np = queries.numpy(), query_y.numpy()
    k, t = args.k, args.temperature
    accs: dict[str, float] = {}

    if args.curve:
        return cost_curve(args)

    def ours(n: int | None = None) -> None:
        accs["sslab"] = knn_accuracy(bank, bank_y, queries[:n], query_y[:n], k=k, temperature=t)

    def ours_torch(n: int | None = None) -> None:
        accs["sslab_torch"] = knn_accuracy(
            bank, bank_y, queries[:n], query_y[:n], k=k, temperature=t, backend="torch"
        )

    def theirs(n: int | None = None) -> None:
        accs["sklearn"] = sklearn_accuracy(
            bank_np, bank_y_np, queries_np[:n], query_y_np[:n], k, t, args.sklearn_metric, args.threads
        )

    sides = {SSLAB: ours, SSLAB_TORCH: ours_torch, "scikit-learn": theirs}
    with threadpool_limits(limits=args.threads):
        for _ in range(args.warmup):
            for side in sides.values():
                side(args.warmup_queries)
        times = time_interleaved(sides, 0, args.reps, torch.device("cpu"))
    sec = {name: median(v) for name, v in times.items()}
    speedup = sec["scikit-learn"] / sec[SSLAB]
    diff = max(abs(accs[a] - accs["sklearn"]) for a in ("sslab", "sslab_torch"))
    agree = diff <= 0.5

    print(
        f"\nk-NN evaluation (k={k}, T={t}), {what}: bank {bank.shape[0]} x {bank.shape[1]}, "
        f"{queries.shape[0]} queries, torch threads: {args.threads}, median of {args.reps} runs\n"
    )
    rows = []
    for name, acc in ((SSLAB, "sslab"), (SSLAB_TORCH, "sslab_torch"), ("scikit-learn", "sklearn")):
        label = f"scikit-learn ({args.sklearn_metric}, brute)" if acc == "sklearn" else name
        ratio = sec["scikit-learn"] / sec[name]
        rows.append(
            [label, sec[name], spread(times[name]), queries.shape[0] / sec[name], accs[acc], f"{ratio:.2f}x"]
        )
    print_markdown_table(
        ["implementation", "seconds", "min-max s", "queries / s", "top-1 (%)", "vs scikit-learn"], rows
    )
    print(f"\naccuracies {'agree' if agree else 'DIFFER'}: largest gap to scikit-learn {diff:.2f} points\n")
    import sklearn

    print_json(
        {
            "bench": "knn_eval",
            "features": "fashion_mnist_pixels" if args.real else "synthetic",
            "bank": int(bank.shape[0]),
            "queries": int(queries.shape[0]),
            "dim": int(bank.shape[1]),
            "k": k,
            "temperature": t,
            "seconds_sslab": round(sec[SSLAB], 4),
            "seconds_sslab_torch": round(sec[SSLAB_TORCH], 4),
            "seconds_sklearn": round(sec["scikit-learn"], 4),
            "speedup": round(speedup, 3),
            "top1_sslab": round(accs["sslab"], 3),
            "top1_sslab_torch": round(accs["sslab_torch"], 3),
            "top1_sklearn": round(accs["sklearn"], 3),
            "accuracy_agrees": agree,
            "sklearn_metric": args.sklearn_metric,
            "faiss": faiss.__version__,
            "sklearn": sklearn.__version__,
            **environment(args),
        }
    )
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
