"""JPEG decoding on the training device (``data.decode=gpu``): the DataLoader workers only read bytes.

Why: multi-crop training on a GPU starves on JPEG decoding in CPU workers (solo-learn needed NVIDIA DALI for
it). ``torchvision.io.decode_jpeg`` takes a whole batch of encoded files to nvjpeg in one call, with no extra
dependency. The decoded photos then get the same letterbox as ``sslab.data.imagefolder`` makes on the CPU
(long side resized bicubically to the load size, edge-repeating pad, alpha channel 255 on the photo and 0 on
the pad), so every view and evaluation caller sees the same tensor layout; values differ from the CPU path
only by decoder rounding and by PIL's reduced-DCT decode (``draft``) of large photos.

The device is a parameter (``decode_jpeg`` takes ``device="cpu"`` too), so the same functions run, and are
tested, on a machine without a GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

DECODE_MODES = ("cpu", "gpu")
# Full-resolution photos live on the device until resized: files go to nvjpeg this many at a time, and a
# resize call takes at most this many float elements (256 MB), so a batch of 12-Mpx phone photos fits.
DECODE_CHUNK = 64
RESIZE_ELEMENTS = 2**26


def letterbox_batch(
    images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], load_size: int
) -> torch.Tensor:
    """uint8 (C, h_i, w_i) photos -> uint8 (B, C + 1, load_size, load_size) letterboxed as
    ``sslab.data.imagefolder.letterbox`` does: antialiased bicubic (PIL's kernel, a = -0.5) to ``sizes[i]``
    (w, h), centred, pad repeating the edge pixels, last channel 255 on the photo and 0 on the pad. Photos of
    the same size are resized in one call (a folder of camera photos has few distinct sizes)."""
    device = images[0].device
    c = images[0].shape[0]
    out = torch.zeros(len(images), c + 1, load_size, load_size, dtype=torch.uint8, device=device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (im, (w, h)) in enumerate(zip(images, sizes, strict=True)):
        groups.setdefault((*im.shape[1:], h, w), []).append(i)
    for (h0, w0, h, w), same in groups.items():
        top, left = (load_size - h) // 2, (load_size - w) // 2
        pad = (left, load_size - w - left, top, load_size - h - top)
        step = max(1, RESIZE_ELEMENTS // (c * max(h0 * w0, load_size * load_size)))
        for k in range(0, len(same), step):
            idx = same[k : k + step]
            x = torch.stack([images[i] for i in idx]).float()
            if (h, w) != (h0, w0):
                x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            x = F.pad(x, pad, mode="replicate") if any(pad) else x
            ids = torch.tensor(idx, device=device)
            out[ids, :c] = x.round_().clamp_(0, 255).to(torch.uint8)
            out[ids, c, top : top + h, left : left + w] = 255
    return out


def decode_jpegs(
    data: Sequence[torch.Tensor], channels: int, device: torch.device | str
) -> list[torch.Tensor | None]:
    """Encoded JPEGs (uint8 1-D CPU tensors) -> uint8 (channels, h, w) on ``device``, the batch in one
    ``decode_jpeg`` call. When the batched call fails (a JPEG variant nvjpeg refuses, a corrupt file), each
    file is decoded alone, then by libjpeg on the CPU; None for a file neither decodes."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(list(data), mode=mode, device=device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for d in data:
                for where in (device, "cpu"):
                    try:
                        out.append(decode_jpeg(d, mode=mode, device=where).to(device))
                        break
                    except RuntimeError:
                        continue
                else:
                    out.append(None)
            return out


def decode_batch(
    encoded: Sequence[bytes],
    sizes: Sequence[tuple[int, int]],
    load_size: int,
    channels: int,
    device: torch.device | str,
    fallback: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A collated ``data.decode=gpu`` batch -> uint8 (B, channels + 1, load_size, load_size) on ``device``.

    ``encoded[i]`` is a JPEG file's bytes to be letterboxed with the photo at ``sizes[i]`` (w, h), or, where
    ``sizes[i]`` is (0, 0), the worker's CPU-path result: the letterboxed uint8 image's raw bytes.
    ``fallback(i)`` gives the letterboxed image of a JPEG no decoder takes (the DataModule: the CPU path,
    which replaces a broken file by the next readable one); without it such a file raises."""
    out = torch.empty(len(encoded), channels + 1, load_size, load_size, dtype=torch.uint8, device=device)
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731  (a writable copy)
    jpegs = [i for i, size in enumerate(sizes) if size[0] > 0]
    failed = []
    for k in range(0, len(jpegs), DECODE_CHUNK):
        chunk = jpegs[k : k + DECODE_CHUNK]
        photos = decode_jpegs([as_tensor(encoded[i]) for i in chunk], channels, device)
        failed += [i for i, p in zip(chunk, photos, strict=True) if p is None]
        done = [(i, p) for i, p in zip(chunk, photos, strict=True) if p is not None]
        if done:
            boxed = letterbox_batch([p for _, p in done], [sizes[i] for i, _ in done], load_size)
            out[torch.tensor([i for i, _ in done], device=out.device)] = boxed
    for i, size in enumerate(sizes):
        if size[0] == 0:
            out[i] = as_tensor(encoded[i]).view(channels + 1, load_size, load_size).to(device)
    for i in failed:
        if fallback is None:
            raise RuntimeError(f"JPEG {i} of the batch cannot be decoded on {device} or the CPU")
        out[i] = fallback(i).to(device)
    return out
