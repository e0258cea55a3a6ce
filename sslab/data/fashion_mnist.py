"""Fashion-MNIST (Xiao et al., 2017; MIT licence): the embedded default dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sslab.data.idx import read_idx
from sslab.errors import SSLabError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED = Path(__file__).resolve().parents[1] / "assets" / "fashion_mnist_subset.npz"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def full_available(root: Path = DEBIAN_DIR) -> bool:
    return all((root / f).is_file() for f in FILES.values())


def load_full(root: Path = DEBIAN_DIR) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The 60k/10k set from IDX files (Debian package ``dataset-fashion-mnist``)."""
    if not full_available(root):
        raise SSLabError(
            f"full Fashion-MNIST not found under {root}; install it with 'apt-get install dataset-fashion-mnist' "
            "or use data.source=embedded"
        )
    a = {k: read_idx(root / f) for k, f in FILES.items()}
    return (a["x_train"], a["y_train"].astype(np.int64)), (a["x_test"], a["y_test"].astype(np.int64))


def load_embedded() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The class-balanced 10k/2k subset shipped inside the package."""
    with np.load(EMBEDDED) as z:
        return (z["x_train"], z["y_train"].astype(np.int64)), (z["x_test"], z["y_test"].astype(np.int64))


def load(source: str = "auto", root: str | Path = DEBIAN_DIR):
    """``auto`` uses the full Debian set when installed, else the embedded subset."""
    root = Path(root)
    if source == "full" or (source == "auto" and full_available(root)):
        return load_full(root)
    if source in ("embedded", "auto"):
        return load_embedded()
    raise SSLabError(f"data.source must be auto, full or embedded, not {source!r}")
