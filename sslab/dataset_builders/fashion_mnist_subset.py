"""Build the class-balanced Fashion-MNIST subset shipped in ``sslab/assets``.

python -m sslab.dataset_builders.fashion_mnist_subset  (needs Debian's dataset-fashion-mnist; deterministic for a seed)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sslab.data.fashion_mnist import DEBIAN_DIR, EMBEDDED, load_full


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=str(DEBIAN_DIR))
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(EMBEDDED))
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    (xtr, ytr), (xte, yte) = load_full(Path(args.root))
    itr = balanced_indices(ytr, args.train_per_class, rng)
    ite = balanced_indices(yte, args.test_per_class, rng)
    np.savez_compressed(args.out, x_train=xtr[itr], y_train=ytr[itr], x_test=xte[ite], y_test=yte[ite])
    print(f"wrote {args.out}: {len(itr)} train, {len(ite)} test")


if __name__ == "__main__":
    main()
