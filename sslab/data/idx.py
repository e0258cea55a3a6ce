"""Reader for the gzip IDX files the MNIST family ships in."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def read_idx(path: str | Path) -> np.ndarray:
    """Decode one IDX file (optionally gzipped) into a uint8 array of its stated shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    # a bytearray, so the array is writable (torch.from_numpy of a read-only buffer warns)
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
