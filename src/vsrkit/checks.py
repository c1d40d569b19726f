"""Checks of user-given values, each failing with one line that names the value.

The same :class:`Check` serves three callers, so a bad value reads alike wherever it comes from:

- the command line: ``type=arg(POSITIVE_INT)`` makes an argparse type
  (``argument --segment-frames: must be an integer ≥ 1, got '0'``);
- the Python API: ``POSITIVE_INT(value, "segment_frames")`` returns the value or raises
  :class:`~vsrkit.errors.VsrkitError` (``segment_frames must be an integer ≥ 1, got 0``);
- config schemas (:mod:`vsrkit.train`), with the dotted key as the name.

Numbers must be finite (``nan`` and ``inf`` are refused); text such as ``"1e-4"`` (which YAML
reads as a string) is converted. Booleans are never taken for numbers.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from .errors import VsrkitError


class _Invalid(Exception):
    """Raised by a conversion: the value does not fit the check's description."""


class Check:
    """A conversion plus the words for what it accepts ("an integer ≥ 1")."""

    def __init__(self, describe: str, convert: Callable[[Any], Any]) -> None:
        self.describe = describe
        self.convert = convert

    def __call__(self, value: Any, name: str) -> Any:
        """``value`` converted, or a :class:`VsrkitError` naming ``name``."""
        try:
            return self.convert(value)
        except (_Invalid, ValueError, TypeError, OverflowError):
            raise VsrkitError(f"{name} must be {self.describe}, got {_show(value)}") from None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def arg(check: Check) -> Callable[[str], Any]:
    """An argparse ``type=`` that applies ``check`` to the option's text."""

    def parse(text: str) -> Any:
        try:
            return check.convert(text)
        except (_Invalid, ValueError, TypeError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {check.describe}, got {text!r}") from None

    parse.__name__ = check.describe
    return parse


# -- scalars --------------------------------------------------------------------------------------
def _range_words(kind: str, low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    def fmt(x: float) -> str:
        return f"{x:g}"

    if low is not None and high is not None and not low_open and not high_open:
        return f"{kind} from {fmt(low)} to {fmt(high)}"
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '≥'} {fmt(low)}")
    if high is not None:
        parts.append(f"{'<' if high_open else '≤'} {fmt(high)}")
    return f"{kind} {' and '.join(parts)}" if parts else kind


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Invalid
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            value = float(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Invalid


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Invalid
    number = float(value)
    if not math.isfinite(number):
        raise _Invalid
    return number


def integer(low: int | None = None, high: int | None = None) -> Check:
    """Whole numbers in ``[low, high]`` (either bound may be None)."""

    def convert(value: Any) -> int:
        number = _to_int(value)
        if (low is not None and number < low) or (high is not None and number > high):
            raise _Invalid
        return number

    return Check(_range_words("an integer", low, high, False, False), convert)


def number(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Check:
    """Finite numbers between ``low`` and ``high`` (``*_open``: the bound itself is excluded)."""

    def convert(value: Any) -> float:
        x = _to_float(value)
        if low is not None and (x < low or (low_open and x == low)):
            raise _Invalid
        if high is not None and (x > high or (high_open and x == high)):
            raise _Invalid
        return x

    return Check(_range_words("a finite number", low, high, low_open, high_open), convert)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid


def _to_text(value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    raise _Invalid


def choice(*options: str) -> Check:
    """One of ``options`` (case-insensitive; returned in lower case)."""

    def convert(value: Any) -> str:
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        raise _Invalid

    return Check(f"one of {', '.join(options)}", convert)


class _Optional(Check):
    def __init__(self, inner: Check) -> None:
        super().__init__(f"{inner.describe} or null", lambda v: None if v is None else inner.convert(v))
        self.inner = inner

    def __call__(self, value: Any, name: str) -> Any:
        return None if value is None else self.inner(value, name)


def optional(check: Check) -> Check:
    """``check``, or None."""
    return _Optional(check)


class _ListOf(Check):
    def __init__(self, item: Check, length: int | None) -> None:
        count = f"{length} " if length else ""
        super().__init__(f"a list of {count}items, each {item.describe}", self._convert)
        self.item, self.length = item, length

    def _convert(self, value: Any) -> list[Any]:
        if not isinstance(value, (list, tuple)) or (self.length and len(value) != self.length):
            raise _Invalid
        return [self.item.convert(v) for v in value]

    def __call__(self, value: Any, name: str) -> Any:
        if not isinstance(value, (list, tuple)) or (self.length and len(value) != self.length):
            raise VsrkitError(f"{name} must be {self.describe}, got {_show(value)}")
        return [self.item(v, f"{name}[{i}]") for i, v in enumerate(value)]


def list_of(item: Check, length: int | None = None) -> Check:
    return _ListOf(item, length)


class _MappingOf(Check):
    def __init__(self, item: Check) -> None:
        super().__init__(f"a mapping of names to {item.describe}", self._convert)
        self.item = item

    def _convert(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _Invalid
        return {str(k): self.item.convert(v) for k, v in value.items()}

    def __call__(self, value: Any, name: str) -> Any:
        if not isinstance(value, dict):
            raise VsrkitError(f"{name} must be {self.describe}, got {_show(value)}")
        return {str(k): self.item(v, f"{name}.{k}") for k, v in value.items()}


def mapping_of(item: Check) -> Check:
    return _MappingOf(item)


POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)
ANY_INT = integer()
POSITIVE_FLOAT = number(0, low_open=True)
NON_NEGATIVE_FLOAT = number(0)
PROBABILITY = number(0, 1)
BOOLEAN = Check("true or false", _to_bool)
TEXT = Check("a non-empty text", _to_text)


def _to_names(value: Any) -> list[str]:
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise _Invalid


#: A name or a list of names (clips, globs, module prefixes).
NAMES = Check("a name or a list of names", _to_names)

_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _to_device_name(value: Any) -> str:
    if isinstance(value, str) and _DEVICE_NAME.fullmatch(value.strip().lower()):
        return value.strip().lower()
    raise _Invalid


#: A device's spelling; whether it exists is :func:`vsrkit.engine.resolve_device`'s question.
DEVICE = Check("auto, cpu, cuda or cuda:N", _to_device_name)


# -- video encoders -------------------------------------------------------------------------------
#: The CRF scale of the encoders that have one: x264/x265 0–51, VPx and AV1 0–63.
CRF_RANGES: dict[str, tuple[int, int]] = {
    "libx264": (0, 51),
    "libx264rgb": (0, 51),
    "libx265": (0, 51),
    "libvpx": (0, 63),
    "libvpx-vp9": (0, 63),
    "libaom-av1": (0, 63),
    "libsvtav1": (0, 63),
}


def check_crf(crf: Any, codec: str | None, name: str = "crf") -> int | None:
    """``crf`` within ``codec``'s CRF scale (any non-negative integer for other encoders)."""
    if crf is None:
        return None
    low, high = CRF_RANGES.get(codec or "", (0, None))  # type: ignore[arg-type]
    return integer(low, high)(crf, f"{name} for {codec}" if codec in CRF_RANGES else name)


# -- keys -----------------------------------------------------------------------------------------
def nearest_key(key: str, known: Iterable[str], prefix: str = "") -> str:
    """ "did you mean train.iterations?", or the known keys when none is close (``prefix`` dots them)."""
    known = list(known)
    nearest = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if nearest:
        return f"did you mean {prefix}{nearest[0]}?"
    return f"known here: {', '.join(known)}" if known else "no keys are allowed here"
