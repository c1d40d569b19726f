"""The three recurrent VSR networks and :func:`create_model`.

One family per file: ``basicvsr.py``, ``iconvsr.py`` (with ``edvr.py``), ``basicvsr_pp.py``;
``spynet.py`` and ``blocks.py`` hold what they share.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .basicvsr import BasicVSR
from .basicvsr_pp import BasicVSRPlusPlus
from .iconvsr import IconVSR

MODELS: dict[str, type[nn.Module]] = {
    "basicvsr": BasicVSR,
    "iconvsr": IconVSR,
    "basicvsr_pp": BasicVSRPlusPlus,
}


def model_config(arch: str, **overrides: Any) -> dict[str, Any]:
    """The paper's configuration of ``arch`` (the class defaults), with ``overrides`` applied."""
    cls = _model_class(arch)
    params = inspect.signature(cls.__init__).parameters
    config = {k: p.default for k, p in params.items() if k != "self"}
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        from ..errors import VsrkitError

        raise VsrkitError(f"{arch} has no option {', '.join(unknown)} (options: {', '.join(config)})")
    config.update(overrides)
    return config


def _model_class(arch: str) -> type[nn.Module]:
    if arch not in MODELS:
        from ..errors import VsrkitError

        raise VsrkitError(f"unknown architecture {arch!r} (choose from {', '.join(MODELS)})")
    return MODELS[arch]


def build_model(arch: str, **config: Any) -> nn.Module:
    """An untrained ``arch`` with ``config`` over the paper's defaults.

    The model carries ``.arch`` and ``.config`` so that it can be saved and rebuilt.
    """
    full = model_config(arch, **config)
    model = _model_class(arch)(**full)
    model.arch = arch
    model.config = full
    return model


__all__ = ["MODELS", "BasicVSR", "BasicVSRPlusPlus", "IconVSR", "build_model", "model_config"]
