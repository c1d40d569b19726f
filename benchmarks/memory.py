"""Peak memory of `vsrkit upscale` on a long clip against a short one, at the same frame size.

Each run is a fresh process (so ru_maxrss is that run's own peak) that decodes a real video
(OpenCV's box.mp4, played back and forth to reach the length, MATLAB-bicubic ×1/4), upscales it
through the public path (`vsrkit.upscale`: decode → engine → H.264 encode) and reports its peak
RSS. The figure of merit is peak(long) / peak(short); the issue's bar is ≤ 1.5.

For contrast, ``--one-pass`` also measures the references' way (the whole clip through
``model(lqs)`` at once) on a shorter pair of lengths: its memory grows with the clip.

``--tiled`` then measures peak RSS under 64-px tiles at two LR frame sizes (default 128² and
512², 16× the pixels) under one memory budget (``VSRKIT_MEMORY_LIMIT_MB``, default 1500): the
tile groups that fit the budget run one after another through a disk spool, so the peak less
the HR frame itself should not grow with the frame size.

The networks keep their full width (64 channels: the state size is what matters) but a
single residual block per branch, so that 1000 frames take minutes, not hours, on 2 cores.

    python benchmarks/memory.py                       # 50 vs 1000 frames, BasicVSR, 64×80 LR
    python benchmarks/memory.py --arch iconvsr --frames 50 400
    python benchmarks/memory.py --arch basicvsr_pp --frames 50 400
    python benchmarks/memory.py --frames 10 20 --tiled      # also 128² vs 512² LR in tiles
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "videos" / "box.mp4"


def make_clip(path: Path, frames: int, height: int, width: int) -> None:
    """A real LR clip of ``frames`` frames: box.mp4 ping-ponged, cropped and BI-downscaled."""
    from vsrkit.data.degradations import bi_degrade
    from vsrkit.data.video import open_frames, open_writer

    gt_h, gt_w = 4 * height, 4 * width
    with open_frames(SOURCE) as source:
        # Frames larger than the source repeat it (mirrored, so there are no hard edges).
        lr = [
            bi_degrade(
                np.ascontiguousarray(
                    np.pad(
                        f,
                        ((0, max(0, gt_h - f.shape[0])), (0, max(0, gt_w - f.shape[1])), (0, 0)),
                        mode="symmetric",
                    )[:gt_h, :gt_w]
                )
            )
            for f in source
        ]
    order = lr + lr[-2:0:-1]  # forward then backward, so the motion stays continuous
    with open_writer(path, fps=25, crf=12) as writer:
        for i in range(frames):
            writer.write(np.ascontiguousarray(order[i % len(order)]))


def child(args: argparse.Namespace) -> None:
    import torch

    import vsrkit
    from vsrkit.upscale import upscale

    torch.manual_seed(0)
    from vsrkit.models import model_config

    # The EDVR-M feature extractor, where the model has one, at the size of the convs above.
    extra = {"edvr_channels": 64} if "edvr_channels" in model_config(args.arch) else {}
    model = vsrkit.create_model(args.arch, mid_channels=64, num_blocks=1, **extra).eval()
    start = time.perf_counter()
    if args.one_pass:
        from vsrkit.data.video import read_all_frames

        frames = read_all_frames(args.input)
        lqs = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)[None]
        with torch.inference_mode():
            model(lqs)
        count = len(frames)
    else:
        summary = upscale(
            args.input, args.output, model=model, overwrite=True, progress=False, tile=args.tile
        )
        count = summary["frames"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"frames": count, "peak_mb": peak_mb, "seconds": time.perf_counter() - start}))


def measure(
    arch: str, clip: Path, out: Path, one_pass: bool, tile: int | None = None, limit_mb: float | None = None
) -> dict:
    cmd = [sys.executable, __file__, "--child", "--arch", arch, "--input", str(clip), "--output", str(out)]
    if one_pass:
        cmd.append("--one-pass")
    if tile is not None:
        cmd += ["--tile", str(tile)]
    env = dict(os.environ)
    if limit_mb is not None:
        env["VSRKIT_MEMORY_LIMIT_MB"] = str(limit_mb)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from vsrkit.models import default_family, families

    parser.add_argument("--arch", default=default_family().name, choices=list(families()))
    parser.add_argument("--frames", type=int, nargs=2, default=[50, 1000], metavar=("SHORT", "LONG"))
    parser.add_argument("--size", default="64x80", help="LR frame size HxW (default 64x80)")
    parser.add_argument(
        "--one-pass", action="store_true", help="also measure whole-clip model(lqs) at 25 and 100"
    )
    parser.add_argument("--tiled", action="store_true", help="also peak RSS in 64-px tiles at two sizes")
    parser.add_argument("--tiled-sizes", type=int, nargs=2, default=[128, 512], metavar=("SMALL", "LARGE"))
    parser.add_argument("--tiled-frames", type=int, default=4)
    parser.add_argument("--limit-mb", type=float, default=1500, help="memory budget for --tiled")
    parser.add_argument("--tile", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    height, width = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="vsrkit-mem-") as tmp:
        tmp = Path(tmp)
        results = {}
        for n in args.frames:
            clip = tmp / f"clip_{n}.mp4"
            make_clip(clip, n, height, width)
            results[n] = measure(args.arch, clip, tmp / f"out_{n}.mp4", one_pass=False)
            r = results[n]
            print(
                f"{args.arch} vsrkit upscale {n:5d} frames {height}x{width}: peak RSS {r['peak_mb']:7.0f} MB "
                f"({r['seconds']:.0f} s)",
                flush=True,
            )
        short, long = (results[n]["peak_mb"] for n in args.frames)
        print(f"peak RSS ratio {args.frames[1]} / {args.frames[0]} frames: {long / short:.2f} (bar: ≤ 1.5)")
        if args.one_pass:
            base = {}
            for n in (25, 100):
                clip = tmp / f"clip_{n}.mp4"
                make_clip(clip, n, height, width)
                base[n] = measure(args.arch, clip, tmp / "unused.mp4", one_pass=True)
                print(f"{args.arch} one pass model(lqs) {n:4d} frames: peak RSS {base[n]['peak_mb']:7.0f} MB")
            print(
                f"one-pass peak RSS ratio 100 / 25 frames: {base[100]['peak_mb'] / base[25]['peak_mb']:.2f}"
            )
        if args.tiled:
            tiled = {}
            for side in args.tiled_sizes:
                clip = tmp / f"tiled_{side}.mp4"
                make_clip(clip, args.tiled_frames, side, side)
                tiled[side] = measure(
                    args.arch, clip, tmp / f"tiled_{side}", one_pass=False, tile=64, limit_mb=args.limit_mb
                )
                # The HR frame (fp32 blend sum, weights, result, 8-bit frame) is needed whatever
                # the tiling: about 4 fp32 copies.
                hr_mb = 4 * 3 * 4 * (4 * side) ** 2 / 2**20
                tiled[side]["hr_mb"] = hr_mb
                print(
                    f"{args.arch} --tile 64, budget {args.limit_mb:.0f} MB, {args.tiled_frames} frames "
                    f"{side}x{side}: peak RSS {tiled[side]['peak_mb']:7.0f} MB, less 4 HR frames in fp32 "
                    f"{tiled[side]['peak_mb'] - hr_mb:7.0f} MB ({tiled[side]['seconds']:.0f} s)",
                    flush=True,
                )
            small, large = (tiled[s] for s in args.tiled_sizes)
            print(
                f"tiled peak RSS ratio {args.tiled_sizes[1]}² / {args.tiled_sizes[0]}² LR: "
                f"{large['peak_mb'] / small['peak_mb']:.2f}; less the HR frames: "
                f"{(large['peak_mb'] - large['hr_mb']) / (small['peak_mb'] - small['hr_mb']):.2f} (≤ 1.2)"
            )


if __name__ == "__main__":
    main()
