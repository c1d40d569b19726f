"""Building blocks shared by the recurrent models (BasicSR's key layout)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..ops import nnpack


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

    On a model prepared for the CPU (:func:`vsrkit.accel.prepare_for_inference` sets
    ``conv._vsrkit_fuse``) and without autograd, this is one oneDNN call with the activation
    or the sum fused into the convolution: the separate elementwise passes over the feature
    map cost 10-20 % of a trunk. In fp32 the fused result is bit-identical; in bf16 the sum is
    rounded once instead of twice. On convs prepared for NNPACK (``conv._vsrkit_nnpack``, fp32)
    it is NNPACK's Winograd/FFT convolution with the epilogue fused (:mod:`vsrkit.ops.nnpack`).
    Everywhere else (training, CUDA, unprepared models) it is the plain module call followed
    by the plain op.
    """
    if getattr(conv, "_vsrkit_nnpack", False) and nnpack.worth_it(x):
        # fp32 CPU models prepared with NNPACK (vsrkit.ops.nnpack): epilogue fused in C.
        return nnpack.conv2d(x, conv.weight, conv.bias, act=act, slope=slope, residual=residual)
    if getattr(conv, "_vsrkit_fuse", False) and not torch.is_grad_enabled():
        w = conv.weight
        x = x.to(w.dtype).contiguous(memory_format=torch.channels_last)
        geometry = (conv.padding, conv.stride, conv.dilation, conv.groups)
        if residual is not None:
            other = residual.to(w.dtype).contiguous(memory_format=torch.channels_last)
            return _FUSED_CONV.binary(x, other, w, conv.bias, *geometry, "add", None, None, [], None)
        if act == "leaky_relu":
            return _FUSED_CONV(x, w, conv.bias, *geometry, "leaky_relu", [slope], "")
        return _FUSED_CONV(x, w, conv.bias, *geometry, act or "none", [], "")
    out = conv(x)
    if residual is not None:
        return residual + out
    if act == "relu":
        return F.relu(out)
    if act == "leaky_relu":
        return F.leaky_relu(out, slope)
    return out


def _fused_conv_op():
    """oneDNN's conv with a fused epilogue (what Inductor emits on CPU), or None if absent."""
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


_FUSED_CONV = _fused_conv_op()


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


def add_upsample_tail(model: nn.Module, channels: int) -> None:
    """Register the ×4 tail's convs on ``model`` under BasicSR's flat names.

    The tail is two pixel-shuffle ×2 stages, ``conv_hr`` and ``conv_last``; keeping its convs
    on the model (not in a submodule) keeps checkpoints in BasicSR's key layout.
    """
    model.upconv1 = conv3x3(channels, channels * 4)
    model.upconv2 = conv3x3(channels, 64 * 4)
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


def reorder_for_subpixel_last(conv: nn.Conv2d) -> None:
    """Reorder the output channels of a ×2 sub-pixel conv from (c, i, j) to (i, j, c).

    ``F.pixel_shuffle`` reads channel ``4c + 2i + j``; on channels-last tensors that is a
    gather with a stride of 4 elements, measured at ~5 % of a bf16 BasicVSR++ frame. With the
    channels in (i, j, c) order, :func:`pixel_shuffle2` moves whole runs of ``c`` contiguous
    channels instead. Used by :func:`vsrkit.accel.prepare_for_inference` on the CPU; the conv
    is marked so that :func:`pixel_shuffle2` knows the order.
    """
    with torch.no_grad():
        c = conv.out_channels // 4
        fmt = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) else None
        weight = conv.weight.view(c, 4, *conv.weight.shape[1:]).transpose(0, 1).reshape(conv.weight.shape)
        conv.weight.data = weight.contiguous(memory_format=fmt) if fmt else weight.contiguous()
        if conv.bias is not None:
            conv.bias.data = conv.bias.view(c, 4).t().reshape(-1).contiguous()
    conv._vsrkit_subpixel_last = True


def pixel_shuffle2(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``F.pixel_shuffle(x, 2)`` of ``conv``'s output, in the channel order ``conv`` produces."""
    if not getattr(conv, "_vsrkit_subpixel_last", False):
        return F.pixel_shuffle(x, 2)
    n, c4, h, w = x.shape
    c = c4 // 4
    out = torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    # Channels-last views: source (n, h, w, i, j, c), destination (n, h, i, w, j, c).
    src = x.permute(0, 2, 3, 1).reshape(n, h, w, 2, 2, c)
    out.permute(0, 2, 3, 1).view(n, h, 2, w, 2, c).copy_(src.permute(0, 1, 3, 2, 4, 5))
    return out


def conv_act_shuffle2(
    conv: nn.Conv2d, x: torch.Tensor, act: str = "leaky_relu", slope: float = 0.1
) -> torch.Tensor:
    """``F.pixel_shuffle(act(conv(x)), 2)``; through NNPACK the shuffle is done as it stores."""
    if getattr(conv, "_vsrkit_nnpack", False) and nnpack.worth_it(x):
        return nnpack.conv2d(x, conv.weight, conv.bias, act=act, slope=slope, pixel_shuffle=True)
    return pixel_shuffle2(conv, conv_act(conv, x, act, slope))


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
