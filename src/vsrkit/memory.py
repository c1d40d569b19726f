"""How much memory a run will need, and how much there is.

The engine asks :func:`available_memory` before it allocates anything large and compares it with
its own estimate (:meth:`vsrkit.engine.Upscaler.plan`), built from the models' own figures
(``model.inference_memory(height, width, element_size)``, an :class:`InferenceMemory`).

Available memory is the smallest of: Linux's MemAvailable, the cgroup (v2 or v1) limit less
what the cgroup already uses (its reclaimable page cache not counted), and the soft
``RLIMIT_AS`` / ``RLIMIT_DATA`` less the process's current size. On CUDA it is
``torch.cuda.mem_get_info``'s free figure. ``VSRKIT_MEMORY_LIMIT_MB`` (or
``EngineOptions.memory_limit_mb``) replaces the measurement, for tests and for sharing a
machine.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import NamedTuple

import torch

MEMORY_LIMIT_ENV = "VSRKIT_MEMORY_LIMIT_MB"
MB = 2**20


class InferenceMemory(NamedTuple):
    """A model's memory at one (tile) size, in bytes.

    ``step``: the transient peak of one frame's step (the largest of the propagation step, the
    keyframe feature and the ×4 reconstruction tail), freed after the step.
    ``frame_state``: what is kept per frame while the clip streams (one backward state; for a
    whole-window model, everything a window forward keeps per frame).
    ``clip_state``: what is kept once per tile for the whole pass (IconVSR's frame pyramids).
    """

    step: int
    frame_state: int
    clip_state: int = 0


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo(field: str, path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_free() -> int | None:
    """The cgroup's limit less its non-reclaimable usage (v2, then v1); None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    root = Path("/sys/fs/cgroup")
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            folders = [root / rel, root]
            limit_name, usage_name, cache_field = "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            folders = [root / "memory" / rel, root / "memory"]
            limit_name, usage_name = "memory.limit_in_bytes", "memory.usage_in_bytes"
            cache_field = "total_inactive_file"
        else:
            continue
        for folder in folders:
            limit = _read_int(folder / limit_name)
            if limit is None or limit >= 2**60:
                continue
            usage = _read_int(folder / usage_name) or 0
            cache = _meminfo_stat(folder / "memory.stat", cache_field) or 0
            return max(0, limit - max(0, usage - cache))
    return None


def _meminfo_stat(path: Path, field: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == field and value.strip().isdigit():
                return int(value)
    except OSError:
        return None
    return None


def _rlimit_free() -> int | None:
    """What the soft address-space and data-size limits still allow this process."""
    free = []
    for limit, field in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(limit)
        if soft == resource.RLIM_INFINITY or soft < 0:
            continue
        used = _meminfo(field, "/proc/self/status") or 0
        free.append(max(0, soft - used))
    return min(free) if free else None


def available_memory(device: torch.device | str = "cpu", limit_mb: float | None = None) -> tuple[int, str]:
    """Bytes this process can still allocate on ``device``, and where the figure comes from."""
    if limit_mb is None and os.environ.get(MEMORY_LIMIT_ENV):
        from .errors import VsrkitError

        raw = os.environ[MEMORY_LIMIT_ENV]
        try:
            limit_mb = float(raw)
        except ValueError:
            raise VsrkitError(f"{MEMORY_LIMIT_ENV}={raw!r} is not a number of MB") from None
        if not limit_mb > 0 or limit_mb == float("inf"):
            raise VsrkitError(f"{MEMORY_LIMIT_ENV}={raw!r} must be a positive number of MB")
        return int(limit_mb * MB), MEMORY_LIMIT_ENV
    if limit_mb is not None:
        return int(limit_mb * MB), "memory_limit_mb"
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "free CUDA memory"
    figures = {
        "MemAvailable": _meminfo("MemAvailable"),
        "the cgroup's memory limit": _cgroup_free(),
        "RLIMIT_AS/RLIMIT_DATA": _rlimit_free(),
    }
    known = {name: value for name, value in figures.items() if value is not None}
    if not known:
        return 2**62, "no limit found"
    name = min(known, key=known.__getitem__)
    return known[name], name


def peak_rss_reset() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """VmHWM in bytes (ru_maxrss where /proc is missing)."""
    value = _meminfo("VmHWM", "/proc/self/status")
    if value is not None:
        return value
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    return _meminfo("VmRSS", "/proc/self/status") or 0


def format_mb(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / MB:.0f} MB"
