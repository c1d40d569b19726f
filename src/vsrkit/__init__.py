"""vsrkit: video super-resolution with BasicVSR, IconVSR and BasicVSR++ on PyTorch."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .batching import batch
from .errors import VsrkitError
from .models import MODELS, build_model, model_config

__version__ = "0.1.0"


def create_model(
    arch: str | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    **config: Any,
) -> nn.Module:
    """Build a model, optionally with weights.

    ``arch`` is a registered family's name (``vsrkit.models.families()``); ``config`` overrides the
    paper's configuration (``mid_channels``, ``num_blocks``, ``temporal_padding``,
    ``keyframe_stride``, ablation switches, ...). ``checkpoint`` is a file (BasicSR, mmagic or
    vsrkit layout, detected by content) or a registered weights name (see
    :mod:`vsrkit.hub`). Without ``arch``, the architecture and configuration are read from the
    checkpoint. Loading is strict: any key mismatch is a :class:`VsrkitError`.
    The model is returned in eval mode when weights were loaded.
    """
    if checkpoint is None:
        if arch is None:
            raise VsrkitError("create_model needs an architecture or a checkpoint")
        return build_model(arch, **config)

    from .weights import infer_arch, infer_config, load_state_dict_strict, read_checkpoint

    entry = None
    path = checkpoint
    if not os.path.exists(os.fspath(checkpoint)):
        from .hub import get_weights

        path, entry = get_weights(os.fspath(checkpoint))
    ckpt = read_checkpoint(path)
    shapes = f"checkpoint {ckpt.path} (from its tensor shapes)"
    found_arch = (entry.arch if entry else None) or ckpt.arch or infer_arch(ckpt.state_dict, shapes)
    if arch is not None and arch != found_arch:
        raise VsrkitError(f"weights {os.fspath(checkpoint)!r} are for {found_arch}, not {arch}")
    arch = found_arch
    if entry:
        base = dict(entry.config)
    elif ckpt.config:
        # Values read from a file: checked against the builder first, naming the file.
        base = model_config(arch, source=f"checkpoint {ckpt.path} metadata", section="config.", **ckpt.config)
    else:
        # Shapes can be forged (a stride-0 tensor claims any size): checked the same way.
        inferred = infer_config(ckpt.state_dict, arch)
        base = model_config(arch, source=shapes, **inferred)
    model = build_model(arch, **{**base, **config})
    load_state_dict_strict(model, ckpt, arch)
    return model.eval()


__all__ = ["MODELS", "VsrkitError", "batch", "create_model", "model_config", "__version__"]
