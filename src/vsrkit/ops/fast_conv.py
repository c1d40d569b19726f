"""``FastConv2d``: an ``nn.Conv2d`` that computes through a CPU fast path, same parameters.

:func:`vsrkit.accel.prepare_for_inference` puts one in place of each plain convolution of a
CPU model. Its ``weight`` and ``bias`` are the original conv's parameters, untouched (values,
dtype, layout): ``state_dict()`` is the original's, and loading it into a fresh model gives the
original model. What the fast path computes with is a copy derived from them, kept as
non-persistent buffers and derived again whenever the parameters change (their version
counters or storage):

* ``dtype``: bf16 weights, cast once instead of at every call (autocast would re-cast them);
  inputs of another dtype are cast to it, so a bf16 conv takes fp32 LR frames and flows;
* ``channels_last``: NHWC weights, oneDNN's fast layout (a channels-last weight gives a
  channels-last result whatever the input);
* ``fuse``: :meth:`FastConv2d.fused` runs the activation or residual sum as a oneDNN post-op
  (one call instead of the conv plus an elementwise pass);
* ``nnpack``: fp32 NCHW through NNPACK's Winograd/FFT (:mod:`vsrkit.ops.nnpack`) for inputs
  large enough to gain (:func:`vsrkit.ops.nnpack.worth_it`);
* ``subpixel_last``: for a conv whose output feeds a ×2 pixel shuffle, its output channels in
  (i, j, c) order instead of (c, i, j), so that :meth:`FastConv2d.act_shuffle2` moves runs of
  ``c`` contiguous channels on channels-last tensors instead of a stride-4 gather (measured at
  ~5 % of a bf16 BasicVSR++ frame). The order is internal: ``forward`` still returns the
  original order.

With autograd on and parameters that require grad, the copy is derived from the parameters in
the graph, so gradients reach them (the oneDNN and NNPACK epilogues are inference-only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import nnpack

__all__ = ["FUSED_CONV", "FastConv2d", "shuffle2_from_subpixel_last", "subpixel_last_order"]


def _fused_conv_op():
    """oneDNN's conv with a fused epilogue (what Inductor emits on CPU), or None if absent."""
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


FUSED_CONV = _fused_conv_op()


def fusion_available() -> bool:
    """Whether oneDNN's fused-epilogue convolution can run here."""
    return FUSED_CONV is not None and torch.backends.mkldnn.is_available()


def subpixel_last_order(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A ×2 sub-pixel conv's weight and bias with output channels (c, i, j) reordered to (i, j, c)."""
    c = weight.shape[0] // 4
    weight = weight.reshape(c, 4, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)
    if bias is not None:
        bias = bias.reshape(c, 4).t().reshape(-1)
    return weight, bias


def shuffle2_from_subpixel_last(x: Tensor) -> Tensor:
    """``F.pixel_shuffle(y, 2)`` where ``x`` is ``y`` with channels in (i, j, c) order."""
    n, c4, h, w = x.shape
    c = c4 // 4
    out = torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    # Channels-last views: source (n, h, w, i, j, c), destination (n, h, i, w, j, c).
    src = x.permute(0, 2, 3, 1).reshape(n, h, w, 2, 2, c)
    out.permute(0, 2, 3, 1).view(n, h, 2, w, 2, c).copy_(src.permute(0, 1, 3, 2, 4, 5))
    return out


def _version(t: Tensor | None) -> tuple[int, int] | None:
    if t is None:
        return None
    if t.is_inference():  # no version counter (and no in-place change outside inference mode)
        return 0, t.data_ptr()
    return t._version, t.data_ptr()


def epilogue(out: Tensor, act: str | None, slope: float = 0.1, residual: Tensor | None = None) -> Tensor:
    """``residual + out``, or ``act(out)``: what a fused conv does after the convolution, unfused."""
    if residual is not None:
        return residual + out
    if act == "relu":
        return F.relu(out)
    if act == "leaky_relu":
        return F.leaky_relu(out, slope)
    return out


class FastConv2d(nn.Conv2d):
    """A 2-d convolution with the original conv's parameters, computed by a CPU fast path.

    See the module doc for the options. Built with :meth:`from_conv`; ``forward`` gives what
    the original conv gives (to the compute dtype's rounding), :meth:`fused` is
    ``act(conv(x))`` or ``residual + conv(x)``, :meth:`act_shuffle2` is
    ``F.pixel_shuffle(act(conv(x)), 2)``.
    """

    compute_weight: Tensor
    compute_bias: Tensor | None

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        fuse: bool = False,
        nnpack: bool = False,
        subpixel_last: bool = False,
    ) -> FastConv2d:
        """A FastConv2d sharing ``conv``'s parameters (the same Parameter objects)."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",  # replaced at once by conv's parameters: nothing to allocate
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.training = conv.training
        # NNPACK computes fp32 NCHW, and shuffles in its store (F.pixel_shuffle's order).
        new.compute_dtype = torch.float32 if nnpack else dtype
        new.channels_last = channels_last and not nnpack
        new.subpixel_last = subpixel_last and new.channels_last and conv.out_channels % 4 == 0
        new.nnpack = nnpack
        new.fuse = (
            fuse and fusion_available() and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros"
        )
        new.register_buffer("compute_weight", None, persistent=False)
        new.register_buffer("compute_bias", None, persistent=False)
        new._derived_from = None
        return new

    def extra_repr(self) -> str:
        options = [f"compute_dtype={self.compute_dtype}"]
        options += [
            name for name in ("channels_last", "fuse", "nnpack", "subpixel_last") if getattr(self, name)
        ]
        return f"{super().extra_repr()}, {', '.join(options)}"

    def _derive(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        weight = weight.to(self.compute_dtype)
        bias = None if bias is None else bias.to(self.compute_dtype)
        if self.subpixel_last:
            weight, bias = subpixel_last_order(weight, bias)
        if self.channels_last:
            # A copy with the canonical NHWC strides: .contiguous() keeps a 1×1 kernel's NCHW
            # strides (already "channels-last contiguous"), for which oneDNN rounds differently.
            weight = torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight)
        else:
            weight = weight.contiguous()
        return weight, None if bias is None else bias.contiguous()

    def compute_params(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias the fast path computes with (derived again if the parameters changed)."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return self._derive(self.weight, self.bias)
        source = (_version(self.weight), _version(self.bias))
        if source != self._derived_from or self.compute_weight is None:
            # Detached: where nothing changes (fp32, NCHW) the copy is the parameter's own storage,
            # and a Parameter assigned here would be registered as one.
            bias = None if self.bias is None else self.bias.detach()
            self.compute_weight, self.compute_bias = self._derive(self.weight.detach(), bias)
            self._derived_from = source
        return self.compute_weight, self.compute_bias

    def _plain(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The convolution through PyTorch's own dispatch (output channels in the compute order)."""
        if self.nnpack and nnpack.worth_it(x):
            return nnpack.conv2d(x, weight, bias)
        return self._conv_forward(x.to(weight.dtype), weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.compute_params()
        out = self._plain(x, weight, bias)
        if self.subpixel_last:
            # Back to the original channel order, (i, j, c) -> (c, i, j): a direct call is rare.
            out = out.unflatten(1, (4, -1)).transpose(1, 2).flatten(1, 2)
        return out

    def fused(
        self, x: Tensor, act: str | None = None, slope: float = 0.1, residual: Tensor | None = None
    ) -> Tensor:
        """``act(conv(x))`` (``"relu"``, ``"leaky_relu"`` or None), or ``residual + conv(x)``.

        In the compute channel order (see :meth:`act_shuffle2`). Without autograd this is one
        NNPACK or oneDNN call with the epilogue fused where the conv allows it; in fp32 the
        oneDNN result is bit-identical, in bf16 the sum is rounded once instead of twice.
        """
        weight, bias = self.compute_params()
        if self.nnpack and nnpack.worth_it(x):
            return nnpack.conv2d(x, weight, bias, act=act, slope=slope, residual=residual)
        if self.fuse and not torch.is_grad_enabled():
            x = x.to(weight.dtype).contiguous(memory_format=torch.channels_last)
            geometry = (self.padding, self.stride, self.dilation, self.groups)
            if residual is not None:
                other = residual.to(weight.dtype).contiguous(memory_format=torch.channels_last)
                return FUSED_CONV.binary(x, other, weight, bias, *geometry, "add", None, None, [], None)
            if act == "leaky_relu":
                return FUSED_CONV(x, weight, bias, *geometry, "leaky_relu", [slope], "")
            return FUSED_CONV(x, weight, bias, *geometry, act or "none", [], "")
        return epilogue(self._plain(x, weight, bias), act, slope, residual)

    def act_shuffle2(self, x: Tensor, act: str | None = "leaky_relu", slope: float = 0.1) -> Tensor:
        """``F.pixel_shuffle(act(conv(x)), 2)``: through NNPACK the shuffle is done as it stores."""
        if self.nnpack and nnpack.worth_it(x):
            weight, bias = self.compute_params()
            return nnpack.conv2d(x, weight, bias, act=act, slope=slope, pixel_shuffle=True)
        # The activation commutes with the shuffle (a permutation): applied first, it is fused.
        out = self.fused(x, act, slope)
        return shuffle2_from_subpixel_last(out) if self.subpixel_last else F.pixel_shuffle(out, 2)
