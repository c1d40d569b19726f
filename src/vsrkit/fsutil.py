"""File-safety primitives: nothing the user did not ask vsrkit to replace is ever replaced or removed.

* :func:`put_in_place` moves a finished temporary file or folder to its final name **without replacing**
  anything there: ``renameat2(RENAME_NOREPLACE)`` on Linux; elsewhere, or on file systems that lack it,
  ``os.link`` + unlink for files and an empty-folder reservation for folders. Whatever appeared at the final
  name during the run makes it raise :class:`FileExistsError`, and the caller decides (``--overwrite``).
* Temporary names carry their owner: ``.NAME.partial-PID-HOST-XXXXXXXX[.EXT]`` beside an output,
  ``.NAME.old-PID-HOST-XXXXXXXX`` for an old output moved aside, ``vsrkit-PID-HOST-XXXXXXXX`` for spill
  folders in the temporary directory. ``PID`` is the creating process, ``HOST`` six hex digits of a hash
  of the machine's name (another machine sharing the folder has other process ids), ``XXXXXXXX`` random.
* :func:`remove_dead_leftovers` and :func:`remove_dead_spill` remove such names whose owner process is
  gone: killed with ``kill -9``, or by a power cut. Only entries that match these patterns exactly, belong
  to this user, were made on this machine, and hold only what vsrkit puts there are touched. A process id
  reused by an unrelated live process makes a leftover look alive: it then stays until that process ends
  (the safe direction).
* :func:`disk_full_error` turns a full disk (``ENOSPC``, ``EDQUOT``, ``EFBIG``) into one line naming the
  path.
* :func:`deferred_signals` holds SIGINT, SIGTERM and SIGHUP back while a few renames must happen together.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import VsrkitError

__all__ = [
    "DiskFullError",
    "deferred_signals",
    "disk_full_error",
    "is_disk_full",
    "make_spill_dir",
    "make_temp_dir",
    "make_temp_file",
    "owner_tag",
    "pid_alive",
    "put_in_place",
    "remove_folder_holding_only",
    "remove_dead_leftovers",
    "remove_dead_spill",
]

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "file too large")

# tempfile's random part: 8 characters of [a-z0-9_].
_OWNER = r"(?P<pid>[1-9][0-9]{0,9})-(?P<host>[0-9a-f]{6})-[a-z0-9_]{8}"
LEFTOVER_NAME = re.compile(rf"\.(?P<name>.+)\.(?:partial|old|shots)-{_OWNER}(?:\.[A-Za-z0-9]{{1,8}})?")
SPILL_NAME = re.compile(rf"vsrkit-{_OWNER}")
# What a leftover folder may hold for it to be removed: PNG frames (outputs), spilled tensors and frames.
_FRAME_NAME = re.compile(r"\d{8}\.png")
# Shot segments of a video cut at scene cuts (vsrkit.scenes), encoded apart and joined later.
_OUTPUT_PIECE_NAME = re.compile(r"\d{8}\.png|shot-\d{8}\.[A-Za-z0-9]{1,8}")
_SPILL_FILE_NAME = re.compile(r"[A-Za-z0-9_]+\.(?:pt|u8)")


class DiskFullError(VsrkitError, OSError):
    """The disk (or the user's quota) is full: a one-line user error that is also an ``OSError``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "disk full"


# ------------------------------------------------------------------------------------ owner tags


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def owner_tag() -> str:
    """``PID-HOST`` of this process (evaluated on each call: a forked child has its own)."""
    return f"{os.getpid()}-{_host_tag()}"


def make_temp_file(folder: str | os.PathLike[str], base: str, suffix: str = "") -> Path:
    """Create ``folder/.BASE.partial-PID-HOST-XXXXXXXX[SUFFIX]`` (empty, private) and return it."""
    fd, name = tempfile.mkstemp(prefix=f".{base}.partial-{owner_tag()}-", suffix=suffix, dir=folder)
    os.close(fd)
    return Path(name)


def make_temp_dir(folder: str | os.PathLike[str], base: str, kind: str = "partial") -> Path:
    """Create the folder ``folder/.BASE.KIND-PID-HOST-XXXXXXXX`` (``kind``: partial, old or shots)."""
    return Path(tempfile.mkdtemp(prefix=f".{base}.{kind}-{owner_tag()}-", dir=folder))


def make_spill_dir(parent: str | os.PathLike[str] | None = None) -> Path:
    """Create ``vsrkit-PID-HOST-XXXXXXXX`` in ``parent`` (default: the temporary directory)."""
    return Path(tempfile.mkdtemp(prefix=f"vsrkit-{owner_tag()}-", dir=parent))


# ------------------------------------------------------------------------------- leftover removal


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (any owner). Unsure counts as alive."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user, or cannot be asked: never treat it as gone
    return True


def _euid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else 0  # Windows: files carry no owner uid (st_uid 0)


def _dead_owner(match: re.Match[str], entry: os.DirEntry[str]) -> bool:
    if match["host"] != _host_tag():
        return False  # made on another machine sharing this folder: its process ids mean nothing here
    try:
        if entry.stat(follow_symlinks=False).st_uid != _euid():
            return False
    except OSError:
        return False
    return not pid_alive(int(match["pid"]))


def remove_folder_holding_only(path: Path, allowed: re.Pattern[str]) -> bool:
    """Remove ``path`` if it holds nothing but regular files whose names match ``allowed``."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    if not all(e.is_file(follow_symlinks=False) and allowed.fullmatch(e.name) for e in entries):
        return False
    for e in entries:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(e.path)
    try:
        os.rmdir(path)  # fails, leaving it, if something new appeared inside meanwhile
    except OSError:
        return False
    return True


def _scan(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:
        return []


def remove_dead_leftovers(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove vsrkit's temporary outputs in ``folder`` (``.NAME.partial-…``, ``.NAME.old-…``) whose owner
    process is gone; returns what was removed. Files go; folders only if they hold PNG frames or shot
    segments alone."""
    removed = []
    for entry in _scan(Path(folder)):
        match = LEFTOVER_NAME.fullmatch(entry.name)
        if match is None or not _dead_owner(match, entry):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                if remove_folder_holding_only(path, _OUTPUT_PIECE_NAME):
                    removed.append(path)
            elif entry.is_file(follow_symlinks=False):
                path.unlink()
                removed.append(path)
        except OSError:
            pass  # another run may be removing it too
    return removed


def remove_dead_spill(parent: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove ``vsrkit-PID-HOST-…`` spill folders in ``parent`` (default: the temporary directory) whose
    owner process is gone and that hold only spilled frames and tensors; returns what was removed."""
    removed = []
    for entry in _scan(Path(parent if parent is not None else tempfile.gettempdir())):
        match = SPILL_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False) or not _dead_owner(match, entry):
            continue
        if remove_folder_holding_only(Path(entry.path), _SPILL_FILE_NAME):
            removed.append(Path(entry.path))
    return removed


# ---------------------------------------------------------------------------- put in place


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2 = None
_renameat2_checked = False


def _get_renameat2():  # noqa: ANN202 - a ctypes function or None
    global _renameat2, _renameat2_checked
    if not _renameat2_checked:
        _renameat2_checked = True
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
            except (OSError, AttributeError):
                fn = None
            if fn is not None:
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = fn
    return _renameat2


def _rename_noreplace(src: Path, dest: Path) -> bool:
    """renameat2(RENAME_NOREPLACE); False where the system or file system does not offer it."""
    fn = _get_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # old kernel, or a file system without the flag (some FUSE/network ones)
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), str(dest))
    raise OSError(code, os.strerror(code), str(src), None, str(dest))


_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EACCES)


def put_in_place(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Rename ``src`` (a file or folder) to ``dest`` in the same folder, never replacing anything.

    Raises :class:`FileExistsError` if anything (a file, a folder, even empty, a dangling link) is at
    ``dest`` at the moment of the rename; ``src`` is then left where it was.
    """
    src, dest = Path(src), Path(dest)
    if _rename_noreplace(src, dest):
        return
    if src.is_dir() and not src.is_symlink():
        # Reserve the name with an empty folder of our own: rename() may replace an empty folder, but
        # fails on one that something was put into meanwhile.
        os.mkdir(dest)
        try:
            os.rename(src, dest)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dest)) from exc
            with contextlib.suppress(OSError):
                os.rmdir(dest)
            raise
        return
    try:
        os.link(src, dest, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here (FAT, some FUSE): reserve the name with an empty file of our own.
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.rename(src, dest)
        return
    os.unlink(src)


# --------------------------------------------------------------------------------- disk full


def is_disk_full(exc: BaseException, folder: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``exc`` (or an exception it came from) is a full disk or quota.

    Some writers hide the ``OSError`` (``torch.save`` to a path raises a RuntimeError, safetensors its own
    error): their message, and then the free space left in ``folder``, decide.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        text = str(current).lower()
        if any(t in text for t in _DISK_FULL_TEXTS) or re.search(r"os error (28|122|27)\b", text):
            return True
        current = current.__cause__ or current.__context__
    if folder is None or not isinstance(exc, (OSError, RuntimeError)) or not hasattr(os, "statvfs"):
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    free_blocks = st.f_bfree if _euid() == 0 else st.f_bavail
    return free_blocks * st.f_frsize < 64 * 1024


def disk_full_error(exc: BaseException, path: str | os.PathLike[str], hint: str = "") -> DiskFullError:
    """The one-line error for a full disk while writing ``path``."""
    reason = "no space left on device"
    for current in (exc, exc.__cause__, exc.__context__):
        if isinstance(current, OSError) and current.errno == errno.EDQUOT:
            reason = "disk quota exceeded"
        elif isinstance(current, OSError) and current.errno == errno.EFBIG:
            reason = "file too large for the file system"
    error = DiskFullError(f"cannot write {path}: {reason}{'; ' + hint if hint else ''}")
    error.errno = errno.ENOSPC
    error.strerror = reason
    return error


# ---------------------------------------------------------------------------------- signals

_DEFERRED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back for the ``with`` block; one that arrived meanwhile is then
    handled as usual (its handler runs, or its default action). Outside the main thread: no effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in _DEFERRED_SIGNALS:
        if signal.getsignal(signum) is None:
            continue  # a handler installed outside Python: cannot be restored, so left alone
        previous[signum] = signal.signal(signum, lambda s, _f: pending.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signal.raise_signal(pending[0])


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, replace: bool = True) -> None:
    """Call ``write(tmp_path)``, fsync, then move the file to ``path``: readers never see a partial file.

    The temporary file, ``.NAME.partial-PID-HOST-XXXXXXXX`` beside ``path`` (:mod:`vsrkit.fsutil`), is
    removed on any exception; those left by killed processes are removed by the next call in that
    folder. ``replace=False`` never replaces an existing ``path``, even one that appeared while writing:
    :class:`FileExistsError`. A full disk or quota raises :class:`~vsrkit.fsutil.DiskFullError` (a
    one-line :class:`VsrkitError` that is also an ``OSError``) naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(path.parent)
    try:
        tmp = make_temp_file(path.parent, path.name)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, path) from None
        raise
    try:
        write(str(tmp))
        # mkstemp makes the file private (0600), and so do some writers (safetensors replaces the file it is
        # given with its own); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            put_in_place(tmp, path)
    except BaseException as exc:
        # Judged before the partial file is removed: removing it frees the space that ran out.
        full = not isinstance(exc, VsrkitError) and is_disk_full(exc, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full_error(exc, path) from None
        raise
