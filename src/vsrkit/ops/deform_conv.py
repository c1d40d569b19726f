"""Modulated deformable convolution (DCNv2) with a fast CPU path.

:func:`deform_conv2d` has the semantics and tensor layouts of
:func:`torchvision.ops.deform_conv2d`, so weights trained with either run unchanged:

* ``offset`` is ``(N, 2*G*kh*kw, Ho, Wo)``: for offset group ``g`` and kernel position
  ``k = i*kw + j``, channel ``2*(g*kh*kw + k)`` is the row (y) offset and the next one the
  column (x) offset;
* ``mask`` is ``(N, G*kh*kw, Ho, Wo)`` with channel ``g*kh*kw + k``;
* the ``Cin/G`` input channels of a group share that group's sampling positions;
* samples are bilinear with zeros outside the image: a position at ``y`` reads rows
  ``floor(y)`` and ``floor(y)+1`` and any row outside ``[0, H)`` counts as zero, so a sample
  between -1 and 0 still gets its share of row 0.

Why not just call torchvision: its CPU kernel runs at about 6 GFLOP/s on the BasicVSR++ shape
(1/20 of a dense convolution of the same size), is effectively single-threaded and has no
bfloat16 kernel, so BasicVSR++ and IconVSR spend a third or more of their CPU time in it.
On CUDA tensors (and any device other than the CPU) this module still calls torchvision,
which is fast there.

The CPU path is plain PyTorch. It builds the im2col matrix ``(Cin*kh*kw, Ho*Wo)`` a few output
rows at a time with :func:`torch.nn.functional.grid_sample`: one call samples all groups, with
the groups in the batch dimension (``(N*G, Cin/G, H, W)``) and the ``kh*kw`` kernel positions
stacked along the grid's rows, so the sampling coordinates and corner weights are computed
once per group and reused for each channel of the group by a vectorised, multithreaded ATen
kernel. The modulation mask is multiplied into that matrix and one GEMM with the weight
reshaped to ``(Cout, Cin*kh*kw)`` finishes the chunk (in float32 as a 1x1 convolution, which
runs in oneDNN). Without autograd, the chunk buffers are reused and the peak memory is the
output plus a few tens of MiB. With autograd everything is made of differentiable ops, so
autograd gives the gradients for input, offset, mask, weight and bias; it keeps the sampled
matrix (with and without the mask) for the backward pass, 2 * Cin*kh*kw*Ho*Wo floats per image:
0.53 GB for BasicVSR++'s 128 channels at 180x320 (0.9 GB peak measured over forward and
backward), 38 MB per 64x64 training crop.

``grid_sample(align_corners=True)`` maps the normalised coordinate ``u`` to the pixel
coordinate ``(u + 1) * (W - 1) / 2``, which is exactly the bilinear-with-zero-padding rule
above. Going through normalised coordinates costs a few float32 roundings at the scale of 1
(about 1e-7 * W pixels): the outputs differ from torchvision's by about as much as
torchvision's own float32 result differs from a float64 one (see the tests).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .custom_ops import custom_op

__all__ = ["EXPORT_FORMS", "deform_conv2d", "deform_conv2d_from_logits", "exporting_as"]

# Target size of one chunk of the im2col matrix, in bytes of the sampling dtype. Chunks keep the
# peak memory independent of the frame size (a few MiB over the output at any size) and keep
# the matrix in the L3 cache between the sampler writing it, the mask multiply and the GEMM
# reading it. Measured on 2 Zen 4 cores at 180x320: 4-16 MiB are equally fast on a lightly
# loaded machine and 64 MiB is ~1.5x slower; when other processes compete for the cores, every
# parallel region waits for descheduled OpenMP threads, so fewer, larger chunks degrade less
# (8 MiB was 1.5-2x slower than 16 MiB there). Hence 16 MiB.
_CHUNK_BYTES = 16 << 20


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(int(v) for v in value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution v1/v2 (with ``mask``), like :func:`torchvision.ops.deform_conv2d`.

    Args:
        input: ``(N, Cin, H, W)``.
        offset: ``(N, 2*G*kh*kw, Ho, Wo)``, (dy, dx) pairs per kernel position per offset group
            ``G``; ``Cin`` must be divisible by ``G``.
        weight: ``(Cout, Cin/groups, kh, kw)``; ``groups`` (weight groups) is inferred as
            ``Cin // weight.shape[1]``, as torchvision does.
        bias: ``(Cout,)`` or None.
        stride, padding, dilation: ints or ``(h, w)`` pairs. Note the default padding is 1
            (the models' 3x3 convolutions), unlike torchvision's 0.
        mask: ``(N, G*kh*kw, Ho, Wo)`` modulation (DCNv2), or None for DCNv1.

    Returns:
        ``(N, Cout, Ho, Wo)``. On the CPU it has the input's dtype, or the autocast dtype when
        called under ``torch.autocast("cpu")`` with a float32/bfloat16/float16 input; it is
        channels_last when the input is.

    On the CPU the bilinear sampling is always done in float32 (float64 for float64 inputs):
    coordinates need the precision. Only the im2col matrix and the GEMM use a bfloat16/float16
    compute dtype, with float32 accumulation inside the GEMM.
    """
    stride_hw = _pair(stride, "stride")
    padding_hw = _pair(padding, "padding")
    dilation_hw = _pair(dilation, "dilation")
    if _export_form is not None:
        return _deform_conv2d_for_export(
            DeformConvCall(input, offset, weight, bias, stride_hw, padding_hw, dilation_hw, mask)
        )
    if input.device.type != "cpu":
        # torchvision's CUDA kernel is fast; only the CPU needs the replacement.
        from torchvision.ops import deform_conv2d as tv_deform_conv2d

        return tv_deform_conv2d(
            input,
            offset,
            weight,
            bias,
            stride=stride_hw,
            padding=padding_hw,
            dilation=dilation_hw,
            mask=mask,
        )
    return _deform_conv2d_cpu(input, offset, weight, bias, stride_hw, padding_hw, dilation_hw, mask)


def _compute_dtype(input: Tensor) -> torch.dtype:
    """Dtype of the im2col matrix and the GEMM (and of the result)."""
    if not input.is_floating_point():
        raise TypeError(f"deform_conv2d needs a floating-point input, got {input.dtype}")
    if input.dtype in (torch.float32, torch.bfloat16, torch.float16):
        autocast_dtype = _cpu_autocast_dtype()
        if autocast_dtype is not None:
            # Under autocast, behave like conv2d: compute and return the autocast dtype.
            return autocast_dtype
    return input.dtype


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype when CPU autocast is on, else None (torch 2.1 to 2.14 APIs)."""
    try:
        if torch.is_autocast_enabled("cpu"):
            return torch.get_autocast_dtype("cpu")
        return None
    except TypeError:  # torch < 2.4: no device_type argument
        if torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def _check_shapes(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    out_hw: tuple[int, int],
) -> tuple[int, int]:
    """Validate the shapes; return (offset groups, weight groups)."""
    if input.dim() != 4 or offset.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            "deform_conv2d expects 4-d input, offset and weight, got "
            f"{tuple(input.shape)}, {tuple(offset.shape)}, {tuple(weight.shape)}"
        )
    n, cin = input.shape[:2]
    cout, cin_per_group, kh, kw = weight.shape
    ho, wo = out_hw
    if ho <= 0 or wo <= 0:
        raise ValueError(f"deform_conv2d: empty output size {out_hw} for input {tuple(input.shape)}")
    if cin_per_group == 0 or cin % cin_per_group:
        raise ValueError(f"weight {tuple(weight.shape)} does not divide the {cin} input channels into groups")
    weight_groups = cin // cin_per_group
    if cout % weight_groups:
        raise ValueError(f"{cout} output channels are not divisible into {weight_groups} weight groups")
    k = kh * kw
    if offset.shape[1] % (2 * k) or offset.shape[1] == 0:
        raise ValueError(f"offset has {offset.shape[1]} channels, not a multiple of 2*kh*kw = {2 * k}")
    groups = offset.shape[1] // (2 * k)
    if cin % groups:
        raise ValueError(f"{cin} input channels are not divisible into {groups} offset groups")
    if offset.shape[0] != n or tuple(offset.shape[2:]) != out_hw:
        raise ValueError(f"offset {tuple(offset.shape)} does not match batch {n} and output size {out_hw}")
    if mask is not None and tuple(mask.shape) != (n, groups * k, ho, wo):
        raise ValueError(f"mask {tuple(mask.shape)} should be {(n, groups * k, ho, wo)}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias {tuple(bias.shape)} should be ({cout},)")
    return groups, weight_groups


def _deform_conv2d_cpu(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
    logits: _Logits | None = None,
) -> Tensor:
    """The CPU paths. With ``logits``, ``offset`` and ``mask`` are the raw logits to transform."""
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"deform_conv2d expects 4-d input and weight, got {tuple(input.shape)} and {tuple(weight.shape)}"
        )
    n, cin, h, w = input.shape
    cout, cin_per_wgroup, kh, kw = weight.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"bad stride {stride}, dilation {dilation} or padding {padding}")
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    groups, wgroups = _check_shapes(input, offset, weight, bias, mask, (ho, wo))
    k = kh * kw
    cg = cin // groups
    dtype = _compute_dtype(input)
    # Sampling precision: float32, or float64 when the input is float64 (gradcheck, references).
    sdtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    # Keep the caller's memory format: channels_last models get a channels_last result.
    channels_last = input.is_contiguous(memory_format=torch.channels_last) and cin > 1
    flows = () if logits is None else logits.flows
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, offset, weight, bias, mask, *flows)
    )
    if not needs_grad and _native_usable(dtype, wgroups):
        out = _forward_native(
            input, offset, mask, weight, bias, stride, padding, dilation, groups, dtype, (ho, wo), logits
        )
        return out if channels_last else out.contiguous()
    if logits is not None:
        offset, mask = logits.apply(offset, mask)

    with torch.autocast("cpu", enabled=False):
        x = input.to(sdtype)
        # grid_sample's align_corners=True maps [-1, 1] onto [0, size-1], which is undefined
        # for a size of 1. A zero row/column appended there is exactly torchvision's rule
        # (outside the image reads zero), so sample a 2-pixel-wide image instead.
        if h == 1 or w == 1:
            x = F.pad(x, (0, int(w == 1), 0, int(h == 1)))
        hs, ws = x.shape[-2:]
        # Groups go to the batch dimension: (N*G, Cin/G, H, W). A view for NCHW inputs and for
        # channels_last ones with N == 1; the sampler handles either stride pattern.
        x = x.reshape(n * groups, cg, hs, ws)

        sy = 2.0 / (hs - 1)
        sx = 2.0 / (ws - 1)
        # Normalised coordinates at zero offset, per kernel position: by (k, Ho, 1), bx (k, 1, Wo).
        ky, kx = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
        pos_y = (torch.arange(ho, dtype=torch.float64) * sh - ph).view(1, ho, 1)
        pos_x = (torch.arange(wo, dtype=torch.float64) * sw - pw).view(1, 1, wo)
        by = ((ky.reshape(k, 1, 1) * dh + pos_y) * sy - 1.0).to(sdtype)
        bx = ((kx.reshape(k, 1, 1) * dw + pos_x) * sx - 1.0).to(sdtype)

        off = offset.to(sdtype).view(n, groups, k, 2, ho, wo)
        msk = None if mask is None else mask.to(sdtype).view(n, groups, 1, k, ho, wo)
        wmat = weight.to(dtype).reshape(wgroups, cout // wgroups, cin_per_wgroup * k)
        b = None if bias is None else bias.to(dtype)

        elem = torch.finfo(sdtype).bits // 8
        rows = max(1, min(ho, _CHUNK_BYTES // max(1, n * cin * k * wo * elem)))
        if needs_grad:
            return _forward_autograd(x, off, msk, wmat, b, by, bx, sx, sy, rows, channels_last, dtype)
        with torch.no_grad():
            return _forward_inference(x, off, msk, wmat, b, by, bx, sx, sy, rows, channels_last, dtype)


def _forward_inference(
    x: Tensor,
    off: Tensor,
    msk: Tensor | None,
    wmat: Tensor,
    bias: Tensor | None,
    by: Tensor,
    bx: Tensor,
    sx: float,
    sy: float,
    rows: int,
    channels_last: bool,
    dtype: torch.dtype,
) -> Tensor:
    """No-autograd path: reused chunk buffers, in-place ops, GEMMs written into the output."""
    n, groups, k, _, ho, wo = off.shape
    wgroups, cout_g, _ = wmat.shape
    cout = wgroups * cout_g
    cg = x.shape[1]
    cin = groups * cg
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, cout, ho, wo), dtype=dtype).contiguous(memory_format=fmt)
    # Flat buffers: the shorter last chunk takes a contiguous prefix.
    grid_buf = torch.empty(n * groups * k * rows * wo * 2, dtype=x.dtype)
    # Lower-precision GEMMs need the im2col matrix in their dtype: one reused buffer.
    cast_buf = None if dtype == x.dtype else torch.empty(n * cin * k * rows * wo, dtype=dtype)
    w4 = wmat.reshape(cout, -1, 1, 1) if dtype == torch.float32 else None
    for r0 in range(0, ho, rows):
        r1 = min(ho, r0 + rows)
        nr = r1 - r0
        grid = grid_buf[: n * groups * k * nr * wo * 2].view(n, groups, k, nr, wo, 2)
        torch.add(bx, off[:, :, :, 1, r0:r1], alpha=sx, out=grid[..., 0])
        torch.add(by[:, r0:r1], off[:, :, :, 0, r0:r1], alpha=sy, out=grid[..., 1])
        cols = F.grid_sample(
            x, grid.view(n * groups, k * nr, wo, 2), mode="bilinear", padding_mode="zeros", align_corners=True
        ).view(n, groups, cg, k, nr * wo)
        if msk is not None:
            cols.mul_(msk[..., r0:r1, :].reshape(n, groups, 1, k, nr * wo))
        if cast_buf is not None:
            # Multiply in float32, then convert: one rounding to the GEMM dtype, and measured
            # ~2x faster than mul(out=bf16), which goes through a hidden float32 temporary.
            cols = cast_buf[: n * cin * k * nr * wo].view_as(cols).copy_(cols)
        if w4 is not None:
            # float32: as a 1x1 convolution the GEMM runs in oneDNN when torch uses more than
            # one thread: measured ~1.3x the throughput of torch.mm (MKL) for this shape on 2
            # Zen 4 cores. With one thread PyTorch routes it to the same MKL GEMM.
            y = F.conv2d(cols.view(n, cin * k, nr, wo), w4, bias, groups=wgroups)
            out[:, :, r0:r1].copy_(y)
            continue
        cols = cols.view(n, wgroups, cin // wgroups * k, nr * wo)
        for i in range(n):
            for j in range(wgroups):
                dst_out = out[i, j * cout_g : (j + 1) * cout_g, r0:r1]
                a, c = wmat[j], cols[i, j]
                if channels_last:
                    # (Ho*Wo-chunk, Cout) rows are contiguous in a channels_last output.
                    dst_mat = dst_out.permute(1, 2, 0).view(nr * wo, cout_g)
                    a, c = c.t(), a.t()
                else:
                    # (Cout, chunk) with a row stride of Ho*Wo: BLAS writes it in place.
                    dst_mat = dst_out.view(cout_g, nr * wo)
                if bias is None:
                    torch.mm(a, c, out=dst_mat)
                else:
                    bj = bias[j * cout_g : (j + 1) * cout_g]
                    bj = bj.view(1, -1) if channels_last else bj.view(-1, 1)
                    torch.addmm(bj.expand_as(dst_mat), a, c, out=dst_mat)
    return out


def _forward_autograd(
    x: Tensor,
    off: Tensor,
    msk: Tensor | None,
    wmat: Tensor,
    bias: Tensor | None,
    by: Tensor,
    bx: Tensor,
    sx: float,
    sy: float,
    rows: int,
    channels_last: bool,
    dtype: torch.dtype,
) -> Tensor:
    """Differentiable path, made of out-of-place ops only so autograd can save what it needs."""
    n, groups, k, _, ho, wo = off.shape
    wgroups, cout_g, ck = wmat.shape
    cg = x.shape[1]
    chunks = []
    for r0 in range(0, ho, rows):
        r1 = min(ho, r0 + rows)
        nr = r1 - r0
        gx = torch.add(bx, off[:, :, :, 1, r0:r1], alpha=sx)
        gy = torch.add(by[:, r0:r1], off[:, :, :, 0, r0:r1], alpha=sy)
        grid = torch.stack((gx, gy), dim=-1).view(n * groups, k * nr, wo, 2)
        cols = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        cols = cols.view(n, groups, cg, k, nr * wo)
        if msk is not None:
            cols = cols * msk[..., r0:r1, :].reshape(n, groups, 1, k, nr * wo)
        cols = cols.to(dtype)
        if dtype == torch.float32:
            # A 1x1 convolution, as in the inference path (oneDNN, forward and backward).
            y = F.conv2d(cols.view(n, wgroups * ck, nr, wo), wmat.reshape(-1, ck, 1, 1), bias, groups=wgroups)
        else:
            y = torch.matmul(wmat, cols.view(n, wgroups, ck, nr * wo))  # (n, wgroups, cout_g, chunk)
            y = y.reshape(n, wgroups * cout_g, nr, wo)
            if bias is not None:
                y = y + bias.view(1, -1, 1, 1)
        chunks.append(y)
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def deform_conv2d_from_logits(
    input: Tensor,
    logits: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    padding: int = 1,
    offset_scale: float | None = None,
    flows: tuple[Tensor, ...] = (),
) -> Tensor:
    """A modulated deformable conv whose offsets and mask come from the logits of a conv.

    ``logits`` is ``(N, 3*G*kh*kw, Ho, Wo)``: its first ``2*G*kh*kw`` channels are the offsets
    (in :func:`deform_conv2d`'s layout), the rest the mask logits. This computes, exactly as
    EDVR's DCNv2Pack and BasicVSR++'s second-order alignment write it::

        offset = logits[:, :2GK]                        # or offset_scale * tanh(...)
        offset += flow (as (dy, dx), repeated per group and kernel position)
        mask = sigmoid(logits[:, 2GK:])
        deform_conv2d(input, offset.float(), weight, bias, padding=padding, mask=mask)

    ``flows`` holds zero, one or two ``(N, 2, Ho, Wo)`` flows (dx, dy in pixels); with two,
    the first half of the offset groups follows the first flow and the second half the
    second (BasicVSR++: the state one frame back and the one two frames back).

    Stride and dilation are 1. On the CPU without autograd, and where the native kernel is
    available (:mod:`vsrkit.ops.native`), the transforms are fused into the sampling; the
    result is the same to float32 rounding.
    """
    if len(flows) > 2:
        raise ValueError(f"at most two flows, got {len(flows)}")
    if logits.dim() != 4 or logits.shape[1] % 3:
        raise ValueError(f"logits must be (N, 3*G*kh*kw, Ho, Wo), got {tuple(logits.shape)}")
    offset, mask = torch.split(logits, [logits.shape[1] // 3 * 2, logits.shape[1] // 3], dim=1)
    transform = _Logits(offset_scale, tuple(flows))
    if input.device.type == "cpu" and _export_form is None:
        # Through the CPU dispatch: the native kernel fuses the transform into its sampling.
        pad = _pair(padding, "padding")
        return _deform_conv2d_cpu(input, offset, weight, bias, (1, 1), pad, (1, 1), mask, transform)
    offset, mask = transform.apply(offset, mask)
    return deform_conv2d(input, offset, weight, bias, padding=padding, mask=mask)


class _Logits(NamedTuple):
    """How :func:`deform_conv2d_from_logits` turns logits into offsets and a mask."""

    offset_scale: float | None
    flows: tuple[Tensor, ...]

    def apply(self, offset: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The PyTorch ops (the models' own code); the native kernel does the same in its loop."""
        if self.offset_scale is not None:
            offset = self.offset_scale * torch.tanh(offset)
        offset = offset.float()
        if self.flows:
            parts = torch.chunk(offset, len(self.flows), dim=1)
            offset = torch.cat(
                [
                    part + flow.float().flip(1).repeat(1, part.size(1) // 2, 1, 1)
                    for part, flow in zip(parts, self.flows, strict=True)
                ],
                dim=1,
            )
        return offset, torch.sigmoid(mask)


# Native path ------------------------------------------------------------------------------

_NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _native_usable(dtype: torch.dtype, weight_groups: int) -> bool:
    return dtype in _NATIVE_DTYPES and weight_groups == 1 and native.library() is not None


def _pixel_major(t: Tensor) -> Tensor:
    """``t`` (N, C, H, W), copied if needed so that pixel ``p = h*W + w`` sits at ``p * stride(3)``."""
    if t.stride(2) != t.shape[3] * t.stride(3) and t.shape[2] > 1:
        t = t.contiguous()
    return t


def _pixel_strides(t: Tensor, name: str) -> tuple[int, int]:
    """(pixel stride, channel stride) of a (C, H, W) operand of the C kernel, which must be pixel-major."""
    if t.dim() != 3 or (t.stride(1) != t.shape[2] * t.stride(2) and t.shape[1] > 1):
        raise ValueError(f"dcn_im2col: {name} must be a (C, H, W) tensor with pixels at a constant stride")
    return t.stride(2), t.stride(0)


def _dtype_code(t: Tensor, name: str) -> int:
    if t.dtype not in _NATIVE_DTYPES:
        raise TypeError(f"dcn_im2col: {name} must be float32 or bfloat16, got {t.dtype}")
    return _NATIVE_DTYPES[t.dtype]


@custom_op("vsrkit::dcn_im2col", mutates_args=("out",))
def dcn_im2col_op(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    flow_a: Tensor | None,
    flow_b: Tensor | None,
    geometry: list[int],
    offset_scale: float,
    from_logits: bool,
    row0: int,
    row1: int,
    out: Tensor,
) -> None:
    """``torch.ops.vsrkit.dcn_im2col``: im2col rows ``[row0, row1)`` of one image into ``out``.

    ``input`` is one image, (C, H, W) channels-last; ``offset``, ``mask`` and the flows are
    (channels, Ho, Wo) pixel-major; ``geometry`` is (offset groups, kh, kw, sh, sw, ph, pw, dh,
    dw). With ``from_logits``, ``offset`` and ``mask`` are logits (``offset_scale * tanh`` if
    ``offset_scale``, plus the flows; ``sigmoid``), as in :func:`deform_conv2d_from_logits`.
    ``out`` is the ((row1 - row0) * Wo, kh*kw*C) matrix, columns ordered (group, kernel
    position, channel), float32 or bfloat16.
    """
    lib = native.library()
    if lib is None:
        raise RuntimeError(native.unavailable_reason or "the native kernels are turned off (VSRKIT_NATIVE=0)")
    c, h, w = input.shape
    # Strides of sides of size 1 do not matter (and are not normalised by PyTorch).
    if any(size > 1 and input.stride(d) != step for d, size, step in ((0, c, 1), (1, h, w * c), (2, w, c))):
        raise ValueError("dcn_im2col: input must be one channels-last (C, H, W) image")
    groups, kh, kw, sh, sw, ph, pw, dh, dw = geometry
    wo = offset.shape[-1]
    if not out.is_contiguous() or tuple(out.shape) != ((row1 - row0) * wo, kh * kw * c):
        raise ValueError(f"dcn_im2col: out must be a contiguous ({(row1 - row0) * wo}, {kh * kw * c}) matrix")
    off_ps, off_cs = _pixel_strides(offset, "offset")
    args = native.DcnArgs(
        input=input.data_ptr(), input_dtype=_dtype_code(input, "input"), H=h, W=w, C=c,
        offset=offset.data_ptr(), offset_dtype=_dtype_code(offset, "offset"), off_ps=off_ps, off_cs=off_cs,
        tanh_scale=offset_scale if from_logits else 0.0, mask_sigmoid=int(from_logits),
        G=groups, kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, dh=dh, dw=dw, Wo=wo, row0=row0, row1=row1,
        out=out.data_ptr(), out_dtype=_dtype_code(out, "out"),
    )  # fmt: skip
    if mask is not None:
        args.mask, args.mask_dtype = mask.data_ptr(), _dtype_code(mask, "mask")
        args.mask_ps, args.mask_cs = _pixel_strides(mask, "mask")
    if flow_a is not None:
        for flow in (flow_a, flow_b):
            if flow is not None and flow.dtype != torch.float32:
                raise TypeError(f"dcn_im2col: flows must be float32, got {flow.dtype}")
        args.flow_a = flow_a.data_ptr()
        args.flow_b = None if flow_b is None else flow_b.data_ptr()
        args.flow_ps, args.flow_cs = _pixel_strides(flow_a, "flow_a")
    if lib.vsrkit_dcn_im2col(ctypes.byref(args)) != 0:
        raise MemoryError("deform_conv2d: the native sampler could not allocate its row buffers")


@dcn_im2col_op.register_fake
def _(input, offset, mask, flow_a, flow_b, geometry, offset_scale, from_logits, row0, row1, out):
    return None


def _native_operand(t: Tensor) -> Tensor:
    return t if t.dtype in _NATIVE_DTYPES else t.float()


def _forward_native(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    dtype: torch.dtype,
    out_hw: tuple[int, int],
    logits: _Logits | None = None,
) -> Tensor:
    """C im2col (:mod:`vsrkit.ops.native`) a chunk of rows at a time, then one GEMM per chunk.

    Returns a channels_last ``(N, Cout, Ho, Wo)`` tensor of ``dtype``.
    """
    n, cin, h, w = input.shape
    cout, _, kh, kw = weight.shape
    ho, wo = out_hw
    k = kh * kw
    cg = cin // groups
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        # The sampler reads channels-last pixels: a group's channels are one short vector.
        x = _native_operand(input).contiguous(memory_format=torch.channels_last)
        off = _pixel_major(_native_operand(offset))
        msk = None if mask is None else _pixel_major(_native_operand(mask))
        flow_ts = [f.float().contiguous() for f in (() if logits is None else logits.flows)]
        # The im2col columns are ordered (group, kernel position, channel): permute the weight.
        wmat = weight.to(dtype).reshape(cout, groups, cg, k).permute(0, 1, 3, 2).reshape(cout, k * cin).t()
        b = None if bias is None else bias.to(dtype)
        out = torch.empty((n, cout, ho, wo), dtype=dtype).contiguous(memory_format=torch.channels_last)
        esize = torch.finfo(dtype).bits // 8
        rows = max(1, min(ho, _CHUNK_BYTES // max(1, wo * k * cin * esize)))
        cols = torch.empty((rows * wo, k * cin), dtype=dtype)
        geometry = [groups, kh, kw, *stride, *padding, *dilation]
        offset_scale = 0.0 if logits is None else float(logits.offset_scale or 0.0)
        for i in range(n):
            out_rows = out[i].permute(1, 2, 0).reshape(ho * wo, cout)
            for r0 in range(0, ho, rows):
                r1 = min(ho, r0 + rows)
                chunk = cols[: (r1 - r0) * wo]
                dcn_im2col_op(
                    x[i],
                    off[i],
                    None if mask is None else msk[i],
                    flow_ts[0][i] if flow_ts else None,
                    flow_ts[1][i] if len(flow_ts) > 1 else None,
                    geometry,
                    offset_scale,
                    logits is not None,
                    r0,
                    r1,
                    chunk,
                )
                dst_rows = out_rows[r0 * wo : r1 * wo]
                if b is None:
                    torch.mm(chunk, wmat, out=dst_rows)
                else:
                    torch.addmm(b, chunk, wmat, out=dst_rows)
    return out


# Export -----------------------------------------------------------------------------------
#
# Exporters trace the model with symbolic frame sizes, which neither the native kernel (a C
# call) nor the chunked PyTorch path (a Python loop over rows) can go through. Inside
# `exporting_as(form)`, deform_conv2d becomes one of two traceable forms:
#
# * "DeformConv": an opaque op, `vsrkit::deform_conv2d`, that vsrkit.export translates to ONNX's
#   DeformConv (opset 19), whose offset and mask layouts are torchvision's;
# * "decomposed": grid_sample over the whole frame and one matrix product, for runtimes that
#   lack DeformConv (OpenVINO 2026.4 refuses it).

EXPORT_FORMS = ("DeformConv", "decomposed")  # the keys of _EXPORT_FORM_BUILDERS
_export_form: str | None = None


@contextmanager
def exporting_as(form: str) -> Iterator[None]:
    """Within this block, :func:`deform_conv2d` traces as ``form`` (one of :data:`EXPORT_FORMS`)."""
    global _export_form
    if form not in EXPORT_FORMS:
        raise ValueError(f"form must be one of {', '.join(EXPORT_FORMS)}, got {form!r}")
    previous, _export_form = _export_form, form
    try:
        yield
    finally:
        _export_form = previous


class DeformConvCall(NamedTuple):
    """One :func:`deform_conv2d` call, its geometry as pairs: what every export form takes."""

    input: Tensor
    offset: Tensor
    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    mask: Tensor | None


def _deform_conv2d_for_export(call: DeformConvCall) -> Tensor:
    """The traceable form of ``call`` chosen by :func:`exporting_as`."""
    return _EXPORT_FORM_BUILDERS[_export_form](call)


def _as_deform_conv_op(call: DeformConvCall) -> Tensor:
    """The opaque ``vsrkit::deform_conv2d``, with ONNX DeformConv's inputs and attributes."""
    kh, kw = call.weight.shape[-2:]
    return export_op()(
        call.input,
        call.weight,
        call.offset,
        call.bias,
        call.mask,
        list(call.stride),
        list(call.padding),
        list(call.dilation),
        call.input.shape[1] // call.weight.shape[1],
        call.offset.shape[1] // (2 * kh * kw),
    )


def _deform_conv2d_decomposed(call: DeformConvCall) -> Tensor:
    """The whole im2col matrix from one grid_sample, then one matrix product: sizes stay symbolic.

    Coordinates are normalised for ``align_corners=False``, where pixel ``p`` of a side ``S`` is
    ``(2p + 1) / S - 1``: that is defined for every size, 1 included, and grid_sample's
    zero padding then reads exactly torchvision's bilinear-with-zeros rule.
    """
    input, offset, weight, bias, stride, padding, dilation, mask = call
    n, cin, h, w = input.shape
    cout, cin_per_wgroup, kh, kw = weight.shape
    k = kh * kw
    groups = offset.shape[1] // (2 * k)
    wgroups = cin // cin_per_wgroup
    ho, wo = offset.shape[-2:]
    x = input.float().reshape(n * groups, cin // groups, h, w)
    off = offset.float().reshape(n, groups, k, 2, ho, wo)
    ky, kx = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    # Undeformed sampling positions in pixels: (k, Ho, 1) rows and (k, 1, Wo) columns.
    rows = ky.reshape(k, 1, 1).float() * dilation[0] + (
        torch.arange(ho).float() * stride[0] - padding[0]
    ).view(1, -1, 1)
    cols = kx.reshape(k, 1, 1).float() * dilation[1] + (
        torch.arange(wo).float() * stride[1] - padding[1]
    ).view(1, 1, -1)
    gy = (2 * (rows + off[:, :, :, 0]) + 1) / h - 1
    gx = (2 * (cols + off[:, :, :, 1]) + 1) / w - 1
    grid = torch.stack((gx, gy), dim=-1).reshape(n * groups, k * ho, wo, 2)
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.reshape(n, groups, cin // groups, k, ho * wo)
    if mask is not None:
        sampled = sampled * mask.float().reshape(n, groups, 1, k, ho * wo)
    # Columns ordered (input channel, kernel position), the flattening of the weight's last dims.
    sampled = sampled.reshape(n, wgroups, cin_per_wgroup * k, ho * wo)
    out = torch.matmul(weight.float().reshape(wgroups, cout // wgroups, cin_per_wgroup * k), sampled)
    out = out.reshape(n, cout, ho, wo)
    if bias is not None:
        out = out + bias.float().view(1, -1, 1, 1)
    return out


_EXPORT_FORM_BUILDERS = {"DeformConv": _as_deform_conv_op, "decomposed": _deform_conv2d_decomposed}
_DEFORM_CONV_OP = None


def export_op():
    """``torch.ops.vsrkit.deform_conv2d``, defined on first use (torch >= 2.4's custom_op).

    Its real kernel is :func:`deform_conv2d`; its fake kernel gives the output shape, which is
    all an exporter traces through. Arguments follow ONNX DeformConv's inputs and attributes.
    """
    global _DEFORM_CONV_OP
    if _DEFORM_CONV_OP is not None:
        return _DEFORM_CONV_OP

    @torch.library.custom_op("vsrkit::deform_conv2d", mutates_args=())
    def deform_conv2d_op(
        input: Tensor,
        weight: Tensor,
        offset: Tensor,
        bias: Tensor | None,
        mask: Tensor | None,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        offset_groups: int,
    ) -> Tensor:
        return _deform_conv2d_cpu(
            input, offset, weight, bias, tuple(stride), tuple(padding), tuple(dilation), mask
        ).contiguous()

    @deform_conv2d_op.register_fake
    def _(input, weight, offset, bias, mask, stride, padding, dilation, groups, offset_groups):
        return input.new_empty((input.shape[0], weight.shape[0], *offset.shape[-2:]))

    _DEFORM_CONV_OP = deform_conv2d_op
    return _DEFORM_CONV_OP
