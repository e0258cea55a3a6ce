import pytest
import torch

from sslab.backbones import build
from sslab.errors import SSLabError


@pytest.mark.parametrize("name", ["vit_t", "resnet18", "convnext_t"])
def test_backbone_interface_on_small_images(name):
    torch.manual_seed(0)
    m = build(name, img_size=28, patch_size=7)
    out = m.forward_tokens(torch.randn(2, 3, 28, 28))
    assert out["cls"].shape == (2, m.embed_dim)
    assert out["patch"].shape[0] == 2 and out["patch"].shape[-1] == m.embed_dim
    assert m(torch.randn(2, 3, 28, 28)).shape == (2, m.embed_dim)


def test_vit_registers_any_size_mask_and_keep():
    torch.manual_seed(0)
    m = build("vit_t", img_size=28, patch_size=7, num_registers=4).eval()
    x = torch.randn(2, 3, 28, 28)
    out = m.forward_tokens(x)
    assert out["reg"].shape == (2, 4, 192) and out["patch"].shape == (2, 16, 192)
    assert m.num_prefix_tokens == 5
    # other input sizes work through position-embedding interpolation
    assert m.forward_tokens(torch.randn(2, 3, 14, 14))["patch"].shape == (2, 4, 192)
    # a full mask makes every patch embedding the mask token, so the output no longer depends on the image
    full = torch.ones(2, 16, dtype=torch.bool)
    a = m.forward_tokens(x, mask=full)["cls"]
    b = m.forward_tokens(torch.randn(2, 3, 28, 28), mask=full)["cls"]
    assert torch.allclose(a, b, atol=1e-5)
    # an empty mask changes nothing
    assert torch.allclose(m.forward_tokens(x, mask=~full)["cls"], out["cls"], atol=1e-6)
    keep = torch.tensor([[0, 5, 9], [1, 2, 3]])
    assert m.forward_tokens(x, keep=keep)["patch"].shape == (2, 3, 192)


def test_cnn_refuses_masking_and_registers():
    m = build("resnet18", img_size=28)
    with pytest.raises(ValueError, match="cannot mask"):
        m.forward_tokens(torch.randn(1, 3, 28, 28), mask=torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(SSLabError, match="register"):
        build("resnet18", img_size=28, num_registers=4)


def test_bad_names_and_sizes_are_clear():
    with pytest.raises(SSLabError, match="unknown backbone 'vit_q'"):
        build("vit_q", img_size=28)
    with pytest.raises(SSLabError, match="not a multiple of patch size"):
        build("vit_t", img_size=28, patch_size=5)


@pytest.mark.parametrize("name", ["resnet18", "convnext_t"])
def test_channels_last_cnn_matches_contiguous_format(name):
    torch.manual_seed(0)
    nhwc = build(name, img_size=28).eval()  # channels_last is the CNN default
    assert nhwc.channels_last
    convs = [m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    nchw = build(name, img_size=28, channels_last=False).eval()
    nchw.load_state_dict(nhwc.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        a, b = nhwc.forward_tokens(x), nchw.forward_tokens(x)
    for key in ("cls", "patch"):
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-5), key


def test_channels_last_is_refused_for_vits():
    with pytest.raises(SSLabError, match="channels_last is for CNN backbones"):
        build("vit_t", img_size=28, patch_size=7, channels_last=True)
