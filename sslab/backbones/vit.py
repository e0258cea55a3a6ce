"""timm Vision Transformers with registers, masking, any input size and any patch size (FlexiViT)."""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from sslab.backbones.base import Backbone
from sslab.backbones.flexi import fit_to_patch_grid, pi_resize_kernel, resize_pos_embed
from sslab.backbones.pos_embed import sincos_2d


class ViTBackbone(Backbone):
    """A timm ``VisionTransformer`` with pos-embed interpolation (``dynamic_img_size``) for any crop size.

    Register tokens follow Darcet et al., "Vision Transformers Need Registers" (2024).

    Patch size (FlexiViT, Beyer et al. 2023; see ``sslab.backbones.flexi``): the kernel and the position
    embeddings are stored at the configured ``patch_size`` and its grid (``base_patch_size``). ``patch_size``
    is the size the next forward uses: in training mode the one set by ``set_patch_size`` (the method draws
    it per step when ``flexi`` is on), else ``eval_patch_size`` (the configured size unless an evaluation
    changes it). Any size other than the stored one, and every forward of a ``flexi`` model, goes through
    the PI-resized kernel and bilinearly resized position embeddings; inputs that the size does not divide
    are resized to the nearest multiple. At the stored size a non-flexi model runs timm's own path.
    """

    supports_masking = True

    def __init__(
        self,
        timm_name: str,
        img_size: int,
        patch_size: int,
        num_registers: int = 0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        flexi: bool = False,
        flexi_patch_sizes: Sequence[int] = (),
        **timm_kwargs,
    ) -> None:
        super().__init__()
        self.vit = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            reg_tokens=num_registers,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            **timm_kwargs,
        )
        self.embed_dim = self.vit.embed_dim
        self.base_patch_size = patch_size
        self.eval_patch_size = patch_size
        self.flexi = flexi
        self.flexi_patch_sizes = tuple(int(p) for p in flexi_patch_sizes)
        self._train_patch_size: int | None = None
        self.num_registers = num_registers
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)

    # -- patch size ----------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        """The patch size of the next forward (grid = image size // patch_size for masks and targets)."""
        if self.training and self._train_patch_size is not None:
            return self._train_patch_size
        return self.eval_patch_size

    def set_patch_size(self, patch_size: int | None) -> None:
        """Patch size of training-mode forwards (FlexiViT's per-step draw); None falls back to
        ``eval_patch_size``. Evaluation-mode forwards always use ``eval_patch_size``."""
        self._train_patch_size = None if patch_size is None else int(patch_size)

    def _flexible_path(self) -> bool:
        return self.flexi or self.patch_size != self.base_patch_size

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch embeddings (B, H / p, W / p, D) at the current patch size."""
        pe = self.vit.patch_embed
        if not self._flexible_path():
            return pe(x)
        p = self.patch_size
        x = fit_to_patch_grid(x, p)
        weight = pi_resize_kernel(pe.proj.weight, p)
        tokens = F.conv2d(x, weight, pe.proj.bias, stride=p).permute(0, 2, 3, 1)
        return pe.norm(tokens)

    def add_pos_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) patch tokens -> (B, P + h*w, D) with prefix tokens and position embeddings."""
        vit = self.vit
        if not self._flexible_path():
            return vit._pos_embed(tokens)
        b, h, w, d = tokens.shape
        x = tokens.reshape(b, h * w, d)
        prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if vit.pos_embed is not None:
            n_pos_prefix = 0 if vit.no_embed_class else self.num_prefix_tokens
            grid_pos = vit.pos_embed[:, n_pos_prefix:]
            x = x + resize_pos_embed(grid_pos, vit.patch_embed.grid_size, (h, w))
            if prefix and n_pos_prefix:
                prefix = [torch.cat(prefix, dim=1) + vit.pos_embed[:, :n_pos_prefix]]
        return vit.pos_drop(torch.cat([*prefix, x], dim=1))

    # -- MAE's encoder recipe (opt-in; other methods keep timm's learned table and init) -------------
    def use_fixed_sincos_pos_embed(self) -> None:
        """Replace timm's learned position embedding by MAE's fixed one (facebookresearch/mae
        ``util/pos_embed.py``, ``models_mae.py``): the 2-D sin-cos table of the stored patch grid (first
        half of the channels encodes the column, second half the row), zero rows for the prefix tokens,
        ``requires_grad=False`` so no optimizer sees it. At another grid timm's ``dynamic_img_size`` path
        (or the FlexiViT path) interpolates it, as the official ``interpolate_pos_embed`` does."""
        vit = self.vit
        if vit.pos_embed is None:
            raise ValueError("this ViT has no absolute position embedding to replace")
        grid = tuple(vit.patch_embed.grid_size)
        n_prefix = 0 if vit.no_embed_class else self.num_prefix_tokens
        table = sincos_2d(self.embed_dim, grid)
        table = torch.cat([table.new_zeros(n_prefix, self.embed_dim), table], dim=0)
        with torch.no_grad():
            vit.pos_embed.copy_(table.unsqueeze(0).to(vit.pos_embed.dtype))
        vit.pos_embed.requires_grad_(False)

    def init_weights_xavier(self) -> None:
        """MAE's ``initialize_weights`` (facebookresearch/mae ``models_mae.py``) for this encoder: the patch
        embedding kernel xavier-uniform as a linear layer (viewed as (out, in*p*p); its bias keeps PyTorch's
        default), the cls token (and register / mask tokens, which MAE lacks) normal std 0.02, every
        ``nn.Linear`` xavier-uniform with zero bias, every LayerNorm weight 1 and bias 0. The fixed position
        table is left alone."""
        w = self.vit.patch_embed.proj.weight
        with torch.no_grad():
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for token in (self.vit.cls_token, self.vit.reg_token, self.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        for m in self.vit.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- forward -------------------------------------------------------------------------------------
    def forward_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        vit = self.vit
        tokens = self.embed_patches(x)  # (B, H', W', D)
        if mask is not None:
            b, h, w, _ = tokens.shape
            tokens = torch.where(mask.view(b, h, w, 1), self.mask_token.to(tokens.dtype), tokens)
        tokens = self.add_pos_embed(tokens)  # prefix tokens + position embeddings, (B, P + N, D)
        p = self.num_prefix_tokens
        if keep is not None:
            kept = torch.gather(tokens[:, p:], 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
            tokens = torch.cat([tokens[:, :p], kept], dim=1)
        tokens = vit.norm_pre(tokens)
        tokens = vit.blocks(tokens)
        tokens = vit.norm(tokens)
        n_cls = 1 if vit.cls_token is not None else 0
        return {
            "cls": tokens[:, 0] if n_cls else tokens[:, p:].mean(1),
            "reg": tokens[:, n_cls:p],
            "patch": tokens[:, p:],
        }
