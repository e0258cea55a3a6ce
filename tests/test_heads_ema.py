import torch
from torch import nn

from sslab.methods.base import clip_per_tensor_
from sslab.modules.ema import ema_update_
from sslab.modules.heads import DINOHead


def test_dino_head_shapes_and_cosine_last_layer():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 24), (24, 24), (24, 8)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    # with g = 1 every prototype row has unit norm, so |logit| <= 1 for the L2-normalised bottleneck
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(32), atol=1e-5)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 32) and out.abs().max() <= 1 + 1e-5


def test_dino_head_gain_trainable_without_norm_last_layer():
    head = DINOHead(4, 6, 8, 3, norm_last_layer=False)
    assert head.last_layer.parametrizations.weight.original0.requires_grad


def test_bn_head_on_patch_tokens_normalises_features_over_batch_and_tokens():
    """iBOT's teacher projects (B, N, D) patch tokens. With BatchNorm in the head, each feature is normalised
    over all B * N tokens (iBOT's ``CustomSequential`` permutes the tokens into BatchNorm's length axis);
    before this the 3-D input put the N tokens in BatchNorm's channel axis and crashed."""
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, use_bn=True).train()
    tokens = torch.randn(5, 7, 16)
    out = head(tokens)
    assert out.shape == (5, 7, 32)
    assert torch.allclose(out, head(tokens.reshape(35, 16)).reshape(5, 7, 32), atol=1e-6)
    bn = next(m for m in head.mlp if isinstance(m, nn.BatchNorm1d))
    assert bn.running_mean.shape == (24,)


def test_ema_update_formula():
    teacher, student = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        teacher.bias.fill_(0.0)
        student.weight.fill_(3.0)
        student.bias.fill_(10.0)
    ema_update_(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    assert torch.allclose(teacher.bias, torch.tensor([1.0]))
    ema_update_(teacher, student, 1.0)  # momentum 1 freezes the teacher
    assert torch.allclose(teacher.bias, torch.tensor([1.0]))


def test_per_tensor_gradient_clipping():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> scaled to norm 2
    b.grad = torch.tensor([0.6, 0.8])  # norm 1 -> untouched
    clip_per_tensor_([a, b], 2.0)
    assert torch.allclose(a.grad, torch.tensor([1.2, 1.6]), atol=1e-5)
    assert torch.allclose(b.grad, torch.tensor([0.6, 0.8]))
