"""``vsrkit upscale INPUT OUTPUT``."""

from __future__ import annotations

import argparse

from ..checks import DEVICE, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_INT, arg, integer
from .model_options import add_model_options, parse_overrides


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "upscale",
        help="upscale a video (or a folder of images) by 4",
        description="Upscale a video file or a folder of frames by 4. Long clips run in bounded memory; "
        "audio and subtitles are copied; the output appears only when complete.",
    )
    p.add_argument("input", help="video file (anything FFmpeg reads) or folder of images (name order)")
    p.add_argument("output", help="output video (.mp4 .mkv .mov .webm .avi) or folder for PNG frames")
    add_options(p)
    p.set_defaults(func=run)


def add_options(p: argparse.ArgumentParser) -> None:
    """Every option of ``upscale`` but its input and output; ``vsrkit batch`` takes them too."""
    from ..backends import BACKENDS
    from ..scenes import add_arguments as add_scene_arguments

    add_model_options(p)
    p.add_argument(
        "--device", default="auto", type=arg(DEVICE), help="auto, cpu, cuda or cuda:N (default: auto)"
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument(
        "--backend",
        default="pytorch",
        choices=BACKENDS,
        help="onnxruntime: run the model's steps as ONNX graphs (exported once, cached; fp32)",
    )
    p.add_argument(
        "--providers",
        default=None,
        metavar="LIST",
        help="--backend onnxruntime: execution providers, comma-separated, in order of preference "
        "(e.g. CUDAExecutionProvider,CPUExecutionProvider; default: CPUExecutionProvider)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        metavar="N",
        help="process N×N LR tiles (N ≥ 64); default: tiles only where a whole frame would not fit "
        "in the memory available; 0: never tile",
    )
    p.add_argument(
        "--tile-overlap",
        type=int,
        default=16,
        metavar="N",
        help="LR pixels shared by neighbouring tiles (≥ 0, less than half the tile; default 16)",
    )
    p.add_argument(
        "--segment-frames",
        type=arg(POSITIVE_INT),
        default=32,
        metavar="K",
        help="BasicVSR/IconVSR: backward states kept in memory (exact for any K; memory grows with K)",
    )
    p.add_argument(
        "--state-disk-mb",
        type=arg(NON_NEGATIVE_FLOAT),
        default=2048,
        metavar="MB",
        help="BasicVSR/IconVSR: temporary disk for backward states, saving their recomputation "
        "on clips longer than K (default 2048; 0 recomputes)",
    )
    p.add_argument(
        "--window-frames", type=arg(integer(2)), default=32, metavar="W", help="BasicVSR++: frames per window"
    )
    p.add_argument(
        "--window-overlap",
        type=arg(NON_NEGATIVE_INT),
        default=8,
        metavar="O",
        help="BasicVSR++: frames shared by windows",
    )
    p.add_argument("--codec", default=None, help="video encoder (default libx264; libvpx-vp9 for .webm)")
    p.add_argument(
        "--crf",
        type=arg(NON_NEGATIVE_INT),
        default=18,
        help="quality for x264/x265 (0-51) or VPx/AV1 (0-63); lower is better (default 18)",
    )
    p.add_argument(
        "--pix-fmt",
        default=None,
        metavar="FMT",
        help="output pixel format (default: the input's depth: yuv420p, or yuv420p10le for 10-bit input; "
        "rgb24/rgb48/gray/gray16 for PNG folders)",
    )
    p.add_argument(
        "--stream",
        type=int,
        default=None,
        metavar="N",
        help="which video stream to upscale, 0 for the first (default: the first that is not cover art)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--allow-corrupt", action="store_true", help="skip undecodable packets instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_scene_arguments(p)


def options_from_args(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`vsrkit.upscale.upscale` given by ``add_options``' options."""
    return dict(
        model=args.model,
        weights=args.weights,
        model_options=parse_overrides(args.overrides),
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        providers=args.providers,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        segment_frames=args.segment_frames,
        state_disk_mb=args.state_disk_mb,
        window_frames=args.window_frames,
        window_overlap=args.window_overlap,
        overwrite=args.overwrite,
        codec=args.codec,
        crf=args.crf,
        pix_fmt=args.pix_fmt,
        stream=args.stream,
        allow_corrupt=args.allow_corrupt,
        scene_cuts=args.scene_cuts,
        scene_threshold=args.scene_threshold,
        min_shot_frames=args.min_shot_frames,
        progress=not args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    from ..upscale import upscale

    summary = upscale(args.input, args.output, **options_from_args(args))
    w, h = summary["output_size"]
    backend = "" if summary["backend"] == "pytorch" else f", {summary['backend']}"
    print(
        f"wrote {summary['output']}: {summary['frames']} frames at {w}x{h} "
        f"in {summary['seconds']:.1f} s ({summary['seconds'] / max(summary['frames'], 1):.2f} s/frame, "
        f"{summary['device']}, {summary['precision']}{backend})"
    )
    return 0
