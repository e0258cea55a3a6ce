"""CLIP's contrastive objective (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021): a symmetric InfoNCE over scaled cosine similarities with a learnable temperature.

For L2-normalised image features I (B, E) and text features T (B, E), logits = exp(t) * I T^T and

    loss = (CE(logits, arange(B)) + CE(logits^T, arange(B))) / 2,

the mean of the image->text and text->image cross entropies (CLIP, Figure 3). t is learnable, starts at
log(1 / 0.07) and is clipped so the logits are never scaled by more than 100 (Sec. 2.5).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslab.modules.distributed import gather_with_grad, is_distributed

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


class LogitScale(nn.Module):
    """The learnable log-temperature t; ``forward`` returns exp(min(t, log 100)).

    CLIP clips the parameter itself after each optimiser step (``clamp_``), so a scale pushed to the cap can
    come back down; the clamp in ``forward`` only guards weights loaded from elsewhere. The parameter is a
    0-d tensor, so the AdamW groups never decay it (ndim <= 1).
    """

    def __init__(self, init: float = LOGIT_SCALE_INIT, max_value: float = LOGIT_SCALE_MAX) -> None:
        super().__init__()
        self.max_value = max_value
        self.logit_scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_value).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(max=self.max_value)


def symmetric_info_nce(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    all_image: torch.Tensor | None = None,
    all_text: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """CLIP loss of this process's rows (image, text: (B, E), normalised) against the columns of the global
    batch (all_image, all_text: (N, E); default: the local batch). Row i's positive is column offset + i.

    The image->text term scores each local image against every text, the text->image term each local text
    against every image; with one process this is exactly the formula in the module docstring.
    """
    all_image = image if all_image is None else all_image
    all_text = text if all_text is None else all_text
    labels = torch.arange(offset, offset + image.shape[0], device=image.device)
    logits_i2t = scale * image @ all_text.T
    logits_t2i = scale * text @ all_image.T
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``symmetric_info_nce`` with negatives from every rank: features are all-gathered with gradients (every
    rank's batch must have the same size, as the drop-last sampler guarantees). Each rank's loss is the mean
    over its own rows, so DDP's gradient average gives the gradient of the one-process loss on the global
    batch."""
    if not is_distributed():
        return symmetric_info_nce(image, text, scale)
    offset = dist.get_rank() * image.shape[0]
    return symmetric_info_nce(image, text, scale, gather_with_grad(image), gather_with_grad(text), offset)


def prompt_ensemble(text_features: torch.Tensor) -> torch.Tensor:
    """(C, T, E) text embeddings of C classes x T templates -> (C, E): normalise, mean over T, normalise
    (CLIP's prompt ensembling in embedding space, Sec. 3.1.4; the zero-shot classifier of an image-text model)."""
    return F.normalize(F.normalize(text_features, dim=-1).mean(dim=1), dim=-1)
