"""``vsrkit batch INPUT... --output-dir DIR``: many videos, or long films in shots, on Ray."""

from __future__ import annotations

import argparse
import sys

from .upscale import add_options, options_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "batch",
        help="upscale many videos (or long films, shot by shot) on Ray workers",
        description="Upscale every INPUT into DIR/<input stem>.mp4 on a local Ray or a Ray cluster "
        "(pip install 'vsrkit[ray]'). Existing complete outputs are skipped; a failed input is "
        "reported and the others go on; the exit code is 1 if any input failed.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video file, folder of videos, or @list.txt")
    p.add_argument("--output-dir", "-o", required=True, metavar="DIR", help="folder for the outputs")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tasks at once (default: one per GPU, else a quarter of the CPUs, at least 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="T",
        help="PyTorch threads per worker (default: CPUs / workers)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="a running Ray cluster (HOST:PORT or ray://HOST:PORT); default: start a local Ray",
    )
    add_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..batching import batch
    from ..upscale import check_model_options

    options = options_from_args(args)
    # Checked here, once, rather than failing every input on the workers.
    check_model_options(options["model"], options["model_options"], options["weights"])
    progress = options.pop("progress")
    summary = batch(
        args.inputs,
        args.output_dir,
        workers=args.workers,
        threads=args.threads,
        address=args.ray_address,
        progress=progress,
        **options,
    )
    for input, reason in summary["failed"].items():
        print(f"vsrkit: error: {input}: {reason}", file=sys.stderr)
    print(
        f"{len(summary['done'])} upscaled, {len(summary['skipped'])} skipped (complete), "
        f"{len(summary['failed'])} failed, in {summary['seconds']:.1f} s; outputs in {args.output_dir}"
    )
    return 1 if summary["failed"] else 0
