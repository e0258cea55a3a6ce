"""timm CNNs (ResNet, ConvNeXt) behind the backbone interface."""

from __future__ import annotations

import timm
import torch
from torch import nn

from sslab.backbones.base import Backbone

SMALL_INPUT = 64  # below this size the ImageNet stems would shrink the image to nothing


class CNNBackbone(Backbone):
    """Global-average-pooled features as "cls" and the last feature map as "patch" tokens.

    For inputs smaller than 64 px the stem is replaced as is usual for CIFAR-sized images (a 3x3
    stride-1 convolution without max-pool for ResNets, as in SimCLR's CIFAR variant; a 3x3 stride-1
    stem for ConvNeXt), so that a 28 px image still reaches the last stage with spatial extent.

    ``channels_last`` stores the weights and feeds the inputs in NHWC order, which cuDNN's tensor-core
    convolutions run fastest in (PyTorch's channels-last tutorial); the numbers match the NCHW ones.
    """

    num_prefix_tokens = 0

    def __init__(
        self,
        timm_name: str,
        img_size: int,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.net = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            global_pool="",
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
        )
        if img_size < SMALL_INPUT:
            _small_input_stem(self.net, in_chans)
        self.embed_dim = self.net.num_features
        self.patch_size = 1
        with torch.no_grad():
            self.net.eval()
            out = self.net(torch.zeros(1, in_chans, img_size, img_size))
            self.net.train()
        self.feature_stride = img_size // out.shape[-1]
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if mask is not None or keep is not None:
            raise ValueError(f"{self.name} is a CNN and cannot mask or drop tokens; use a ViT backbone")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fmap = self.net(x)  # (B, C, h, w)
        patch = fmap.flatten(2).transpose(1, 2)
        return {"cls": patch.mean(1), "patch": patch, "reg": patch[:, :0]}


def _small_input_stem(net: nn.Module, in_chans: int) -> None:
    if hasattr(net, "conv1") and hasattr(net, "maxpool"):  # timm ResNet
        out = net.conv1.out_channels
        net.conv1 = nn.Conv2d(in_chans, out, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif hasattr(net, "stem"):  # timm ConvNeXt: stem = [Conv2d(k=4, s=4), LayerNorm2d]
        conv = net.stem[0]
        net.stem[0] = nn.Conv2d(in_chans, conv.out_channels, kernel_size=3, stride=1, padding=1)
    else:
        raise ValueError(f"no small-input stem rule for {type(net).__name__}")
