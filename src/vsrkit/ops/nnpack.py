"""Fast fp32 CPU convolutions: NNPACK's Winograd (3×3) and FFT (larger kernels) on PyTorch's threads.

A direct fp32 convolution cannot beat the cores' FMA peak: oneDNN's 64→64 3×3 conv runs at
about 200 GFLOP/s on 2 Zen 4 cores, which is that peak. Winograd's F(6×6, 3×3) needs about a
fifth of the multiplications, FFT convolutions fewer still for 7×7 kernels, so NNPACK, which
PyTorch links into ``libtorch_cpu``, computes the same convolutions in 55-90 % of the time for
the models' 3×3 layers (the trunks' 64→64 convs gain least: NNPACK's transforms are
memory-bound) and in a quarter to a third for SPyNet's 7×7 ones (docs/speed.md). The price is
rounding: about 1e-5 of the output's scale instead of ~1e-7 for a direct convolution (104-106
dB against the reference's 8-bit output instead of 106-109), checked by a self-test when
first used and by ``tests/test_nnpack.py``.

PyTorch's own entry point (``torch._nnpack_spatial_convolution``) runs NNPACK on a separate
thread pool that spin-waits against PyTorch's OpenMP threads; here the C wrapper in
``nnpack_conv.c`` runs it single-threaded inside an OpenMP region of PyTorch's own libgomp
(split by image, or one image by bands of rows) and fuses the epilogue (bias, ReLU or
LeakyReLU, or a residual sum). Inputs and outputs are fp32 NCHW.

The kernel is the custom op ``torch.ops.vsrkit.nnpack_conv2d`` (with a fake kernel, so
``torch.export`` and ``torch.compile`` see it). Used by :class:`vsrkit.ops.fast_conv.FastConv2d`,
which :func:`vsrkit.accel.prepare_for_inference` puts in place of fp32 CPU models' convs when
:func:`available` says so; ``VSRKIT_NNPACK=0`` turns it off (then oneDNN's direct
convolutions run, bit-identical to the plain model).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import native
from .custom_ops import custom_op

__all__ = ["available", "conv2d", "nnpack_conv2d_op", "supports", "unavailable_reason", "worth_it"]

# What the self-test accepts: the largest error relative to the output's scale. Winograd
# F(6x6, 3x3) in fp32 measures 1e-6 to 1e-5 here; a broken kernel is off by O(1).
SELF_TEST_TOLERANCE = 1e-4
_ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "leaky_relu": 2}
# NNPACK's algorithms (enum nnp_convolution_algorithm) and what each kernel size uses.
ALGORITHMS = {"ft8x8": 1, "ft16x16": 2, "wt8x8": 3}
ALGORITHM_FOR_KERNEL = {3: "wt8x8"}
DEFAULT_ALGORITHM = "ft16x16"
# Below this many output pixels per image oneDNN's direct kernels are as fast or faster
# (SPyNet's coarse levels, 12×20 and under, ran 1.2-3× slower through NNPACK's FFT).
MIN_PIXELS = 2048

_lock = threading.Lock()
_function: int | None = None
_checked = False
unavailable_reason: str | None = None
_scratch = threading.local()


def _disabled() -> bool:
    return os.environ.get("VSRKIT_NNPACK", "1").strip().lower() in ("0", "false", "no", "off")


def _loaded_libraries(prefix: str) -> list[Path]:
    """Shared libraries mapped into this process whose file names start with ``prefix`` (Linux)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    # Fields: address, perms, offset, device, inode, path (absent for anonymous mappings).
    paths = {Path(f[5]) for f in map(str.split, lines) if len(f) >= 6 and ".so" in f[5]}
    return sorted(p for p in paths if p.name.startswith(prefix))


def _find_function() -> int:
    """The address of ``nnp_convolution_inference`` in PyTorch's library, NNPACK initialised."""
    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    candidates = sorted(lib_dir.glob("libtorch_cpu*.so*")) or _loaded_libraries("libtorch")
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
            fn = lib.nnp_convolution_inference
            init = lib.nnp_initialize
        except (OSError, AttributeError):
            continue
        init.restype = ctypes.c_int
        status = init()
        if status != 0:
            raise RuntimeError(f"NNPACK does not support this CPU (nnp_initialize returned {status})")
        return ctypes.cast(fn, ctypes.c_void_p).value
    raise RuntimeError("this PyTorch build has no NNPACK")


def _self_test() -> None:
    """Both parallel splits (whole images, bands of rows), both kernel sizes, every epilogue."""
    gen = torch.Generator().manual_seed(0)
    for n, cin, cout, h, w, k in ((1, 16, 24, 70, 45, 3), (2, 8, 16, 40, 33, 7), (3, 12, 8, 68, 20, 3)):
        x = torch.randn(n, cin, h, w, generator=gen)
        weight = torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
        bias = torch.randn(cout, generator=gen)
        residual = torch.randn(n, cout, h, w, generator=gen)
        exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=k // 2)
        cases = {
            "none": (exact, {}),
            "relu": (exact.relu(), {"act": "relu"}),
            "leaky": (F.leaky_relu(exact, 0.2), {"act": "leaky_relu", "slope": 0.2}),
            "residual": (exact + residual.double(), {"residual": residual}),
        }
        for name, (want, kwargs) in cases.items():
            got = _conv2d(x, weight, bias, **kwargs).double()
            err = float((got - want).abs().max() / want.abs().max())
            if not err <= SELF_TEST_TOLERANCE:
                raise RuntimeError(f"self-test failed ({k}x{k} conv, {name}: relative error {err:.1e})")
        got = _conv2d(x, weight, bias, "relu", pixel_shuffle=cout % 4 == 0).double()
        want = F.pixel_shuffle(exact.relu(), 2) if cout % 4 == 0 else exact.relu()
        err = float((got - want).abs().max() / want.abs().max())
        if not err <= SELF_TEST_TOLERANCE:
            raise RuntimeError(f"self-test failed ({k}x{k} conv, pixel shuffle: relative error {err:.1e})")


def available() -> bool:
    """True where NNPACK can run vsrkit's fp32 CPU convolutions (checked once, then cached)."""
    global _function, _checked, unavailable_reason
    if _disabled():
        return False
    if _checked:
        return _function is not None
    with _lock:
        if not _checked:
            try:
                if native.library() is None:
                    raise RuntimeError(f"the native kernels are unavailable ({native.unavailable_reason})")
                _function = _find_function()
                _self_test()
            except RuntimeError as e:
                _function = None
                unavailable_reason = f"NNPACK convolutions off: {e}"
            _checked = True
    return _function is not None


def supports(conv: nn.Module) -> bool:
    """Whether ``conv`` has a shape the NNPACK path computes: stride 1, "same" zero padding."""
    if not isinstance(conv, nn.Conv2d):
        return False
    kh, kw = conv.kernel_size
    return (
        kh == kw
        and kh % 2 == 1
        and 3 <= kh <= 15
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding == (kh // 2, kw // 2)
        and conv.padding_mode == "zeros"
    )


def worth_it(x: Tensor) -> bool:
    """Whether an input of this size goes through NNPACK (large enough images, fp32, no autograd)."""
    return (
        x.shape[-1] * x.shape[-2] >= MIN_PIXELS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
    )


def _buffer(nbytes: int) -> Tensor:
    """A per-thread scratch buffer that only grows: NNPACK's workspace and the row bands."""
    buf = getattr(_scratch, "buffer", None)
    if buf is None or buf.numel() < nbytes:
        _scratch.buffer = None  # free the old one first
        buf = _scratch.buffer = torch.empty(nbytes, dtype=torch.uint8)
    return buf


def release_scratch() -> None:
    """Free this thread's scratch buffer (it is otherwise kept for the next call)."""
    _scratch.buffer = None


def _algorithm(k: int) -> int:
    return ALGORITHMS[ALGORITHM_FOR_KERNEL.get(k, DEFAULT_ALGORITHM)]


def _conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    act: str | None = None,
    slope: float = 0.1,
    residual: Tensor | None = None,
    pixel_shuffle: bool = False,
) -> Tensor:
    return nnpack_conv2d_op(x, weight, bias, _ACTIVATIONS[act], float(slope), residual, pixel_shuffle)


@custom_op("vsrkit::nnpack_conv2d", mutates_args=())
def nnpack_conv2d_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: int,
    slope: float,
    residual: Tensor | None,
    pixel_shuffle: bool,
) -> Tensor:
    """``torch.ops.vsrkit.nnpack_conv2d``: the C kernel (``activation`` codes: :data:`_ACTIVATIONS`)."""
    lib = native.library()
    if lib is None or _function is None:
        raise RuntimeError(unavailable_reason or "NNPACK convolutions are unavailable")
    n, cin, h, w = x.shape
    cout, _, k, _ = weight.shape
    x = x.float().contiguous()
    weight = weight.float().contiguous()
    bias = torch.zeros(cout) if bias is None else bias.float().contiguous()
    out = torch.empty(_output_shape(x, weight, pixel_shuffle))
    if residual is not None:
        residual = residual.float().contiguous()
        if residual.shape != out.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not match the output {tuple(out.shape)}")
    args = native.NnpArgs(
        fn_ptr=_function, algo=_algorithm(k), n=n, cin=cin, h=h, w=w, cout=cout, k=k,
        act=activation, slope=slope, shuffle=int(pixel_shuffle),
    )  # fmt: skip
    # Pointers are set as attributes: "in" is a Python keyword.
    setattr(args, "in", x.data_ptr())
    args.weight, args.bias, args.out = weight.data_ptr(), bias.data_ptr(), out.data_ptr()
    args.residual = None if residual is None else residual.data_ptr()
    buf = getattr(_scratch, "buffer", None)
    if buf is not None:
        args.scratch, args.scratch_bytes = buf.data_ptr(), buf.numel()
    status = lib.vsrkit_nnp_conv2d(ctypes.byref(args))
    if status > 0:
        buf = _buffer(status)
        args.scratch, args.scratch_bytes = buf.data_ptr(), buf.numel()
        status = lib.vsrkit_nnp_conv2d(ctypes.byref(args))
    if status != 0:
        raise RuntimeError(f"NNPACK convolution failed (status {-status})")
    return out


def _output_shape(x: Tensor, weight: Tensor, pixel_shuffle: bool) -> tuple[int, ...]:
    n, _, h, w = x.shape
    cout = weight.shape[0]
    return (n, cout // 4, 2 * h, 2 * w) if pixel_shuffle else (n, cout, h, w)


@nnpack_conv2d_op.register_fake
def _(x, weight, bias, activation, slope, residual, pixel_shuffle):
    return x.new_empty(_output_shape(x, weight, pixel_shuffle), dtype=torch.float32)


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    act: str | None = None,
    slope: float = 0.1,
    residual: Tensor | None = None,
    pixel_shuffle: bool = False,
) -> Tensor:
    """``act(conv2d(x, weight, bias, padding=k//2) + residual)`` in fp32 through NNPACK.

    ``act`` is None, ``"relu"`` or ``"leaky_relu"`` (negative ``slope``). ``x`` is (N, C, H, W)
    on the CPU, any memory format (converted to NCHW fp32); the result is NCHW fp32. No
    autograd. ``pixel_shuffle=True`` returns ``F.pixel_shuffle(result, 2)``, written in place
    as the result is stored (Cout a multiple of 4, no residual). Raises RuntimeError if
    :func:`available` is False.
    """
    if not available():
        raise RuntimeError(unavailable_reason or "NNPACK convolutions are turned off (VSRKIT_NNPACK=0)")
    if act not in _ACTIVATIONS:
        raise ValueError(f"act must be None, 'relu' or 'leaky_relu', got {act!r}")
    kh, kw = weight.shape[-2:]
    if kh != kw or kh % 2 == 0 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"unsupported shapes: input {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if pixel_shuffle and (weight.shape[0] % 4 or residual is not None):
        raise ValueError("pixel_shuffle needs a multiple of 4 output channels and no residual")
    with torch.no_grad():
        return _conv2d(x, weight, bias, act, slope, residual, pixel_shuffle)
