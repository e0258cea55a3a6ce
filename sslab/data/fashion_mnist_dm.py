"""Fashion-MNIST DataModule: embedded 10k/2k subset, or the full 60k/10k set when Debian's package is installed."""

from __future__ import annotations

from sslab.data import fashion_mnist
from sslab.data.base import SSLDataModule
from sslab.data.datasets import CaptionedArrayDataset
from sslab.data.text import PROMPT_TEMPLATES, templated_caption, tokenize


class FashionMNISTDataModule(SSLDataModule):
    """Batches carry "text": a caption templated from the class name (``templated_caption``), tokenized to
    ``context_length``; the (class, template) token rows are computed once."""

    provides = ("image", "label", "index", "text")

    def __init__(
        self,
        source: str = "auto",
        root: str = str(fashion_mnist.DEBIAN_DIR),
        context_length: int = 32,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.root = root
        self.context_length = context_length
        self.class_names = list(fashion_mnist.CLASSES)

    def caption_table(self):
        """(classes, templates, context_length) token ids of ``templated_caption(name, t)``."""
        n = len(PROMPT_TEMPLATES)
        captions = [templated_caption(name, t) for name in self.class_names for t in range(n)]
        return tokenize(captions, self.context_length).view(len(self.class_names), n, -1)

    def load_splits(self):
        (xtr, ytr), (xte, yte) = fashion_mnist.load(self.source, self.root)
        table = self.caption_table()
        return CaptionedArrayDataset(xtr, ytr, table), ytr, CaptionedArrayDataset(xte, yte, table), yte
