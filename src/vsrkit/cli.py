"""The ``vsrkit`` command. Each subcommand lives in its own module with ``register(subparsers)``.

User errors (:class:`VsrkitError`) print one line and exit 2. Ctrl-C (SIGINT), SIGTERM and SIGHUP stop
the command the same way: a :class:`Stopped` exception (a ``KeyboardInterrupt``) is raised in the main
thread, so every ``with`` block cleans up (temporary outputs, spill folders), then one line is printed and
the exit status is 128 + the signal's number (130, 143, 129). Signals that were ignored when vsrkit started
(``nohup``, background jobs) stay ignored, and torchrun's workers keep the default actions (torchrun
manages them). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings
from typing import NoReturn

from .errors import VsrkitError

# Modules holding each subcommand's ``register(subparsers)``, in help order.
SUBCOMMANDS = (
    "vsrkit.commands.upscale",
    "vsrkit.commands.batch",
    "vsrkit.commands.evaluate",
    "vsrkit.commands.train",
    "vsrkit.commands.convert",
    "vsrkit.commands.export",
    "vsrkit.commands.weights",
)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other bad input (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="vsrkit", description="Video super-resolution (BasicVSR family).")
    parser.add_argument("--version", action="version", version=f"vsrkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"vsrkit: warning: {message}", file=sys.stderr)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGHUP: cleans up exactly as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _stop(signum: int, frame: object) -> None:
    # One stop is enough: later SIGTERM/SIGHUP must not interrupt the cleanup the first one started.
    for other in _STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


def _catch_stop_signals() -> dict[int, object]:
    """Install :func:`_stop` for SIGTERM and SIGHUP where they have their default action; returns the
    handlers to restore."""
    previous: dict[int, object] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        # A torchrun worker: torchrun stops its workers with SIGTERM and then SIGKILL, and a worker
        # that unwound on its own while its peers wait in a collective would only add their errors.
        return previous
    for signum in _STOP_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _stop)
    return previous


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    previous = _catch_stop_signals()
    try:
        result = args.func(args)
    except VsrkitError as exc:
        print(f"vsrkit: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and the like: not an error.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        if signum == signal.SIGINT:
            print("vsrkit: interrupted", file=sys.stderr)
        else:
            print(f"vsrkit: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + int(signum)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
