"""DataModules yield uint8 tensors; views are made on the training device (see sslab.augment)."""

from sslab.data.atari import AtariDataModule
from sslab.data.base import SSLDataModule
from sslab.data.fashion_mnist_dm import FashionMNISTDataModule
from sslab.data.imagefolder import ImageFolderDataModule
from sslab.data.stamps import StampsDataModule

__all__ = [
    "AtariDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "SSLDataModule",
    "StampsDataModule",
]
