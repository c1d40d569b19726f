"""Preparing a model for fast inference: memory format and bf16 weights, chosen per device.

:func:`prepare_for_inference` returns a copy of a model set up for one device and precision:

* **CPU, any precision: channels_last.** oneDNN's 3×3 convolutions run about twice as fast on
  NHWC tensors (measured 198 against 99 GFLOP/s for a 64→64 conv at 180×320 on 2 Zen 4 cores).
  Only the weights are converted: a convolution with channels_last weights returns a
  channels_last result whatever its input, so the features stay NHWC through the trunks and
  the few NCHW producers (``grid_sample``, the LR frames) are converted inside the next conv.
* **CPU, bf16: bf16 weights instead of autocast.** Autocast re-casts every weight at every call
  (about 60 convs a frame); bf16 weights are cast once, and bf16 NHWC convs reach ~380 GFLOP/s
  against ~250 under autocast. Every convolution that holds bf16 weights gets a pre-hook that
  casts an fp32 input (an LR frame concatenated to a feature, a flow) to bf16. What needs fp32
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
  tail move contiguous runs of channels (oneDNN's channels-last convs only; see
  :func:`vsrkit.models.blocks.reorder_for_subpixel_last`).
* **CUDA and other devices: unchanged** (the model is moved and put in eval mode); the engine
  keeps using autocast there, so nothing here can slow the GPU path.

The prepared copy has the same ``state_dict`` keys, but its tensors are bf16 after a bf16
preparation and, where they run on oneDNN, its ``upconv1``/``upconv2`` channels are
reordered: save checkpoints from the original model.
"""

from __future__ import annotations

import copy
import ctypes
import platform

import torch
from torch import nn

from .models.blocks import _FUSED_CONV, reorder_for_subpixel_last
from .ops import nnpack as nnpack_ops

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


def _cast_input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    dtype = module.weight.dtype
    if x.dtype != dtype:
        return (x.to(dtype), *args[1:])
    return None


def _to_bf16(module: nn.Module) -> None:
    module.to(torch.bfloat16)
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d) and not getattr(sub, "_vsrkit_cast_hook", False):
            sub.register_forward_pre_hook(_cast_input_to_weight_dtype)
            sub._vsrkit_cast_hook = True


def _mark_fusable(model: nn.Module) -> None:
    if _FUSED_CONV is None or not torch.backends.mkldnn.is_available():
        return
    for module in model.modules():
        # String paddings ("same") and non-zero padding modes are not oneDNN's: plain path.
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros":
            module._vsrkit_fuse = isinstance(module.padding, tuple)


def _use_nnpack(model: nn.Module) -> None:
    """Supported convs run through NNPACK, on NCHW weights (its layout); the rest stay oneDNN's."""
    for module in model.modules():
        if nnpack_ops.supports(module) and module.weight.dtype == torch.float32:
            module.weight.data = module.weight.data.contiguous()
            module.__class__ = nnpack_ops.NNPACKConv2d
            module._vsrkit_nnpack = True


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
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if channels_last and fuse:
        _mark_fusable(model)
    if nnpack is None:
        nnpack = nnpack_ops.available()
    elif nnpack and not nnpack_ops.available():
        raise RuntimeError(nnpack_ops.unavailable_reason or "NNPACK is turned off (VSRKIT_NNPACK=0)")
    if nnpack and precision == "fp32":
        _use_nnpack(model)
    elif nnpack and hasattr(model, "spynet"):
        # Under bf16, SPyNet's 7×7 convs in fp32 through NNPACK's FFT are faster than in bf16
        # through oneDNN, and exact to fp32 rounding.
        _use_nnpack(model.spynet)
    if channels_last:
        for module in model.modules():
            for name in ("upconv1", "upconv2"):
                conv = getattr(module, name, None)
                if (
                    isinstance(conv, nn.Conv2d)
                    and not getattr(conv, "_vsrkit_subpixel_last", False)
                    and not getattr(conv, "_vsrkit_nnpack", False)
                ):
                    reorder_for_subpixel_last(conv)
    if precision == "bf16":
        for name, child in model.named_children():
            if name == "spynet":
                if spynet_precision == "same" and not nnpack:
                    # Only the conv stacks: the ImageNet mean/std buffers stay fp32.
                    _to_bf16(child.basic_module)
                continue
            _to_bf16(child)
        for param in list(model.parameters(recurse=False)):
            param.data = param.data.to(torch.bfloat16)
    model._vsrkit_prepared = (device.type, precision, channels_last)
    return model


def prepared_precision(model: nn.Module) -> str | None:
    """The precision a model was prepared for on the CPU, or None if it was not prepared."""
    info = getattr(model, "_vsrkit_prepared", None)
    if info is None or info[0] != "cpu":
        return None
    return info[1]
