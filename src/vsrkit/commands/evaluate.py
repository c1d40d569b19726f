"""``vsrkit eval``: PSNR/SSIM of a model (or the bicubic baseline) on a test set, the papers' way."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..checks import DEVICE, NON_NEGATIVE_INT, POSITIVE_INT, arg, choice
from ..errors import VsrkitError
from .model_options import add_model_options, family_names, parse_overrides

__all__ = ["parse_overrides", "register", "run"]

_BICUBIC = "bicubic"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a model on Vid4, UDM10, REDS4, REDSval4, Vimeo-90K-T or your own clips",
        description="Restore each clip whole, quantise to 8 bits, and average PSNR/SSIM per frame, then per "
        "clip, then over clips (the BasicVSR papers' protocol; see docs/evaluation.md). Vimeo-90K-T is "
        "mirror-extended and scored on the centre frame only. Published numbers for the same weights are "
        "printed beside the mean.",
    )
    add_model_options(
        p,
        extra_models=(_BICUBIC,),
        required=True,
        model_help="architecture, or bicubic",
        weights_help="registered weights or a checkpoint file (default: the papers' checkpoint for the "
        "dataset and degradation, e.g. the Vimeo-90K BI model on Vid4 BI)",
    )
    p.add_argument(
        "--dataset",
        required=True,
        metavar="NAME",
        help="vid4, udm10, reds4, redsval4, vimeo90k-t, folder (also reds, vimeo90k with --split)",
    )
    p.add_argument(
        "--root", required=True, metavar="DIR", help="the dataset's folder (only read, never written)"
    )
    p.add_argument("--degradation", default="bi", metavar="bi|bd", help="default: bi")
    p.add_argument("--split", default="test", help="test (default); reds/reds4/vimeo90k: train, reds: val")
    p.add_argument("--clips", metavar="A,B", help="score only these clips (comma-separated)")
    p.add_argument(
        "--space",
        type=arg(choice("y", "rgb")),
        metavar="y|rgb",
        help="default: rgb for REDS, y elsewhere (as the papers)",
    )
    p.add_argument(
        "--crop-border",
        type=arg(NON_NEGATIVE_INT),
        default=0,
        metavar="N",
        help="pixels dropped per side (default 0)",
    )
    p.add_argument(
        "--max-frames", type=arg(POSITIVE_INT), metavar="N", help="score only the first N frames of each clip"
    )
    p.add_argument(
        "--device", default="auto", type=arg(DEVICE), metavar="cpu|cuda|auto", help="default: auto"
    )
    p.add_argument(
        "--json", metavar="OUT", help="also write the result as JSON (atomically; an existing OUT is refused)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def _check_json_path(path: str, overwrite: bool) -> None:
    """Refuse before the (long) evaluation what the end would refuse."""
    if os.path.isdir(path):
        raise VsrkitError(f"--json {path} is a folder; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise VsrkitError(f"--json {path} exists; pass --overwrite to replace it")


def _write_json(path: str, result: dict[str, Any], overwrite: bool) -> None:
    from ..weights import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")

    try:
        # A temporary file beside OUT, then moved into place; without --overwrite it never replaces a
        # file that appeared while the evaluation ran.
        atomic_write(path, write, replace=overwrite)
    except FileExistsError:
        raise VsrkitError(
            f"--json {path} appeared during the evaluation; pass --overwrite to replace it"
        ) from None
    except VsrkitError:
        raise
    except OSError as exc:
        raise VsrkitError(f"cannot write {path}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    from ..data.datasets import DATASETS, DEGRADATIONS
    from ..evaluate import default_weights, evaluate, format_table
    from ..models import get_family

    model = args.model.lower()
    if model != _BICUBIC:
        try:
            model = get_family(model).name
        except VsrkitError:
            choices = ", ".join([_BICUBIC, *family_names()])
            raise VsrkitError(f"unknown model {args.model!r}; choose one of: {choices}") from None
    dataset = args.dataset.lower()
    if dataset not in DATASETS:
        raise VsrkitError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    degradation = args.degradation.lower()
    if degradation not in DEGRADATIONS:
        raise VsrkitError(f"unknown degradation {args.degradation!r}; choose bi or bd")
    config = parse_overrides(args.overrides)
    if args.json:
        _check_json_path(args.json, args.overwrite)
    clips = [c for c in args.clips.split(",") if c.strip()] if args.clips else None

    weights = args.weights
    if model != _BICUBIC and weights is None:
        weights = default_weights(model, dataset, degradation)
        print(f"weights: {weights} (the papers' checkpoint for {model} on {dataset} {degradation.upper()})")

    result = evaluate(
        model,
        weights=weights,
        dataset=dataset,
        root=args.root,
        degradation=degradation,
        split=args.split,
        clips=clips,
        space=args.space,
        crop_border=args.crop_border,
        device=args.device,
        max_frames=args.max_frames,
        progress=not args.no_progress,
        config=config,
    )
    print(format_table(result))
    if args.json:
        _write_json(args.json, result, args.overwrite)
        print(f"wrote {args.json}")
    return 0
