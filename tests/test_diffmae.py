"""DiffMAE: noise schedules and q(x_t | x_0) against the published formulas, the posterior step, the
decoder's conditioning, and a short real training run with its denoising picture."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from sslab.build import build_datamodule, build_method
from sslab.errors import SSLabError
from sslab.modules.diffusion import GaussianDiffusion, cosine_alpha_bar, linear_alpha_bar
from tests.test_mae import csv_losses, mim_cfg


def reference_alpha_bar(betas: list[float]) -> list[float]:
    out, prod = [1.0], 1.0
    for b in betas:
        prod *= 1 - b
        out.append(prod)
    return out


def test_cosine_schedule_matches_nichol_dhariwal():
    T, s = 1000, 0.008
    ab = cosine_alpha_bar(T)
    assert ab.shape == (T + 1,) and ab[0].item() == 1.0
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = [min(1 - f[t] / f[t - 1], 0.999) for t in range(1, T + 1)]
    ref = reference_alpha_bar(betas)
    assert ab.tolist() == pytest.approx(ref, rel=1e-9, abs=1e-15)
    # hand values: alpha_bar_1 = f(1) / f(0) = 0.999958..., the half-way point is cos^2(~pi/4) ~ 0.49,
    # and the last beta is clipped at 0.999, so alpha_bar_T = 0.001 * alpha_bar_{T-1} ~ 0
    assert ab[1].item() == pytest.approx(f[1] / f[0], rel=1e-12)
    assert ab[1].item() == pytest.approx(0.9999587, abs=1e-6)
    assert ab[500].item() == pytest.approx(math.cos((0.5 + s) / (1 + s) * math.pi / 2) ** 2 / f[0], rel=1e-9)
    assert ab[T].item() == pytest.approx(0.001 * ab[T - 1].item(), rel=1e-9) and ab[T].item() < 1e-8
    assert (ab[1:] < ab[:-1]).all()


def test_linear_schedule_matches_ddpm():
    ab = linear_alpha_bar(1000)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert ab.tolist() == pytest.approx(reference_alpha_bar(betas), rel=1e-9)
    assert ab[1].item() == pytest.approx(1 - 1e-4, rel=1e-12)
    assert ab[1000].item() == pytest.approx(4.04e-5, rel=0.01)  # DDPM's alpha_bar_T
    # other T: the betas scale by 1000 / T so the chain still ends near pure noise
    assert linear_alpha_bar(100)[1].item() == pytest.approx(1 - 1e-3, rel=1e-12)
    assert linear_alpha_bar(100)[100].item() < 1e-3


def test_q_sample_is_the_closed_form_forward_process():
    d = GaussianDiffusion("cosine", 1000)
    x0 = torch.tensor([[[1.0, -2.0]], [[0.5, 3.0]]])
    noise = torch.tensor([[[0.5, 0.25]], [[-1.0, 2.0]]])
    t = torch.tensor([10, 700])
    xt = d.q_sample(x0, t, noise)
    for i in range(2):
        a = d.alpha_bar[t[i]].item()
        hand = [
            math.sqrt(a) * x0[i, 0, j].item() + math.sqrt(1 - a) * noise[i, 0, j].item() for j in range(2)
        ]
        assert xt[i, 0].tolist() == pytest.approx(hand, rel=1e-6)
    # statistically: q(x_t | x_0) = N(sqrt(ab) x_0, (1 - ab) I)
    torch.manual_seed(0)
    x0 = torch.full((200_000, 1), 2.0)
    tt = torch.full((200_000,), 300)
    xt = d.q_sample(x0, tt, torch.randn_like(x0))
    a = d.alpha_bar[300].item()
    assert xt.mean().item() == pytest.approx(2 * math.sqrt(a), abs=0.01)
    assert xt.var().item() == pytest.approx(1 - a, abs=0.01)
    # x_0 <-> eps conversions invert each other
    eps = torch.randn(4, 3, 5)
    x0 = torch.randn(4, 3, 5)
    tt = torch.tensor([1, 50, 500, 999])
    xt = d.q_sample(x0, tt, eps)
    assert torch.allclose(d.eps_from_x0(xt, tt, x0), eps, atol=1e-4)
    assert torch.allclose(d.x0_from_eps(xt, tt, eps), x0, atol=1e-4)


def test_posterior_one_step_is_ddpm_posterior():
    d = GaussianDiffusion("linear", 1000)
    t = 400
    ab_t, ab_s = d.alpha_bar[t].item(), d.alpha_bar[t - 1].item()
    beta = 1 - ab_t / ab_s
    x0, xt = torch.tensor([1.5]), torch.tensor([-0.5])
    # Ho et al. Eq. 7: mean = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0 + sqrt(alpha_t)(1 - ab_{t-1}) / (1 - ab_t) xt
    mean = math.sqrt(ab_s) * beta / (1 - ab_t) * 1.5 + math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t) * -0.5
    var = (1 - ab_s) / (1 - ab_t) * beta
    assert d.posterior_sample(xt, x0, t, t - 1, torch.zeros(1)).item() == pytest.approx(mean, rel=1e-5)
    assert d.posterior_sample(xt, x0, t, t - 1, torch.ones(1)).item() == pytest.approx(
        mean + math.sqrt(var), rel=1e-5
    )
    assert torch.equal(d.posterior_sample(xt, x0, t, 0, torch.ones(1)), x0)
    assert d.sampling_timesteps(4) == [1000, 750, 500, 250, 0]


def test_decoder_reads_the_visible_patches_and_blocks_connect_top_down(tmp_path):
    cfg = mim_cfg(tmp_path, "diffmae", "method.decoder_depth=3")
    model = build_method(cfg, build_datamodule(cfg))
    assert model.levels == [-1, 0, 0]  # 2 encoder blocks: last (normed) output, then block 0, reused
    assert model.probe_batchnorm and model.requires_masking
    torch.manual_seed(0)
    x = torch.randn(2, 3, 28, 28)
    keep, mask, masked_idx = model.mask_patches(x)
    assert masked_idx.shape == (2, 12) and mask.gather(1, masked_idx).all()
    x_t = torch.randn(2, 12, model.patch_dim)
    t = torch.tensor([5, 500])

    def decode(images):
        _, contexts = model.encode(images, keep)
        return model.decoder(x_t, masked_idx, t, contexts, (4, 4))

    base = decode(x)
    changed_masked = x.clone()
    rows, cols = divmod(masked_idx[0, 0].item(), 4)
    changed_masked[0, :, rows * 7 : rows * 7 + 7, cols * 7 : cols * 7 + 7] += 5.0
    assert torch.allclose(decode(changed_masked), base, atol=1e-6)  # masked pixels reach it only via x_t
    changed_visible = x.clone()
    rows, cols = divmod(keep[0, 0].item(), 4)
    changed_visible[0, :, rows * 7 : rows * 7 + 7, cols * 7 : cols * 7 + 7] += 5.0
    assert not torch.allclose(decode(changed_visible)[0], base[0], atol=1e-4)


def test_bad_options_are_refused(tmp_path):
    cfg = mim_cfg(tmp_path, "diffmae", "method.prediction=v")
    with pytest.raises(SSLabError, match=r"method.prediction='v': choose x0"):
        build_method(cfg, build_datamodule(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["method.prediction=eps", "method.schedule=cosine"]])
def test_diffmae_trains_end_to_end_with_falling_loss_and_pictures(tmp_path, extra):
    from sslab.runs.training import train

    cfg = mim_cfg(
        tmp_path,
        "diffmae",
        "trainer.max_steps=40",
        "method.base_lr=1.5e-2",
        "method.warmup_epochs=0",
        "method.sample_steps=10",
        "callbacks=[knn,reconstruction]",
        *extra,
    )
    metrics = train(cfg)
    losses = csv_losses(tmp_path)
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8
    assert 0 <= metrics["eval/knn_top1"] <= 100
    with Image.open(tmp_path / "images" / "reconstruction_step000040.png") as im:
        # masked | 5 chain frames | sample | original, 8 rows, 28 px cells enlarged 4x with 2 px padding
        assert im.size == (8 * (112 + 2) + 2, 8 * (112 + 2) + 2)
