"""``torch.library.custom_op`` where this torch has it (2.4 and later), a plain function before."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["custom_op"]


class _PlainFunction:
    """What an op degrades to on torch < 2.4: callable, and ``register_fake`` does nothing."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn


def custom_op(name: str, *, mutates_args: Iterable[str] | str) -> Callable[[Callable[..., Any]], Any]:
    """Define ``torch.ops.<name>`` from a Python function (its CPU kernel); see torch.library.

    The result is called like the function and has ``register_fake`` for the fake (meta)
    kernel that ``torch.export`` and ``torch.compile`` trace with.
    """
    define = getattr(torch.library, "custom_op", None)
    if define is None:
        return _PlainFunction
    return define(name, mutates_args=mutates_args, device_types="cpu")
