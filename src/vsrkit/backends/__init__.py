"""Where a model's computation runs: PyTorch itself, or exported graphs in another runtime.

A backend other than PyTorch is an adapter with the :class:`~vsrkit.models.base.VSRModel`
interface, so the engine drives it exactly as it drives a PyTorch model (streaming, tiles,
windows). See :mod:`vsrkit.backends.onnxruntime`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..checks import choice
from ..errors import VsrkitError

if TYPE_CHECKING:
    from ..models.base import VSRModel

#: ``pytorch`` (the default) or ``onnxruntime``.
BACKENDS = ("pytorch", "onnxruntime")


def check_backend(backend: str, providers: str | Sequence[str] | None = None) -> str:
    """The backend's name, checked; ``providers`` only go with ``onnxruntime``."""
    backend = choice(*BACKENDS)(backend, "backend")
    if providers and backend != "onnxruntime":
        raise VsrkitError("--providers goes with --backend onnxruntime")
    return backend


def wrap_model(
    model: VSRModel, backend: str = "pytorch", providers: str | Sequence[str] | None = None
) -> VSRModel:
    """``model`` itself for PyTorch, else an adapter that runs its steps in ``backend``."""
    if check_backend(backend, providers) == "pytorch":
        return model
    from .onnxruntime import OnnxRuntimeModel

    return OnnxRuntimeModel(model, providers)
