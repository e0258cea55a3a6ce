"""MAE (and DiffMAE, which inherits it) built from its yaml trains like the official code
(facebookresearch/mae ``models_mae.py``, ``util/pos_embed.py``, ``main_pretrain.py``; issue 12):

- the encoder's position embedding is the fixed 2-D sin-cos table (zero rows for prefix tokens), outside the
  optimizer, and still works at another patch grid;
- ``initialize_weights``: xavier-uniform linear layers and patch embedding (as a linear layer), zero biases,
  unit LayerNorms, tokens normal std 0.02; other methods' backbones keep timm's init and learned table;
- the kept-patch count is ``int(N * (1 - mask_ratio))`` (floor);
- weight decay follows timm's rule as ``main_pretrain.py`` calls it (no skip list);
- our random masking equals lightly's ``random_token_mask`` on shared noise (an independent oracle).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslab.build import build_datamodule, build_method
from sslab.modules.masking import random_masking
from tests.conftest import make_cfg
from tests.test_mae import mim_cfg

METHODS = ("mae", "diffmae")


def build(tmp_path, method: str = "mae", *overrides: str):
    cfg = mim_cfg(tmp_path, method, *overrides)
    return build_method(cfg, build_datamodule(cfg))


def mae_sincos_by_hand(dim: int, grid: int, num_prefix: int) -> torch.Tensor:
    """The MAE paper's / ``util/pos_embed.py`` ``get_2d_sincos_pos_embed`` written out: half of the channels
    per axis (the first half the column w, the second the row h, as its ``meshgrid(grid_w, grid_h)`` does),
    each half [sin(pos * omega_i), cos(pos * omega_i)] with omega_i = 1 / 10000^(2i / (dim / 2)),
    i < dim / 4, patches in row-major order, then zero rows for the prefix (cls) tokens in front."""
    quarter = dim // 4
    omega = [1.0 / 10000 ** (2 * i / (dim // 2)) for i in range(quarter)]
    rows = [[0.0] * dim for _ in range(num_prefix)]
    for h in range(grid):
        for w in range(grid):
            row = [math.sin(w * o) for o in omega] + [math.cos(w * o) for o in omega]
            row += [math.sin(h * o) for o in omega] + [math.cos(h * o) for o in omega]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


# -- position embedding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("registers", [0, 2])
def test_encoder_pos_embed_is_the_fixed_mae_sincos_table(tmp_path, method, registers):
    model = build(tmp_path, method, f"backbone.num_registers={registers}")
    vit = model.backbone.vit
    pos = vit.pos_embed
    assert not pos.requires_grad
    n_prefix = 1 + registers  # cls + registers, all with a zero row (MAE's cls_token=True row)
    assert pos.shape == (1, n_prefix + 16, 192)  # 28 px / patch 7 -> 4 x 4 grid, ViT-T width
    expected = mae_sincos_by_hand(192, 4, n_prefix)
    torch.testing.assert_close(pos[0].double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_pos_embed_is_outside_the_optimizer_and_never_moves(tmp_path, method):
    model = build(tmp_path, method)
    pos = model.backbone.vit.pos_embed
    before = pos.detach().clone()
    in_groups = {id(p) for g in model.param_groups() for p in g["params"]}
    assert id(pos) not in in_groups
    opt = torch.optim.AdamW(model.param_groups(), lr=1e-2)
    torch.manual_seed(0)
    model.step({"views": torch.randn(2, 3, 28, 28)})["loss"].backward()
    opt.step()
    assert pos.grad is None and torch.equal(pos.detach(), before)


def test_pos_embed_works_at_another_patch_grid(tmp_path):
    """A 42 px input is a 6 x 6 grid for the 4 x 4 table: timm's dynamic-size path interpolates the fixed
    table (as the official ``interpolate_pos_embed`` does) and the stored table stays the MAE one."""
    model = build(tmp_path)
    before = model.backbone.vit.pos_embed.detach().clone()
    x = torch.randn(2, 3, 42, 42)
    torch.manual_seed(0)
    fwd = model.forward_masked(x)
    assert fwd["pred"].shape == (2, 36, 49) and fwd["mask"].sum(1).tolist() == [27, 27]  # 7 x 7 x 1 (grey)
    assert torch.isfinite(model.step({"views": x})["loss"])
    assert model.embed(x).shape == (2, 192)
    assert torch.equal(model.backbone.vit.pos_embed.detach(), before)


def test_decoder_pos_embed_is_fixed_sincos_too(tmp_path):
    model = build(tmp_path)
    dec = model.decoder
    assert not any("pos" in name for name, _ in dec.named_parameters())  # a table, not a parameter
    table = dec.pos_embed((4, 4), torch.zeros(1))
    torch.testing.assert_close(table.double(), mae_sincos_by_hand(dec.dim, 4, 0), atol=1e-6, rtol=0)


def test_pos_embed_matches_lightly_oracle(tmp_path):
    """lightly's ``get_2d_sincos_pos_embed`` follows the official ``util/pos_embed.py``: an independent
    implementation of the same table (1e-5)."""
    import lightly.models.utils as lightly_utils  # test extra: installed by make test, never skipped

    model = build(tmp_path, "mae", "backbone.num_registers=1")
    theirs = torch.as_tensor(lightly_utils.get_2d_sincos_pos_embed(192, 4, num_prefix_tokens=2))
    torch.testing.assert_close(model.backbone.vit.pos_embed[0].double(), theirs.double(), atol=1e-5, rtol=0)


# -- initialisation --------------------------------------------------------------------------------------
def xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def assert_xavier_uniform(weight: torch.Tensor) -> None:
    """U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) for a (out, in) matrix: every value within a, the
    largest close to a, the std a / sqrt(3)."""
    w = weight.detach().reshape(weight.shape[0], -1)
    bound = xavier_bound(w.shape[1], w.shape[0])
    assert w.abs().max() <= bound + 1e-7
    assert w.abs().max() > 0.9 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


@pytest.mark.parametrize("method", METHODS)
def test_init_is_mae_initialize_weights(tmp_path, method):
    model = build(tmp_path, method)
    vit = model.backbone.vit
    linears = [m for part in (vit, model.decoder) for m in part.modules() if isinstance(m, nn.Linear)]
    assert len(linears) >= 8
    for m in linears:
        assert_xavier_uniform(m.weight)
        assert m.bias is None or torch.count_nonzero(m.bias) == 0
    norms = [m for part in (vit, model.decoder) for m in part.modules() if isinstance(m, nn.LayerNorm)]
    assert norms
    for m in norms:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # the patch embedding is initialised as a (192, 3*7*7) linear layer, not with a conv's fans
    kernel = vit.patch_embed.proj.weight
    assert kernel.shape == (192, 3, 7, 7)
    assert_xavier_uniform(kernel)
    conv_fans_bound = xavier_bound(3 * 49, 192 * 49)
    assert kernel.abs().max() > 2 * conv_fans_bound
    tokens = [vit.cls_token] + ([model.decoder.mask_token] if method == "mae" else [])
    for token in tokens:
        assert 0.012 < token.std().item() < 0.028 and abs(token.mean().item()) < 0.01


def test_other_methods_keep_timm_init_and_learned_pos_embed(tmp_path):
    cfg = make_cfg(tmp_path)  # DINO
    model = build_method(cfg, build_datamodule(cfg))
    vit = model.backbone.vit
    assert vit.pos_embed.requires_grad
    qkv = vit.blocks[0].attn.qkv.weight
    # timm's trunc-normal std 0.02 (cut at +-2, so effectively normal); xavier's std here would be 0.051
    assert qkv.std().item() == pytest.approx(0.02, rel=0.1)


# -- masking ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "ratio", "kept"),
    [(49, 0.75, 12), (7, 0.75, 1), (49, 0.6, 19), (196, 0.75, 49), (10, 0.75, 2), (50, 0.75, 12)],
)
def test_kept_count_floors(n, ratio, kept):
    """``models_mae.py`` ``random_masking``: len_keep = int(L * (1 - mask_ratio)). (7, 0.75) and (49, 0.6)
    are where rounding the masked count would keep one more."""
    assert kept == int(n * (1 - ratio))
    keep, mask, _ = random_masking(3, n, ratio, "cpu")
    assert keep.shape == (3, kept)
    assert mask.sum(1).tolist() == [n - kept] * 3


def test_mae_encoder_sees_the_floored_count(tmp_path):
    """A 7 x 7 grid at mask ratio 0.6: the encoder gets int(49 * 0.4) = 19 patch tokens, not 20."""
    model = build(tmp_path, "mae", "data.patch_size=4", "method.mask_ratio=0.6")
    torch.manual_seed(0)
    fwd = model.forward_masked(torch.randn(2, 3, 28, 28))
    assert fwd["encoder"]["patch"].shape == (2, 19, 192)
    assert fwd["mask"].sum(1).tolist() == [30, 30]


@pytest.mark.parametrize(("batch", "n", "ratio"), [(4, 16, 0.75), (3, 49, 0.6), (5, 7, 0.75), (2, 196, 0.75)])
def test_random_masking_matches_lightly_oracle(batch, n, ratio):
    """lightly 1.6 ``lightly.models.utils.random_token_mask`` (mask_class_token=True: every token may be
    masked) draws ``torch.rand(B, N)``, keeps int(N * (1 - ratio)) by argsort, like the official code. On the
    same noise (same seed) our kept and masked indices must be identical."""
    import lightly.models.utils as lightly_utils  # test extra: installed by make test, never skipped

    torch.manual_seed(123)
    noise = torch.rand(batch, n)
    torch.manual_seed(123)
    their_keep, their_masked = lightly_utils.random_token_mask((batch, n), ratio, mask_class_token=True)
    keep, mask, restore = random_masking(batch, n, ratio, noise=noise)
    assert torch.equal(keep, their_keep)
    masked_in_noise_order = restore.argsort(dim=1)[:, keep.shape[1] :]
    assert torch.equal(masked_in_noise_order, their_masked)
    expected = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, their_masked, True)
    assert torch.equal(mask, expected)
    # drawing the noise itself consumes the RNG the same way
    torch.manual_seed(123)
    assert torch.equal(random_masking(batch, n, ratio)[0], their_keep)


# -- weight decay ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_weight_decay_follows_timm_rule(tmp_path, method):
    """``main_pretrain.py``: ``optim_factory.add_weight_decay(model, weight_decay)`` with no skip list: no
    decay for parameters with ndim <= 1 or a name ending in ``.bias``; cls and mask tokens are decayed; the
    frozen pos-embed is in no group."""
    model = build(tmp_path, method)
    assert type(model).weight_decay_rule == "timm"
    decay = {id(p): g["apply_wd"] for g in model.param_groups() for p in g["params"]}
    for g in model.param_groups():
        assert g["weight_decay"] == (0.05 if g["apply_wd"] else 0.0)
    seen = 0
    for module in model.trainable_modules():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                assert id(p) not in decay
                continue
            expected = not (p.ndim <= 1 or name.endswith(".bias"))
            assert decay[id(p)] == expected, name
            seen += 1
    assert seen == len(decay)
    vit = model.backbone.vit
    assert decay[id(vit.cls_token)] and decay[id(vit.blocks[0].attn.qkv.weight)]
    assert not decay[id(vit.blocks[0].attn.qkv.bias)] and not decay[id(vit.norm.weight)]
    if method == "mae":
        assert decay[id(model.decoder.mask_token)]
