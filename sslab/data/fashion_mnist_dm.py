"""Fashion-MNIST DataModule: embedded 10k/2k subset, or the full 60k/10k set when Debian's package is installed."""

from __future__ import annotations

from sslab.data import fashion_mnist
from sslab.data.base import SSLDataModule
from sslab.data.datasets import ArrayDataset


class FashionMNISTDataModule(SSLDataModule):
    def __init__(self, source: str = "auto", root: str = str(fashion_mnist.DEBIAN_DIR), **kwargs) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.root = root
        self.class_names = list(fashion_mnist.CLASSES)

    def load_splits(self):
        (xtr, ytr), (xte, yte) = fashion_mnist.load(self.source, self.root)
        return ArrayDataset(xtr, ytr), ytr, ArrayDataset(xte, yte), yte
