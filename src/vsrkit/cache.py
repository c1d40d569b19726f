"""Where vsrkit keeps what it downloads or builds: ``$VSRKIT_HOME``, else ``~/.cache/vsrkit``.

Checkpoints live in ``checkpoints/`` under their official file names. A file there is trusted
only while its sha256 matches its entry; the digest of a file is remembered as long as its size
and modification time are unchanged. A download in progress is a ``.NAME.PID.RANDOM.part`` file
beside its target; one older than a day is a killed process's leftover and is removed.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models.registry import WeightsEntry

__all__ = [
    "cache_dir",
    "checkpoint_path",
    "file_sha256",
    "is_good",
    "remember_digest",
    "remove_stale_parts",
    "temp_path",
]

#: Read size for hashing and copying.
CHUNK = 1 << 20
# Temporary files older than this are leftovers of killed processes, never live downloads.
_STALE_PART_S = 24 * 3600


def cache_dir() -> Path:
    """``$VSRKIT_HOME`` if set, else ``~/.cache/vsrkit``. Checkpoints live in ``checkpoints/``."""
    home = os.environ.get("VSRKIT_HOME")
    if home:
        return Path(home).expanduser()
    return Path.home() / ".cache" / "vsrkit"


def checkpoint_path(entry: WeightsEntry) -> Path:
    """Where the cached file of ``entry`` is (or will be): ``cache_dir()/checkpoints/<filename>``."""
    return cache_dir() / "checkpoints" / entry.filename


# Hashing a 25-170 MB file on every get_weights() call is wasteful; remember the digest of a
# file as long as its size and modification time are unchanged.
_DIGESTS: dict[Path, tuple[int, int, str]] = {}


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of ``path`` (remembered while the file is unchanged)."""
    st = path.stat()
    key = path.resolve()
    known = _DIGESTS.get(key)
    if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
        return known[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _DIGESTS[key] = (st.st_size, st.st_mtime_ns, digest)
    return digest


def remember_digest(path: Path, digest: str) -> None:
    """Record the digest of a file just written (hashed while it was written)."""
    st = path.stat()
    _DIGESTS[path.resolve()] = (st.st_size, st.st_mtime_ns, digest)


def is_good(entry: WeightsEntry, path: Path) -> bool:
    """Whether ``path`` is a file holding exactly ``entry``'s checkpoint."""
    try:
        return path.is_file() and entry.matches(file_sha256(path))
    except OSError:
        return False


def temp_path(target: Path) -> Path:
    """A fresh name beside ``target`` for a file being written."""
    # pid + random suffix: unique across processes and across threads of one process.
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")


def remove_stale_parts(target: Path) -> None:
    """Remove the temporary files of ``target`` that killed processes left behind."""
    now = time.time()
    for part in target.parent.glob(f".{target.name}.*.part"):
        try:
            if now - part.stat().st_mtime > _STALE_PART_S:
                part.unlink()
        except OSError:
            pass  # another process may be cleaning up the same file
