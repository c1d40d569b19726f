"""The recurrent VSR networks, their registry and :func:`build_model`.

One family per file, each registering itself (:mod:`vsrkit.models.registry`) at import;
:func:`load_families` imports every module of this package. ``base.py`` holds the interface
every family implements; ``spynet.py``, ``edvr.py`` and ``blocks.py`` hold shared parts.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from ..checks import BOOLEAN, TEXT, Check, integer, nearest_key, number
from ..errors import VsrkitError
from .base import StepInput, VSRModel
from .registry import Family, default_family, families, get_family

_loaded = False


def load_families() -> None:
    """Import every module of this package, so that each family registers itself."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


class _Builders(Mapping[str, type[nn.Module]]):
    """The builders of the registered families, by name (read-only)."""

    def __getitem__(self, name: str) -> type[nn.Module]:
        return families()[name].builder

    def __iter__(self) -> Iterator[str]:
        return iter(families())

    def __len__(self) -> int:
        return len(families())


MODELS: Mapping[str, type[nn.Module]] = _Builders()


# Bounds of the builders' whole-number options, by name. Beyond them a config is a mistake (or a
# hostile checkpoint) that would allocate absurd amounts of memory before failing.
_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "mid_channels": (1, 1024),
    "edvr_channels": (1, 1024),
    "num_blocks": (0, 100),
    "num_cleaning_blocks": (0, 100),
    "keyframe_stride": (1, 100_000),
    "num_segments": (1, 100_000),
}
_FLOAT_BOUNDS: dict[str, tuple[float, float]] = {"max_residue_magnitude": (0.0, 1000.0)}


def _option_check(cls: type[nn.Module], name: str, param: inspect.Parameter) -> Check:
    """What ``cls`` accepts for ``name``: its fixed choices, else by the annotated type and bounds."""
    choices = getattr(cls, "OPTION_CHOICES", {}).get(name)
    if choices is not None:
        return Check(f"one of {', '.join(map(str, choices))}", lambda v: _one_of(v, choices))
    kind = str(param.annotation)
    if kind == "bool":
        return BOOLEAN
    if kind == "int":
        return integer(*_INT_BOUNDS.get(name, (0, 1_000_000)))
    if kind == "float":
        low, high = _FLOAT_BOUNDS.get(name, (-1e9, 1e9))
        return number(low, high, low_open=True)
    return TEXT


def _one_of(value: Any, choices: tuple[Any, ...]) -> Any:
    if isinstance(value, bool) or value not in choices:
        raise ValueError(value)
    return value


def model_config(arch: str, *, source: str = "", section: str = "", **overrides: Any) -> dict[str, Any]:
    """The paper's configuration of ``arch`` (the class defaults), with ``overrides`` applied.

    Every override is checked against the builder's parameters (name, type, range) before
    anything is built. A bad one is a :class:`VsrkitError` that starts with ``source`` (e.g. the
    checkpoint the values come from) and names the key as ``section`` + key (e.g. ``model.``).
    """
    cls = _model_class(arch)
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    config = {k: p.default for k, p in params.items()}
    start = f"{source}: " if source else ""
    for key, value in overrides.items():
        if key not in params:
            hint = nearest_key(key, params, section)
            raise VsrkitError(f"{start}unknown {arch} option {section}{key} ({hint})")
        name = f"{section}{key}" if section else f"{arch} option {key}"
        config[key] = _option_check(cls, key, params[key])(value, start + name)
    return config


def _model_class(arch: str) -> type[nn.Module]:
    return get_family(arch).builder


def build_model(arch: str, **config: Any) -> nn.Module:
    """An untrained ``arch`` with ``config`` over the paper's defaults.

    The model carries ``.arch`` and ``.config`` so that it can be saved and rebuilt.
    """
    family = get_family(arch)
    full = model_config(family.name, **config)
    model = family.builder(**full)
    model.arch = family.name
    model.config = full
    return model


__all__ = [
    "MODELS",
    "Family",
    "StepInput",
    "VSRModel",
    "build_model",
    "default_family",
    "families",
    "get_family",
    "load_families",
    "model_config",
]
