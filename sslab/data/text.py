"""Offline text for image-text pretraining: a byte-level tokenizer and caption templates.

Byte-level (as in ByT5, Xue et al., 2022) so any caption or prompt tokenizes with no vocabulary file and no
hub download: id = UTF-8 byte + 3, with 0 = padding, 1 = start, 2 = end. Captions longer than the context
are cut, keeping the end token so the text tower always reads its summary position.
"""

from __future__ import annotations

import torch

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET

# Prompts for zero-shot classification and templated captions (CLIP's prompt-ensembling idea,
# Radford et al., 2021, with our own short list).
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of the {}.",
    "an image showing a {}.",
    "a close-up photo of a {}.",
)


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """(N, context_length) int64 ids: [BOS, bytes..., EOS, PAD...]; over-long texts keep BOS, the first
    context_length - 2 bytes, and EOS."""
    if context_length < 3:
        raise ValueError(f"context_length must be >= 3 (BOS, one byte, EOS); got {context_length}")
    out = torch.full((len(texts), context_length), PAD_ID, dtype=torch.int64)
    for row, text in enumerate(texts):
        body = [b + BYTE_OFFSET for b in text.encode("utf-8")[: context_length - 2]]
        ids = [BOS_ID, *body, EOS_ID]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def decode(ids: torch.Tensor) -> str:
    """Inverse of ``tokenize`` for one row (special tokens dropped)."""
    data = bytes(int(i) - BYTE_OFFSET for i in ids.tolist() if int(i) >= BYTE_OFFSET)
    return data.decode("utf-8", errors="replace")


def templated_caption(class_name: str, index: int) -> str:
    """A caption for a labelled image with no caption of its own; the template cycles with the index so
    the text tower sees more than one phrasing per class."""
    return PROMPT_TEMPLATES[index % len(PROMPT_TEMPLATES)].format(class_name)
