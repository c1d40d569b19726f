"""``vsrkit export --model M OUT.onnx``: a model as an ONNX file (see :mod:`vsrkit.export`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from ..export import DEFAULT_OPSET, DEFORM_CONV_CHOICES
    from .model_options import add_model_options

    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX (onnxruntime, TensorRT, OpenVINO)",
        description="Write the model as ONNX: input lq (1, T, 3, H, W) float32 RGB in [0, 1] with H and W "
        "free, output hq (1, T, 3, 4H, 4W). The deformable convolutions are ONNX DeformConv (opset 19) "
        "unless --deform-conv decomposed. The file is checked and run once in onnxruntime before it "
        "appears. Needs pip install 'vsrkit[onnx]'.",
    )
    p.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    add_model_options(
        p,
        weights_help="registered weights name (see `vsrkit weights`) or checkpoint file; "
        "default: the weights `vsrkit upscale` uses for the model",
    )
    p.add_argument(
        "--frames", type=int, default=5, metavar="T", help="frames per clip, fixed in the graph (default 5)"
    )
    p.add_argument(
        "--deform-conv",
        default="native",
        choices=list(DEFORM_CONV_CHOICES),
        help="native: ONNX DeformConv (onnxruntime, TensorRT); decomposed: GridSample and MatMul, for "
        "runtimes without DeformConv such as OpenVINO (default native)",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.onnx if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import VsrkitError
    from ..export import check_destination, export_onnx, file_sha256, require_onnx
    from .model_options import parse_overrides

    require_onnx()
    config = parse_overrides(args.overrides)
    # Refused before the weights are fetched; export_onnx checks again before writing.
    check_destination(Path(args.output), args.overwrite)
    if args.frames < 1:
        raise VsrkitError(f"--frames must be at least 1, got {args.frames}")
    model, weights_name, weights_path = _load(args.model, args.weights, config)
    summary = export_onnx(
        model,
        args.output,
        frames=args.frames,
        deform_conv=args.deform_conv,
        opset=args.opset,
        weights_name=weights_name,
        weights_sha256=file_sha256(weights_path),
        overwrite=args.overwrite,
    )
    print(
        f"wrote {summary['output']}: {summary['arch']} ({weights_name}), {summary['frames']} frames of any "
        f"size, opset {summary['opset']}, {summary['deform_conv_nodes']} DeformConv nodes, "
        f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.0f} s; checked and run in onnxruntime"
    )
    return 0


def _load(arch: str | None, weights: str | None, config: dict):
    """The model with its weights, the weights' name and the checkpoint file read."""
    import os

    from .. import create_model
    from ..errors import VsrkitError
    from ..hub import get_weights
    from ..upscale import model_family, weights_or_default

    family = model_family(arch, weights)
    arch = family.name
    name = os.fspath(weights_or_default(family, weights))
    path, _ = get_weights(name)
    try:
        model = create_model(arch, checkpoint=name, **config)
    except (TypeError, ValueError) as exc:
        raise VsrkitError(f"cannot build {arch} with {config}: {exc}") from None
    label = os.path.basename(name) if os.path.exists(name) else name
    return model, label, path
