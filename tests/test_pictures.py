"""Pictures (issue 16, item 7): the patch-feature PCA beside the attention maps and the nearest-neighbour grid of
DINO-family runs; and trainer=debug (item 8), which skips evaluation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from sslab.callbacks.pictures import neighbour_grid, patch_pca, pca_grid, principal_components
from tests.conftest import CONF


def test_pca_of_constructed_tokens_recovers_the_components():
    """Tokens = 3 orthogonal directions with uncorrelated coefficients of variance 9 > 4 > 1 (+ tiny noise) on an 8x8 grid of 2 images:
    the first 3 components are those directions in that order, and each RGB channel is its pattern."""
    g = torch.Generator().manual_seed(0)
    d, b, side = 16, 2, 8
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :3].T  # 3 orthonormal directions
    raw = torch.randn(b * side * side, 3, generator=g)
    white = torch.linalg.qr(raw - raw.mean(0))[0]  # centred, exactly uncorrelated columns
    coeffs = white * torch.tensor([3.0, 2.0, 1.0]) * (b * side * side) ** 0.5
    tokens = coeffs @ basis + 5.0 + 1e-4 * torch.randn(b * side * side, d, generator=g)
    mean, comps = principal_components(tokens, 3)
    for i in range(3):
        assert abs(torch.dot(comps[i].float(), basis[i]).abs().item() - 1) < 1e-3, i
    assert torch.allclose(mean.float(), tokens.mean(0), atol=1e-5)
    rgb = patch_pca(tokens.view(b, side * side, d))
    assert rgb.shape == (b, 3, side, side) and rgb.min() >= 0 and rgb.max() <= 1
    for i in range(3):  # channel i = component i's projection, min-max scaled over both images
        channel = rgb[:, i].flatten()
        expected = coeffs[:, i] * torch.sign(torch.dot(comps[i].float(), basis[i]))
        expected = (expected - expected.min()) / (expected.max() - expected.min())
        assert torch.allclose(channel, expected, atol=1e-3), i
        assert channel.min() == 0 and channel.max() == 1


def test_sign_is_fixed_and_grids_are_bounded():
    tokens = torch.randn(3, 16, 8)
    # the components depend on the covariance only (sign fixed by the loadings), so negated features give the
    # negated projections: the inverted picture
    assert torch.allclose(patch_pca(tokens), 1 - patch_pca(-tokens), atol=1e-5)
    _, comps = principal_components(tokens.flatten(0, 1))
    assert (comps.gather(1, comps.abs().argmax(1, keepdim=True)) > 0).all()  # largest loading positive
    pictures = torch.rand(3, 3, 224, 224)
    grid = pca_grid(pictures, patch_pca(tokens), scale=4, max_size=512)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3 and max(grid.shape[:2]) <= 512
    grid = neighbour_grid(torch.rand(4, 3, 28, 28), torch.rand(4, 5, 3, 28, 28), torch.rand(4, 5) > 0.5)
    assert grid.shape[0] <= 1024 and grid.shape[1] <= 1024 and grid.shape[1] > grid.shape[0]


@pytest.mark.slow
def test_dino_run_writes_attention_pca_and_neighbour_pngs(tmp_path):
    from sslab.runs.training import train
    from tests.conftest import make_cfg

    cfg = make_cfg(tmp_path, "trainer.max_steps=2", "callbacks=[knn,attention_maps]")
    train(cfg)
    for folder, name in (
        ("attention_maps", "step000002"),
        ("attention_maps", "pca_step000002"),
        ("neighbours", "step000002"),
    ):
        path = tmp_path / folder / f"{name}.png"
        assert path.is_file(), path
        with Image.open(path) as im:
            assert im.mode == "RGB" and max(im.size) <= 1024
    with Image.open(tmp_path / "neighbours" / "step000002.png") as im:
        assert im.size[0] > im.size[1]  # 4 rows of query + 5 neighbours


def test_trainer_debug_composes_a_smoke_run():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["trainer=debug", "backbone=vit_s"])
    assert cfg.trainer.max_steps == 5 and cfg.trainer.accelerator == "auto"  # trainer/default underneath
    assert cfg.skip_evaluation is True and cfg.callbacks.knn.skip is True and cfg.callbacks.linear_probe.skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config")
    assert cfg.callbacks.knn.skip is False and cfg.trainer.max_steps == 1000


@pytest.mark.slow
def test_trainer_debug_skips_evaluation_and_says_so(tmp_path, caplog):
    from sslab.runs.training import train
    from tests.conftest import make_cfg

    cfg = make_cfg(tmp_path, "trainer=debug", "trainer.max_steps=2")
    with caplog.at_level(logging.WARNING):
        metrics = train(cfg)
    assert metrics["global_step"] == 2 and not any(k.startswith("eval/") for k in metrics)
    said = [r.getMessage() for r in caplog.records if "trainer=debug skips evaluation" in r.getMessage()]
    assert len(said) == 1
