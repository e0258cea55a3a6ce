"""WSP: weakly supervised image-text pretraining, CLIP-style (Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision", ICML 2021), the second stage of MAE -> WSP (Singh et al., "The
effectiveness of MAE pre-pretraining for billion-scale pretraining", ICCV 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslab.augment.mae_views import MAEViews
from sslab.data.text import PROMPT_TEMPLATES, tokenize
from sslab.errors import SSLabError
from sslab.eval_mode import eval_mode
from sslab.modules.clip_loss import LogitScale, clip_loss, prompt_ensemble
from sslab.modules.text_tower import TextTower

from .base import SSLMethod


class WSP(SSLMethod):
    """Two towers trained with the symmetric InfoNCE of ``sslab.modules.clip_loss``.

    Image tower: ``self.backbone`` (any backbone; its CLS / pooled feature) -> linear projection to
    ``embed_dim``. Text tower: ``TextTower`` over byte tokens (batch key ``text``). Both outputs are L2
    normalised; the logit scale is learnable (init log(1/0.07), clipped at log 100 after every step).
    ``embed`` is the backbone feature before the projection, so k-NN / linear probes and ``init_from``
    (an MAE encoder into ``self.backbone``) work as for every other method. Views: random resized crop
    (scale ``views.scale``) + flip, batched on the device (``MAEViews`` with WSP's parameters).
    """

    weight_decay_rule = "clip"  # OpenCLIP training/main.py
    zero_shot = True  # encode_image_uint8 + class_embeddings

    required_keys = ("image", "text")

    def __init__(
        self,
        *args,
        embed_dim: int,
        context_length: int,
        text_width: int,
        text_depth: int,
        text_heads: int,
        text_mlp_ratio: float,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.embed_dim = embed_dim
        self.image_proj = nn.Linear(self.backbone.embed_dim, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.backbone.embed_dim**-0.5)  # CLIP's proj init
        try:
            self.text_tower = TextTower(
                embed_dim, context_length, text_width, text_depth, text_heads, text_mlp_ratio
            )
        except ValueError as e:
            raise SSLabError(f"method.text_*: {e}") from e
        self.logit_scale = LogitScale()
        self.context_length = context_length

    # -- parts ---------------------------------------------------------------------------------------
    def make_views(self) -> nn.Module:
        return MAEViews(self.data.image_size, self.data.mean, self.data.std, **self.view_cfg)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone, self.image_proj, self.text_tower, self.logit_scale]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) normalised image embeddings of normalised float images."""
        return F.normalize(self.image_proj(self.backbone(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) normalised text embeddings of (B, L) token ids."""
        return F.normalize(self.text_tower(tokens), dim=-1)

    @torch.no_grad()
    def encode_image_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings of raw uint8 images through the evaluation view, in eval mode."""
        return self.embed_uint8(images, self.encode_image)

    @torch.no_grad()
    def class_embeddings(
        self, class_names: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES
    ) -> torch.Tensor:
        """(C, embed_dim) zero-shot classifier: every class name in every template through the text tower,
        in eval mode (``sslab.modules.clip_loss.prompt_ensemble`` averages them)."""
        with eval_mode(self):
            prompts = [t.format(name) for name in class_names for t in templates]
            tokens = tokenize(prompts, self.context_length).to(self.device)
            feats = self.encode_text(tokens).float().view(len(class_names), len(templates), -1)
            return prompt_ensemble(feats)

    # -- training ------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        h = self.backbone(batch["views"])
        image = F.normalize(self.image_proj(h), dim=-1)
        text = self.encode_text(batch["text"])
        scale = self.logit_scale()
        loss = clip_loss(image, text, scale)
        return {"loss": loss, "features": h, "logs": {"logit_scale": scale.detach()}}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.logit_scale.clamp_()  # CLIP clips the temperature parameter after the optimiser step
