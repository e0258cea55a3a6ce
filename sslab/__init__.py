"""sslab: self-supervised pretraining for vision on PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
