"""The optional native CPU kernels in C, compiled on first use.

- ``dcn_im2col.c``: the sampling half of a deformable convolution. PyTorch has no fast CPU
  primitive for it (``grid_sample`` does it at about a fifth of the speed of the C loop, and
  the offset and mask transforms cost half a dozen more full-size passes).
- ``nnpack_conv.c``: stride-1 convolutions through the NNPACK that PyTorch links, run on
  PyTorch's OpenMP threads with fused epilogues (see :mod:`vsrkit.ops.nnpack`).

The C files are compiled with the system's C compiler (``$CC``, else ``cc``) into
``$VSRKIT_HOME/kernels/`` (default ``~/.cache/vsrkit/kernels/``) the first time it is needed,
keyed by the source, the compiler and the CPU, and loaded with :mod:`ctypes`. It needs no
PyTorch headers, so the build takes about a second.

If there is no compiler, the build fails, or ``VSRKIT_NATIVE=0`` is set, :func:`library`
returns None and :mod:`vsrkit.ops.deform_conv` uses its pure-PyTorch path (same results to
float32 rounding). The reason is kept in :data:`unavailable_reason`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import threading
from pathlib import Path

from ..cache import cache_dir
from ..fsutil import atomic_write

__all__ = ["library", "unavailable_reason"]

SOURCES = [Path(__file__).with_name(name) for name in ("dcn_im2col.c", "nnpack_conv.c")]
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-std=c99"]
# With OpenMP the kernel runs on PyTorch's own threads: the library's libgomp.so.1 resolves to the
# copy PyTorch has already loaded. Without it (a compiler lacking OpenMP) it runs on one thread.
OPENMP_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
unavailable_reason: str | None = None

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_ARGTYPES = [
    _ptr, ctypes.c_int, _i64, _i64, _i64,  # input, dtype, H, W, C
    _ptr, ctypes.c_int, _i64, _i64,  # offset, dtype, pixel stride, channel stride
    _ptr, ctypes.c_int, _i64, _i64,  # mask, dtype, pixel stride, channel stride
    ctypes.c_float, ctypes.c_int,  # tanh_scale, mask_sigmoid
    _ptr, _ptr, _i64, _i64,  # flow_a, flow_b, pixel stride, channel stride
    _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64,  # G, kh, kw, sh, sw, ph, pw, dh, dw
    _i64, _i64, _i64,  # Wo, row0, row1
    _ptr, ctypes.c_int,  # out, dtype
]  # fmt: skip


_long = ctypes.c_long
_NNP_ARGTYPES = [
    _ptr, ctypes.c_int,  # nnp_convolution_inference, algorithm
    _ptr, _long, _long, _long, _long,  # input, N, Cin, H, W
    _ptr, _ptr, _long, _long,  # weight, bias, Cout, kernel size
    _ptr, _ptr, ctypes.c_int, ctypes.c_float,  # output, residual, activation, slope
    ctypes.c_int, _ptr, _long,  # x2 pixel shuffle, scratch, its size in bytes
]  # fmt: skip


def _cpu_signature() -> str:
    # -march=native code must not be reused on another CPU sharing the same home directory.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary file renamed over ``target``: concurrent builds cannot clash."""

    def compile_to(tmp: str) -> None:
        for extra in (OPENMP_FLAGS, []):
            result = subprocess.run(
                [compiler, *FLAGS, *extra, *map(str, SOURCES), "-o", tmp, "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode == 0:
                return
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"{compiler} failed: {lines[-1] if lines else 'no output'}")

    atomic_write(target, compile_to)


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C compiler ({compiler}: {e})") from e
    key = hashlib.sha256(
        "\0".join(
            [*(src.read_text() for src in SOURCES), *version, *FLAGS, *OPENMP_FLAGS, _cpu_signature()]
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"vsrkit_native-{key}.so"
    if not target.exists():
        _build(compiler, target)
    lib = ctypes.CDLL(str(target))
    fn = lib.vsrkit_dcn_im2col
    fn.argtypes = _ARGTYPES
    fn.restype = ctypes.c_int
    conv = lib.vsrkit_nnp_conv2d
    conv.argtypes = _NNP_ARGTYPES
    conv.restype = ctypes.c_long
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, building it on the first call; None where it cannot be had."""
    global _library, _tried, unavailable_reason
    if os.environ.get("VSRKIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library = _load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                unavailable_reason = str(e)
                _library = None
            _tried = True
    return _library
