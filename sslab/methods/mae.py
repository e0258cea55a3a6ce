"""MAE: masked autoencoders (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslab.augment.mae_views import MAEViews
from sslab.augment.multicrop import eval_view
from sslab.errors import SSLabError
from sslab.eval_mode import eval_mode
from sslab.modules.mae_decoder import MAEDecoder
from sslab.modules.masking import random_masking
from sslab.modules.patches import masked_mse, normalized_patches, patchify, unpatchify

from .base import SSLMethod


class MAE(SSLMethod):
    """Mask ``mask_ratio`` of the patches at random per image (argsort of uniform noise), encode the visible
    patches only (``backbone.forward_tokens(x, keep=...)``), and let a light decoder (mask tokens, fixed
    sin-cos position embeddings) predict the pixels of every patch. The loss is the MSE on the masked
    patches, against per-patch normalised pixels when ``norm_pix_loss`` (eps 1e-6).

    The encoder follows the official recipe (facebookresearch/mae ``models_mae.py``, ``main_pretrain.py``):
    a fixed 2-D sin-cos position embedding (``requires_grad=False``, zero rows for the prefix tokens; see
    ``ViTBackbone.use_fixed_sincos_pos_embed``), ``initialize_weights``' xavier-uniform init (linear layers
    and the patch embedding viewed as a linear layer, tokens normal std 0.02, unit LayerNorms) for encoder
    and decoder, ``int(N * (1 - mask_ratio))`` kept patches (floor), and timm's weight-decay rule
    (``weight_decay_rule = "timm"``: no decay on biases and 1-D parameters; cls and mask tokens are decayed).

    Paper values (ViT-B/L, ImageNet): mask ratio 0.75, decoder 512-d x 8 blocks (16 heads), AdamW betas
    (0.9, 0.95), weight decay 0.05, lr 1.5e-4 x batch / 256 (scaled by the base class), 40 warm-up epochs,
    cosine decay; crops RandomResizedCrop(0.2, 1) + flip only. Evaluation features (``embed``) are the
    encoder's CLS token (or the mean patch token, ``embed_pool=mean``) of the whole unmasked image; the
    linear probe puts a BatchNorm without affine before the linear layer (``probe_batchnorm``).

    ``probe_features`` says what the online probe trains on during pre-training: ``full`` runs the encoder
    once more, without gradients, on the unmasked view so that it sees the same features as at evaluation;
    ``visible`` reuses the CLS of the masked forward (free, but a different input distribution).
    """

    requires_masking = True
    reconstructs = True
    probe_batchnorm = True
    weight_decay_rule = "timm"  # main_pretrain.py: optim_factory.add_weight_decay(model, wd), no skip list
    supports_flexi = False  # the decoder's patch size and pixel targets are fixed at construction

    def __init__(
        self,
        *args,
        mask_ratio: float,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        decoder_mlp_ratio: float,
        norm_pix_loss: bool,
        embed_pool: str,
        probe_features: str,
        decoder_options: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        if not 0.0 < mask_ratio < 1.0:
            raise SSLabError(f"method.mask_ratio={mask_ratio} must be in (0, 1); MAE uses 0.75")
        if embed_pool not in ("cls", "mean"):
            raise SSLabError(f"method.embed_pool={embed_pool!r}: choose cls or mean")
        if probe_features not in ("full", "visible"):
            raise SSLabError(f"method.probe_features={probe_features!r}: choose full or visible")
        super().__init__(*args, **kwargs)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.embed_pool = embed_pool
        self.probe_features = probe_features
        self.patch_size = self.backbone.patch_size
        # Pixel targets and the decoder's output are in the data's own channels: the views repeat grey to
        # RGB for the encoder, but predicting three copies of a grey channel lets the decoder draw colour.
        self.target_channels = self.data.channels
        self.patch_dim = self.patch_size**2 * self.target_channels
        self.decoder_cfg = {
            "dim": decoder_dim,
            "depth": decoder_depth,
            "num_heads": decoder_heads,
            "mlp_ratio": decoder_mlp_ratio,
            **(decoder_options or {}),  # a subclass's decoder settings (DiffMAE: self_attention)
        }
        self.init_encoder()
        self.decoder = self.build_decoder()

    # -- parts ---------------------------------------------------------------------------------------
    def build_decoder(self) -> nn.Module:
        return MAEDecoder(
            self.backbone.embed_dim,
            self.patch_dim,
            num_prefix_tokens=self.backbone.num_prefix_tokens,
            **self.decoder_cfg,
        )

    def init_encoder(self) -> None:
        """MAE's encoder: the fixed sin-cos position table and ``initialize_weights``' xavier init
        (facebookresearch/mae ``models_mae.py``), instead of timm's learned table and trunc-normal init.
        Only this method's backbone is changed; the decoders initialise themselves the same way."""
        self.backbone.use_fixed_sincos_pos_embed()
        self.backbone.init_weights_xavier()

    def make_views(self) -> nn.Module:
        return MAEViews(self.data.image_size, self.data.mean, self.data.std, **self.view_cfg)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone, self.decoder]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_tokens(images)
        return out["cls"] if self.embed_pool == "cls" else out["patch"].mean(1)

    # -- helpers shared with DiffMAE -----------------------------------------------------------------
    def grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def tokens_of(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The encoder's output sequence (B, P + K, D): CLS (when the ViT has one), registers, patches."""
        n_cls = self.backbone.num_prefix_tokens - out["reg"].shape[1]
        return torch.cat([out["cls"].unsqueeze(1)] * n_cls + [out["reg"], out["patch"]], dim=1)

    def own_channels(self, x: torch.Tensor) -> torch.Tensor:
        """The view in the data's own channels: the first of the repeated grey channels (all equal)."""
        return x[:, : self.target_channels]

    def pixel_targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target, mean, std) per patch of the view in the data's own channels; mean 0 / std 1 when
        targets are not normalised."""
        patches = patchify(self.own_channels(x), self.patch_size)
        if self.norm_pix_loss:
            return normalized_patches(patches, eps=1e-6)
        return patches, torch.zeros_like(patches[..., :1]), torch.ones_like(patches[..., :1])

    def probe_feature(self, x: torch.Tensor, visible_out: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.probe_features == "full":
            with torch.no_grad():
                return self.embed(x)
        return visible_out["cls"] if self.embed_pool == "cls" else visible_out["patch"].mean(1)

    # -- training ------------------------------------------------------------------------------------
    def forward_masked(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        grid = self.grid_of(x)
        keep, mask, restore = random_masking(x.shape[0], grid[0] * grid[1], self.mask_ratio, x.device)
        out = self.backbone.forward_tokens(x, keep=keep)
        pred = self.decoder(self.tokens_of(out), restore, grid)
        return {"pred": pred, "mask": mask, "encoder": out}

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        x: torch.Tensor = batch["views"]
        fwd = self.forward_masked(x)
        target, _, _ = self.pixel_targets(x)
        loss = masked_mse(fwd["pred"], target, fwd["mask"])
        return {"loss": loss, "features": self.probe_feature(x, fwd["encoder"])}

    # -- pictures ------------------------------------------------------------------------------------
    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised views back to [0, 1] RGB for display."""
        mean = torch.as_tensor(self.data.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.as_tensor(self.data.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)

    def masked_input(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The view with its masked patches greyed out (pixel value 0.5)."""
        grey = (0.5 - torch.as_tensor(self.data.mean, device=x.device, dtype=x.dtype)) / torch.as_tensor(
            self.data.std, device=x.device, dtype=x.dtype
        )
        return torch.where(self.patch_mask_image(mask, x), grey.view(1, -1, 1, 1), x)

    def patch_mask_image(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, N) patch mask -> (B, 1, H, W) pixel mask."""
        gh, gw = self.grid_of(x)
        m = mask.view(-1, 1, gh, gw).to(x.dtype)
        return m.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3).bool()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, seed: int = 0, **options: Any) -> dict[str, torch.Tensor]:
        """Picture columns (``picture_columns``) of uint8 ``images`` through the evaluation view, in eval
        mode, with the masks (and any noise) drawn from ``seed`` without touching the run's random state."""
        with eval_mode(self):
            x = eval_view(images.to(self.device), self.data.image_size, self.data.mean, self.data.std)
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.manual_seed(seed)
                return self.picture_columns(x, **options)

    def picture_columns(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Columns for the reconstruction picture, each (B, 3, H, W) in [0, 1]: the masked input, the
        reconstruction (predicted masked patches pasted between the visible ones) and the original.

        With ``norm_pix_loss`` the model predicts normalised patches; they are shown with each patch's true
        mean and std put back, as the MAE paper's figures do for such models.
        """
        fwd = self.forward_masked(x)
        _, mean, std = self.pixel_targets(x)
        pred = fwd["pred"].float() * std + mean
        pred = unpatchify(pred, self.patch_size, self.grid_of(x), self.target_channels).to(x.dtype)
        pasted = torch.where(self.patch_mask_image(fwd["mask"], x), pred, x)  # grey broadcasts to RGB
        return {
            "masked": self.to_pixels(self.masked_input(x, fwd["mask"])),
            "reconstruction": self.to_pixels(pasted),
            "original": self.to_pixels(x),
        }
