"""``vsrkit train CONFIG --work-dir DIR [--resume | --overwrite] [--set key=value ...]``.

Also runs under ``torchrun --nproc_per_node N -m vsrkit train ...`` (one process per GPU, or
several on a CPU with gloo).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML config (the papers' recipes are in configs/)",
        description="Train BasicVSR, IconVSR or BasicVSR++ from a YAML config. Checkpoints, logs and "
        "TensorBoard events go to --work-dir. Under torchrun, every process trains one data-parallel "
        "replica (total batch = data.batch_size x processes). See docs/training.md.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/basicvsr_reds.yaml")
    p.add_argument("--work-dir", required=True, help="folder for checkpoints/, logs and tensorboard/")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from WORK_DIR/checkpoints/latest.pth (up to the config's train.iterations)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a WORK_DIR that holds a previous run: its checkpoints, final weights, logs and "
        "TensorBoard events are removed (frame_cache/ and other files stay); without --resume or "
        "--overwrite such a WORK_DIR is refused",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value), e.g. --set train.iterations=1000 "
        "--set data.root=/data/REDS; repeatable",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import train

    train(args.config, args.work_dir, resume=args.resume, overwrite=args.overwrite, overrides=args.overrides)
    return 0
