"""Preparing a model for fast inference: memory format and bf16 weights, chosen per device.

:func:`prepare_for_inference` returns a copy of a model set up for one device and precision:

* **CPU, any precision: channels_last.** oneDNN's 3×3 convolutions run about twice as fast on
  NHWC tensors (measured 198 against 99 GFLOP/s for a 64→64 conv at 180×320 on 2 Zen 4 cores).
  Only the weights are converted: a convolution with channels_last weights returns a
  channels_last result whatever its input, so the features stay NHWC through the trunks and
  the few NCHW producers (``grid_sample``, the LR frames) are converted inside the next conv.
* **CPU, bf16: bf16 weights instead of autocast.** Autocast re-casts every weight at every call
  (about 60 convs a frame); bf16 weights are cast once, and bf16 NHWC convs reach ~380 GFLOP/s
  against ~250 under autocast. A bf16 convolution casts an fp32 input (an LR frame
  concatenated to a feature, a flow) to bf16. The deformable convs compute in their input's
  dtype (bf16 features), casting their small fp32 weights at each call. What needs fp32
  stays fp32: warping grids and sampling (:func:`vsrkit.ops.warp.flow_warp` samples in fp32),
  the flow accumulation in SPyNet (its levels add a bf16 residual to an fp32 flow), the
  deformable-conv offsets (added to fp32 flows) and the final residual sum of the ×4 tail
  (:func:`vsrkit.models.blocks.run_upsample_tail` returns fp32).
* **SPyNet under bf16.** By default (``spynet_precision="same"``) SPyNet's convolutions are bf16
  too: in fp32 they would take about 40 % of a bf16 BasicVSR frame. Only the conv stacks are
  bf16; the image pyramid, the upsampled flows, the warps and the running flow sum are fp32,
  so no absolute pixel coordinate is ever held in bf16 (that is what loses up to a pixel at
  x≈300). ``spynet_precision="fp32"`` keeps all of SPyNet in fp32.
* **CPU: fused epilogues.** ReLU/LeakyReLU and the residual sums of the blocks are fused
  into the convolutions (oneDNN post-ops, see :func:`vsrkit.models.blocks.conv_act`): the
  separate elementwise passes took 10-20 % of a trunk. Bit-identical in fp32.
* **CPU, fp32: NNPACK.** Where :func:`vsrkit.ops.nnpack.available`, the stride-1
  convolutions run through NNPACK's Winograd (3×3) and FFT (7×7) kernels on NCHW weights:
  fewer multiplications than the direct convolution, whose fp32 speed is the cores' FMA peak.
  Under bf16 only SPyNet does (in fp32: faster than its bf16 direct convs). ``nnpack=False``
  keeps oneDNN's direct convolutions (bit-identical to the plain model in fp32).
* **CPU: sub-pixel convs in (i, j, c) channel order** so that the ×2 pixel shuffles of the
  tail move contiguous runs of channels (oneDNN's channels-last convs only). The sub-pixel
  convs are found by their class, :class:`vsrkit.models.blocks.SubpixelConv2d` (what
  :func:`vsrkit.models.blocks.add_upsample_tail` builds), never by their names.
* **CUDA and other devices: unchanged** (the model is moved and put in eval mode); the engine
  keeps using autocast there, so nothing here can slow the GPU path.

How: every plain ``nn.Conv2d`` (and ``SubpixelConv2d``) is replaced, by type, with a
:class:`vsrkit.ops.fast_conv.FastConv2d` that keeps the original's parameters untouched and
computes with a derived copy (bf16, NHWC, reordered) held as a non-persistent buffer; SpyNet
is found as an instance of :class:`vsrkit.models.spynet.SpyNet`. Other modules (deformable
convs, subclasses of ``nn.Conv2d`` with their own ``forward``) are left as they are. So the
prepared copy's ``state_dict()`` equals the original's (keys, dtypes, values), and a fresh
model loading it gives the original model.
"""

from __future__ import annotations

import copy
import ctypes
import platform
from collections.abc import Callable

import torch
from torch import nn

from .models.blocks import SubpixelConv2d
from .models.spynet import SpyNet
from .ops import nnpack as nnpack_ops
from .ops.fast_conv import FastConv2d

CPU_PRECISIONS = ("fp32", "bf16")

_malloc_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (Linux); True if it took effect.

    Every frame allocates and frees the same big feature maps (about 1 GB of them at ×4 of
    180×320 in fp32). glibc serves blocks over 32 MiB with fresh ``mmap`` calls and unmaps them
    on free, so the kernel faults in and zeroes every page again on every frame: measured at
    7-10 % of a BasicVSR++ frame on 2 Zen 4 cores. With mmap off for malloc and a 2 GiB trim
    threshold, the freed blocks stay in the heap and the next frame reuses them. The cost is
    that the process keeps its peak heap after the run instead of returning it to the system.
    The engine calls this for CPU runs unless ``EngineOptions(keep_freed_memory=False)``.
    """
    global _malloc_kept
    if _malloc_kept is None:
        _malloc_kept = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
            _malloc_kept = mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1
    return _malloc_kept


def _replace_convs(model: nn.Module, fast_conv: Callable[[nn.Conv2d], nn.Module | None]) -> None:
    """Put ``fast_conv(conv)`` in place of every plain conv of ``model`` (None: keep it)."""
    done: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            # Exactly these classes: a subclass may compute something else in its forward.
            if type(child) not in (nn.Conv2d, SubpixelConv2d):
                continue
            if id(child) not in done:  # a conv shared by two parents stays shared
                done[id(child)] = fast_conv(child) or child
            setattr(parent, name, done[id(child)])


def prepare_for_inference(
    model: nn.Module,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    *,
    channels_last: bool | None = None,
    spynet_precision: str = "same",
    fuse: bool = True,
    nnpack: bool | None = None,
    inplace: bool = False,
) -> nn.Module:
    """An eval-mode copy of ``model`` on ``device``, set up for ``precision`` (see module doc).

    ``channels_last`` defaults to True on the CPU and False elsewhere. ``precision`` other
    than fp32 changes the weights only on the CPU (elsewhere the engine uses autocast).
    ``fuse`` (CPU, channels_last) lets :func:`vsrkit.models.blocks.conv_act` fuse activations
    and residual sums into the convolutions. ``nnpack`` (default: where
    :func:`vsrkit.ops.nnpack.available`) runs the stride-1 convolutions of an fp32 model
    through NNPACK's Winograd and FFT kernels, in NCHW (about 1e-5 relative rounding instead
    of 1e-7); under bf16 it runs SPyNet in fp32 through NNPACK instead of in bf16.
    """
    device = torch.device(device)
    if spynet_precision not in ("same", "fp32"):
        raise ValueError(f"spynet_precision must be 'same' or 'fp32', got {spynet_precision!r}")
    if not inplace:
        model = copy.deepcopy(model)
    model = model.to(device).eval()
    if device.type != "cpu":
        model._vsrkit_prepared = (device.type, "autocast", False)
        return model
    if precision not in CPU_PRECISIONS:
        raise ValueError(f"precision on the CPU must be one of {CPU_PRECISIONS}, got {precision!r}")
    if channels_last is None:
        channels_last = True
    if nnpack is None:
        nnpack = nnpack_ops.available()
    elif nnpack and not nnpack_ops.available():
        raise RuntimeError(nnpack_ops.unavailable_reason or "NNPACK is turned off (VSRKIT_NNPACK=0)")
    in_spynet = {id(m) for net in model.modules() if isinstance(net, SpyNet) for m in net.modules()}
    bf16 = precision == "bf16"
    # Under bf16, SPyNet's 7×7 convs in fp32 through NNPACK's FFT are faster than in bf16
    # through oneDNN, and exact to fp32 rounding; without NNPACK they follow spynet_precision.
    spynet_bf16 = bf16 and spynet_precision == "same" and not nnpack

    def fast_conv(conv: nn.Conv2d) -> FastConv2d:
        spynet = id(conv) in in_spynet
        through_nnpack = nnpack and nnpack_ops.supports(conv) and (not bf16 or spynet)
        return FastConv2d.from_conv(
            conv,
            dtype=torch.bfloat16 if (spynet_bf16 if spynet else bf16) else torch.float32,
            channels_last=channels_last,
            fuse=channels_last and fuse,
            nnpack=through_nnpack,
            subpixel_last=isinstance(conv, SubpixelConv2d),
        )

    _replace_convs(model, fast_conv)
    model._vsrkit_prepared = (device.type, precision, channels_last)
    return model


def prepared_precision(model: nn.Module) -> str | None:
    """The precision a model was prepared for on the CPU, or None if it was not prepared."""
    info = getattr(model, "_vsrkit_prepared", None)
    if info is None or info[0] != "cpu":
        return None
    return info[1]
