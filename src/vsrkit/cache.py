"""Where vsrkit keeps what it downloads or builds: ``$VSRKIT_HOME``, else ``~/.cache/vsrkit``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$VSRKIT_HOME`` if set, else ``~/.cache/vsrkit``. Checkpoints live in ``checkpoints/``."""
    home = os.environ.get("VSRKIT_HOME")
    if home:
        return Path(home).expanduser()
    return Path.home() / ".cache" / "vsrkit"
