"""Building blocks shared by the recurrent models (BasicSR's key layout)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.fast_conv import FastConv2d, epilogue


def is_exporting() -> bool:
    """True while torch.export traces the model (symbolic sizes, no branching on pixels)."""
    check = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6
    return bool(check and check())


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=True)


def conv_act(
    conv: nn.Conv2d,
    x: torch.Tensor,
    act: str | None = None,
    slope: float = 0.1,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(conv(x))`` (``"relu"``, ``"leaky_relu"`` or None), or ``residual + conv(x)``.

    On a model prepared for the CPU (:func:`vsrkit.accel.prepare_for_inference` puts a
    :class:`vsrkit.ops.fast_conv.FastConv2d` in place of each conv) this is
    :meth:`~vsrkit.ops.fast_conv.FastConv2d.fused`: without autograd, one oneDNN or NNPACK call
    with the activation or the sum fused into the convolution (the separate elementwise passes
    over the feature map cost 10-20 % of a trunk). Everywhere else (training, CUDA, unprepared
    models) it is the plain module call followed by the plain op.
    """
    if isinstance(conv, FastConv2d):
        return conv.fused(x, act, slope, residual)
    return epilogue(conv(x), act, slope, residual)


class ResidualBlockNoBN(nn.Module):
    """``x + conv2(relu(conv1(x)))``: EDSR's block, without batch norm."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_act(self.conv2, conv_act(self.conv1, x, "relu"), residual=x)


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
        return self.main[2](conv_act(self.main[0], x, "leaky_relu", 0.1))


class SubpixelConv2d(nn.Conv2d):
    """A convolution whose output is the input of a ×2 pixel shuffle (a sub-pixel conv).

    It computes exactly as ``nn.Conv2d`` (same parameters and keys); the class says what the
    conv is for, so that :func:`vsrkit.accel.prepare_for_inference` can order its output
    channels for the shuffle. :func:`conv_act_shuffle2` is how it is meant to be called.
    """

    upscale_factor = 2


def add_upsample_tail(model: nn.Module, channels: int) -> None:
    """Register the ×4 tail's convs on ``model`` under BasicSR's flat names.

    The tail is two pixel-shuffle ×2 stages (:class:`SubpixelConv2d`), ``conv_hr`` and
    ``conv_last``; keeping its convs on the model (not in a submodule) keeps checkpoints in
    BasicSR's key layout.
    """
    model.upconv1 = SubpixelConv2d(channels, channels * 4, 3, 1, 1)
    model.upconv2 = SubpixelConv2d(channels, 64 * 4, 3, 1, 1)
    model.conv_hr = conv3x3(64, 64)
    model.conv_last = conv3x3(64, 3)


# Floats per LR pixel live at the ×4 tail's peak: its convs run on 64 channels at 4H×4W (1024
# floats per LR pixel each). Measured peaks (fresh process, first run, fp32 CPU; see
# tests/test_memory_guard.py) were 16-23 kB per LR pixel: the conv's input, output and
# workspace; six such maps cover them.
TAIL_FLOATS_PER_PIXEL = 6 * 64 * 16


def upsample_tail_memory(height: int, width: int) -> int:
    """Bytes live at the tail's peak for an (height, width) LR input (the output is fp32)."""
    return TAIL_FLOATS_PER_PIXEL * 4 * height * width


def conv_act_shuffle2(
    conv: nn.Conv2d, x: torch.Tensor, act: str | None = "leaky_relu", slope: float = 0.1
) -> torch.Tensor:
    """``F.pixel_shuffle(act(conv(x)), 2)``; on a prepared conv, one fused call (see conv_act)."""
    if isinstance(conv, FastConv2d):
        return conv.act_shuffle2(x, act, slope)
    return F.pixel_shuffle(conv_act(conv, x, act, slope), 2)


def run_upsample_tail(
    model: nn.Module, feat: torch.Tensor, lq: torch.Tensor, upscale_base: bool = True
) -> torch.Tensor:
    """HR frame from a fused feature plus a base image.

    The base is the ×4 *bilinear* upscale of the LR frame (not bicubic, in every reference), or
    ``lq`` itself for same-size restoration models (``upscale_base=False``).
    """
    # The activation commutes with pixel_shuffle (a permutation), so it is applied first, where
    # it can be fused into the conv; the result is the same.
    out = conv_act_shuffle2(model.upconv1, feat, "leaky_relu", 0.1)
    out = conv_act_shuffle2(model.upconv2, out, "leaky_relu", 0.1)
    out = conv_act(model.conv_hr, out, "leaky_relu", 0.1)
    out = conv_act(model.conv_last, out)
    base = F.interpolate(lq, scale_factor=4, mode="bilinear", align_corners=False) if upscale_base else lq
    # The sum is taken in fp32: a bf16 output would be coarser than the 8-bit frame it becomes.
    return out.float() + base.float()
