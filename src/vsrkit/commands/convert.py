"""``vsrkit convert SRC DST``: any supported checkpoint → vsrkit's safetensors format."""

from __future__ import annotations

import argparse
import os

from ..errors import VsrkitError


def register(subparsers) -> None:
    from .model_options import family_names

    p = subparsers.add_parser(
        "convert",
        help="convert a BasicSR/mmagic checkpoint to vsrkit's safetensors format",
        description="Read a checkpoint (BasicSR or mmagic layout, or a registered weights name), load "
        "it strictly, and write safetensors with the architecture and config in its metadata.",
    )
    p.add_argument("src", help="checkpoint file or registered weights name")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--arch", choices=family_names(), help="default: read from the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import create_model
    from ..weights import save_vsrkit

    if os.path.exists(args.dst) and not args.overwrite:
        raise VsrkitError(f"{args.dst} exists; pass --overwrite")
    model = create_model(args.arch, checkpoint=args.src)
    try:
        save_vsrkit(model, args.dst)
    except OSError as exc:
        raise VsrkitError(f"cannot write {args.dst}: {exc.strerror or exc}") from None
    count = sum(p.numel() for p in model.parameters())
    print(f"{args.src} → {args.dst}: {model.arch}, {count:,} parameters, config {model.config}")
    return 0
