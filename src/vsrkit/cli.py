"""The ``vsrkit`` command. Each subcommand lives in its own module with ``register(subparsers)``.

User errors (:class:`VsrkitError`) print one line and exit 2; Ctrl-C exits 130. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .errors import VsrkitError

# Modules holding each subcommand's ``register(subparsers)``, in help order.
SUBCOMMANDS = (
    "vsrkit.commands.upscale",
    "vsrkit.commands.evaluate",
    "vsrkit.commands.train",
    "vsrkit.commands.convert",
    "vsrkit.commands.export",
    "vsrkit.commands.weights",
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="vsrkit", description="Video super-resolution (BasicVSR family).")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        result = args.func(args)
    except VsrkitError as exc:
        print(f"vsrkit: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and the like: not an error.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("vsrkit: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
