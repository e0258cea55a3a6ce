"""DiffMAE: diffusion models as masked autoencoders (Wei et al., "Diffusion Models as Masked Autoencoders",
ICCV 2023, arXiv 2304.03283). No official code exists; this follows the paper's description."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslab.errors import SSLabError
from sslab.modules.diffmae_decoder import DiffMAEDecoder
from sslab.modules.diffusion import SCHEDULES, GaussianDiffusion
from sslab.modules.masking import random_masking
from sslab.modules.patches import patchify, unpatchify

from .mae import MAE


class DiffMAE(MAE):
    """MAE whose decoder is a conditional diffusion model of the masked patches.

    Per image: mask patches at random (as MAE), encode the visible ones, draw a timestep t ~ U{1..T} and
    noise the masked patches' pixels with the closed form x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps. The
    decoder sees only the noised masked patches (plus their sin-cos positions and t) and reads the visible
    patches through cross-attention to the encoder; the loss is the MSE of its prediction on the masked
    patches. Sampling for pictures starts the masked patches from N(0, I) and denoises them with
    ``sample_steps`` ancestral DDPM steps (timesteps evenly spaced over T). Evaluation uses the encoder
    like MAE (``embed``; the linear probe gets MAE's BatchNorm).

    Defaults and where they come from:
    - ``prediction=x0``: the decoder predicts the pixels of the masked patches, not the noise (the paper,
      Fig. 3: "the decoder outputs are the predicted pixels"). ``eps`` is the DDPM alternative.
    - ``decoder_self_attention=true``: the paper's cross-self decoder (noised tokens also attend to each
      other); false gives its cross decoder. ``condition=top_down``: decoder blocks are connected top-down
      to the encoder blocks (the paper, Fig. 3): decoder block j cross-attends to the output of encoder block
      L-1-j (the last one after the encoder's final norm; blocks past the encoder's depth reuse the first).
      ``condition=last`` lets every decoder block read the final encoder output.
    - ``schedule=linear`` (DDPM's betas, Ho et al. 2020) with ``num_timesteps=1000``; ``cosine`` is Nichol &
      Dhariwal's (2021). We could not check the paper's text for its schedule here (our offline copy shows
      only its abstract and figure captions); both are standard, and linear is the default because it
      measured better for the encoder (300 steps on Fashion-MNIST: k-NN 70.45 vs 68.75): it spends more of
      the uniformly drawn timesteps at high noise, where the masked pixels must come from the encoder.
    - ``embed_pool=mean`` (conf/method/diffmae.yaml; MAE's is ``cls``): the loss reaches the CLS token only
      through the decoder's cross-attention, and the mean patch token is the better k-NN feature at CPU
      budgets (README, "DiffMAE at 300 steps").
    - mask ratio 0.75 and MAE's optimisation and crops, as the paper builds on MAE; the encoder is MAE's
      too (inherited: fixed 2-D sin-cos position embedding, xavier init, floored kept count, timm's
      weight-decay rule; facebookresearch/mae ``models_mae.py``, ``main_pretrain.py``).
    - ``norm_pix_loss=true``: the diffused x_0 is MAE's per-patch normalised pixels (unit scale, which suits
      a unit-variance noise process); set false to diffuse the channel-normalised pixels themselves.
    - the timestep enters as a sinusoidal embedding through an MLP, added to every noised token (as DDPM /
      ADM-style models do; the paper does not need more).
    """

    def __init__(
        self,
        *args,
        num_timesteps: int,
        schedule: str,
        prediction: str,
        sample_steps: int,
        decoder_self_attention: bool,
        condition: str,
        **kwargs,
    ) -> None:
        if schedule not in SCHEDULES:
            raise SSLabError(f"method.schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if prediction not in ("x0", "eps"):
            raise SSLabError(f"method.prediction={prediction!r}: choose x0 (the paper's) or eps")
        if condition not in ("top_down", "last"):
            raise SSLabError(f"method.condition={condition!r}: choose top_down (the paper's) or last")
        if num_timesteps < 1 or sample_steps < 1:
            raise SSLabError("method.num_timesteps and method.sample_steps must be >= 1")
        super().__init__(*args, decoder_options={"self_attention": decoder_self_attention}, **kwargs)
        self.prediction = prediction
        self.sample_steps = sample_steps
        self.condition = condition
        self.diffusion = GaussianDiffusion(schedule, num_timesteps)
        self.levels = self.context_levels()

    def build_decoder(self) -> nn.Module:
        return DiffMAEDecoder(self.backbone.embed_dim, self.patch_dim, **self.decoder_cfg)

    def context_levels(self) -> list[int]:
        """Encoder block whose output each decoder block reads; -1 means the final (normed) output."""
        depth = self.decoder_cfg["depth"]
        if self.condition == "last":
            return [-1] * depth
        num_blocks = len(self.backbone.vit.blocks)
        levels = [max(num_blocks - 1 - j, 0) for j in range(depth)]
        return [-1 if lvl == num_blocks - 1 else lvl for lvl in levels]

    # -- encoder -------------------------------------------------------------------------------------
    def encode(
        self, x: torch.Tensor, keep: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Encoder output for the kept patches and one context sequence (B, P + K, D) per decoder block."""
        wanted = sorted({lvl for lvl in self.levels if lvl >= 0})
        captured: dict[int, torch.Tensor] = {}
        blocks = self.backbone.vit.blocks
        handles = [
            blocks[i].register_forward_hook(lambda _m, _in, out, i=i: captured.__setitem__(i, out))
            for i in wanted
        ]
        try:
            out = self.backbone.forward_tokens(x, keep=keep)
        finally:
            for h in handles:
                h.remove()
        final = self.tokens_of(out)
        return out, [final if lvl < 0 else captured[lvl] for lvl in self.levels]

    def split_masked(self, restore: torch.Tensor, num_keep: int) -> torch.Tensor:
        """(B, M) indices of the masked patches (the tail of each sample's shuffle order)."""
        return restore.argsort(dim=1)[:, num_keep:]

    def mask_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = self.grid_of(x)
        n = grid[0] * grid[1]
        keep, mask, restore = random_masking(x.shape[0], n, self.mask_ratio, x.device)
        return keep, mask, self.split_masked(restore, keep.shape[1])

    def gather_patches(self, patches: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.gather(patches, 1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))

    # -- training ------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        x: torch.Tensor = batch["views"]
        keep, _, masked_idx = self.mask_patches(x)
        out, contexts = self.encode(x, keep)
        target, _, _ = self.pixel_targets(x)
        x0 = self.gather_patches(target, masked_idx)
        t = torch.randint(1, self.diffusion.num_steps + 1, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        pred = self.decoder(x_t, masked_idx, t, contexts, self.grid_of(x))
        loss = F.mse_loss(pred.float(), (x0 if self.prediction == "x0" else noise).float())
        return {"loss": loss, "features": self.probe_feature(x, out)}

    # -- sampling ------------------------------------------------------------------------------------
    def predict_x0(self, x_t, masked_idx, t: int, contexts, grid) -> torch.Tensor:
        tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        out = self.decoder(x_t, masked_idx, tt, contexts, grid)
        return out if self.prediction == "x0" else self.diffusion.x0_from_eps(x_t, tt, out)

    @torch.no_grad()
    def sample(
        self, x: torch.Tensor, keep: torch.Tensor, masked_idx: torch.Tensor, num_frames: int = 0
    ) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """Denoise the masked patches of normalised images ``x`` from pure noise; returns the final x_0
        (B, M, patch_dim) and ``num_frames`` intermediate (t, x_t) pairs, the first at t = T."""
        _, contexts = self.encode(x, keep)
        grid = self.grid_of(x)
        shape = (x.shape[0], masked_idx.shape[1], self.patch_dim)
        x_t = torch.randn(shape, device=x.device)
        ts = self.diffusion.sampling_timesteps(self.sample_steps)
        keep_at = {round(i * (len(ts) - 2) / max(num_frames - 1, 1)) for i in range(num_frames)}
        frames = []
        for i, (t, s) in enumerate(itertools.pairwise(ts)):
            if i in keep_at:
                frames.append((t, x_t))
            x0 = self.predict_x0(x_t, masked_idx, t, contexts, grid)
            x_t = self.diffusion.posterior_sample(x_t, x0, t, s, torch.randn_like(x_t))
        return x_t, frames

    def picture_columns(self, x: torch.Tensor, num_frames: int = 5) -> dict[str, torch.Tensor]:
        """Columns for the denoising picture, each (B, 3, H, W) in [0, 1]: the masked input, the masked
        patches at ``num_frames`` points of the sampling chain from pure noise (t = T) down, the final
        sample (t = 0), and the original. Visible patches are pasted in; normalised-pixel patches are shown
        with each patch's true mean and std put back."""
        keep, mask, masked_idx = self.mask_patches(x)
        sample, frames = self.sample(x, keep, masked_idx, num_frames)
        _, mean, std = self.pixel_targets(x)
        mean_m, std_m = self.gather_patches(mean, masked_idx), self.gather_patches(std, masked_idx)
        pixel_mask = self.patch_mask_image(mask, x)
        grid = self.grid_of(x)

        def paste(masked_patches: torch.Tensor) -> torch.Tensor:
            full = patchify(self.own_channels(x), self.patch_size).float()
            values = masked_patches.float() * std_m + mean_m
            full = full.scatter(1, masked_idx.unsqueeze(-1).expand(-1, -1, full.shape[-1]), values)
            img = unpatchify(full, self.patch_size, grid, self.target_channels)
            return self.to_pixels(torch.where(pixel_mask, img.to(x.dtype), x))  # grey: broadcast

        columns = {"masked": self.to_pixels(self.masked_input(x, mask))}
        for t, x_t in frames:
            columns[f"t={t}"] = paste(x_t)
        columns["t=0 (sample)"] = paste(sample)
        columns["original"] = self.to_pixels(x)
        return columns
