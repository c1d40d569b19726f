"""Building blocks shared by the recurrent models (BasicSR's key layout)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=True)


class ResidualBlockNoBN(nn.Module):
    """``x + conv2(relu(conv1(x)))``: EDSR's block, without batch norm."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class ConvResidualBlocks(nn.Module):
    """An input conv to ``out_channels``, LeakyReLU(0.1), then ``num_blocks`` residual blocks.

    Keys are ``main.0`` and ``main.2.{k}.conv{1,2}`` in both reference layouts.
    """

    def __init__(self, in_channels: int, out_channels: int = 64, num_blocks: int = 15) -> None:
        super().__init__()
        self.main = nn.Sequential(
            conv3x3(in_channels, out_channels),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Sequential(*(ResidualBlockNoBN(out_channels) for _ in range(num_blocks))),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def add_upsample_tail(model: nn.Module, channels: int) -> None:
    """Register the ×4 tail's convs on ``model`` under BasicSR's flat names.

    The tail is two pixel-shuffle ×2 stages, ``conv_hr`` and ``conv_last``; keeping its convs
    on the model (not in a submodule) keeps checkpoints in BasicSR's key layout.
    """
    model.upconv1 = conv3x3(channels, channels * 4)
    model.upconv2 = conv3x3(channels, 64 * 4)
    model.conv_hr = conv3x3(64, 64)
    model.conv_last = conv3x3(64, 3)


def run_upsample_tail(
    model: nn.Module, feat: torch.Tensor, lq: torch.Tensor, upscale_base: bool = True
) -> torch.Tensor:
    """HR frame from a fused feature plus a base image.

    The base is the ×4 *bilinear* upscale of the LR frame (not bicubic, in every reference), or
    ``lq`` itself for same-size restoration models (``upscale_base=False``).
    """
    out = F.leaky_relu(F.pixel_shuffle(model.upconv1(feat), 2), 0.1)
    out = F.leaky_relu(F.pixel_shuffle(model.upconv2(out), 2), 0.1)
    out = F.leaky_relu(model.conv_hr(out), 0.1)
    out = model.conv_last(out)
    base = F.interpolate(lq, scale_factor=4, mode="bilinear", align_corners=False) if upscale_base else lq
    # The sum is taken in fp32: a bf16 output would be coarser than the 8-bit frame it becomes.
    return out.float() + base.float()
