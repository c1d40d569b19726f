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

Each kernel takes one struct (:class:`DcnArgs`, :class:`NnpArgs`). The C source declares its
fields once and reports their names, offsets and sizes; :func:`check_layout` compares that
report with the ctypes declaration when the library is loaded, and a mismatch refuses the
library (a RuntimeWarning and :data:`unavailable_reason`; the callers fall back to PyTorch).
The callers wrap the kernels as PyTorch custom ops (``torch.ops.vsrkit.dcn_im2col``,
``torch.ops.vsrkit.nnpack_conv2d``) with fake kernels, so that ``torch.export`` and
``torch.compile`` trace through them.

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
import warnings
from pathlib import Path

from ..cache import cache_dir
from ..fsutil import atomic_write

__all__ = ["DcnArgs", "LayoutMismatch", "NnpArgs", "check_layout", "library", "unavailable_reason"]

SOURCES = [Path(__file__).with_name(name) for name in ("dcn_im2col.c", "nnpack_conv.c")]
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-std=c99"]
# With OpenMP the kernel runs on PyTorch's own threads: the library's libgomp.so.1 resolves to the
# copy PyTorch has already loaded. Without it (a compiler lacking OpenMP) it runs on one thread.
OPENMP_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
unavailable_reason: str | None = None


class DcnArgs(ctypes.Structure):
    """The arguments of ``vsrkit_dcn_im2col`` (``DCN_ARGS_FIELDS`` in dcn_im2col.c), checked at load."""

    _fields_ = [
        ("input", ctypes.c_void_p), ("input_dtype", ctypes.c_int32),
        ("H", ctypes.c_int64), ("W", ctypes.c_int64), ("C", ctypes.c_int64),
        ("offset", ctypes.c_void_p), ("offset_dtype", ctypes.c_int32),
        ("off_ps", ctypes.c_int64), ("off_cs", ctypes.c_int64),
        ("mask", ctypes.c_void_p), ("mask_dtype", ctypes.c_int32),
        ("mask_ps", ctypes.c_int64), ("mask_cs", ctypes.c_int64),
        ("tanh_scale", ctypes.c_float), ("mask_sigmoid", ctypes.c_int32),
        ("flow_a", ctypes.c_void_p), ("flow_b", ctypes.c_void_p),
        ("flow_ps", ctypes.c_int64), ("flow_cs", ctypes.c_int64),
        *((name, ctypes.c_int64) for name in ("G", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw")),
        ("Wo", ctypes.c_int64), ("row0", ctypes.c_int64), ("row1", ctypes.c_int64),
        ("out", ctypes.c_void_p), ("out_dtype", ctypes.c_int32),
    ]  # fmt: skip


class NnpArgs(ctypes.Structure):
    """The arguments of ``vsrkit_nnp_conv2d`` (``NNP_ARGS_FIELDS`` in nnpack_conv.c), checked at load."""

    _fields_ = [
        ("fn_ptr", ctypes.c_void_p), ("algo", ctypes.c_int32),
        ("in", ctypes.c_void_p), ("n", ctypes.c_int64), ("cin", ctypes.c_int64),
        ("h", ctypes.c_int64), ("w", ctypes.c_int64),
        ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("cout", ctypes.c_int64), ("k", ctypes.c_int64),
        ("out", ctypes.c_void_p), ("residual", ctypes.c_void_p),
        ("act", ctypes.c_int32), ("slope", ctypes.c_float), ("shuffle", ctypes.c_int32),
        ("scratch", ctypes.c_void_p), ("scratch_bytes", ctypes.c_int64),
    ]  # fmt: skip


# Each kernel, the struct it takes, its return type and the prefix of its layout report.
KERNELS = {
    "vsrkit_dcn_im2col": ("DcnArgs", ctypes.c_int, "vsrkit_dcn_args"),
    "vsrkit_nnp_conv2d": ("NnpArgs", ctypes.c_int64, "vsrkit_nnp_args"),
}


class LayoutMismatch(RuntimeError):
    """A kernel's argument struct differs between the C source and its ctypes declaration."""


def check_layout(lib: ctypes.CDLL, prefix: str, struct: type[ctypes.Structure]) -> None:
    """Compare the C side's report of a struct (field names, offsets, sizes) with ``struct``.

    Raises :class:`LayoutMismatch` naming the first difference: a kernel called through a
    struct that disagrees with its C definition would read garbage, not fail.
    """
    names_fn = getattr(lib, f"{prefix}_fields")
    names_fn.restype = ctypes.c_char_p
    names = names_fn().decode().rstrip(",").split(",")
    layout_fn = getattr(lib, f"{prefix}_layout")
    layout_fn.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    layout_fn.restype = ctypes.c_int64
    count = layout_fn(None, 0)
    values = (ctypes.c_int64 * count)()
    layout_fn(values, count)
    c_side = [(name, values[1 + 2 * i], values[2 + 2 * i]) for i, name in enumerate(names)]
    py_side = [
        (name, getattr(struct, name).offset, getattr(struct, name).size) for name, *_ in struct._fields_
    ]
    where = f"{struct.__name__} against {prefix} in the C source"
    for i, (c_field, py_field) in enumerate(zip(c_side, py_side, strict=False)):
        if c_field != py_field:
            raise LayoutMismatch(
                f"{where}: field {i} is {c_field[0]!r} at offset {c_field[1]}, {c_field[2]} bytes in C, "
                f"{py_field[0]!r} at offset {py_field[1]}, {py_field[2]} bytes in Python"
            )
    if len(c_side) != len(py_side) or values[0] != ctypes.sizeof(struct):
        raise LayoutMismatch(
            f"{where}: {len(c_side)} fields, {values[0]} bytes in C; "
            f"{len(py_side)} fields, {ctypes.sizeof(struct)} bytes in Python"
        )


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
    for name, (struct_name, restype, prefix) in KERNELS.items():
        # Looked up at load, so that a test can put a mismatched declaration in its place.
        struct = globals()[struct_name]
        check_layout(lib, prefix, struct)
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(struct)]
        fn.restype = restype
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
            except LayoutMismatch as e:
                # A programming error, not a missing compiler: said out loud, then the fallback.
                unavailable_reason = f"native kernels refused: {e}"
                warnings.warn(unavailable_reason, RuntimeWarning, stacklevel=2)
                _library = None
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                unavailable_reason = str(e)
                _library = None
            _tried = True
    return _library
