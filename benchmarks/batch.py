"""`vsrkit batch` on Ray against one process: throughput, and a three-shot film split over workers.

1. The same 8 short real clips (LR ×1/4 slices of the shared videos) upscaled by
   - one process with 2 PyTorch threads, one clip after another (``vsrkit.upscale`` in a loop);
   - ``vsrkit.batch`` with 2 workers × 1 thread on a local Ray.
   The ratio of their wall times is Ray's overhead plus the difference between 2×1 and 1×2
   threads; Ray's start is timed apart.
2. A three-shot film (cup, box, street; LR ×1/4) upscaled with ``--scene-cuts``: sequentially
   (one process, 2 threads) against split over 2 workers × 1 thread.

The model is BasicVSR at its paper size (random weights: the same work as the real ones).

    PYTHONPATH=src python benchmarks/batch.py [--frames 8] [--shot-frames 12]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

import vsrkit  # noqa: E402
from vsrkit.data.degradations import bi_degrade  # noqa: E402
from vsrkit.data.video import open_frames, open_writer  # noqa: E402
from vsrkit.models import default_family  # noqa: E402
from vsrkit.upscale import upscale  # noqa: E402
from vsrkit.weights import save_vsrkit  # noqa: E402

SHARED = Path(os.environ.get("VSRKIT_SHARED", REPO.parent / "shared")) / "data" / "videos"
# (video, first frame, crop to 640×480 where larger): 8 clips from 6 real videos.
CLIPS = [
    ("cup.mp4", 0, None),
    ("cup.mp4", 100, None),
    ("box.mp4", 0, None),
    ("box.mp4", 200, None),
    ("vtest.avi", 0, (480, 640)),
    ("tree.avi", 0, None),
    ("bikes.mp4", 0, None),
    ("bigbuckbunny.mp4", 0, (480, 640)),
]


def write_clip(video: Path, first: int, count: int, crop, path: Path) -> Path:
    with open_frames(video) as source, open_writer(path, source=source, crf=12) as writer:
        for i, frame in enumerate(source):
            if i < first:
                continue
            if i >= first + count:
                break
            frame = frame[: crop[0], : crop[1]] if crop else frame
            writer.write(np.ascontiguousarray(bi_degrade(frame)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8, help="frames per clip")
    parser.add_argument("--shot-frames", type=int, default=12, help="frames per shot of the film")
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # The Ray workers import this checkout's vsrkit too.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])
    )
    import ray

    work = Path(tempfile.mkdtemp(prefix="vsrkit-batch-bench-"))
    try:
        torch.manual_seed(0)
        weights = work / "model.safetensors"
        save_vsrkit(vsrkit.create_model(default_family().name), weights)
        clips = []
        for n, (name, first, crop) in enumerate(CLIPS):
            clips.append(
                write_clip(SHARED / name, first, args.frames, crop, work / f"clip{n}_{Path(name).stem}.mp4")
            )
        frames = len(CLIPS) * args.frames
        print(f"{len(clips)} clips × {args.frames} frames (LR ×1/4 of real video), BasicVSR paper size, CPU")

        torch.set_num_threads(2)

        def one_process(run: int) -> float:
            folder = work / f"one{run}"
            folder.mkdir()
            start = time.perf_counter()
            for clip in clips:
                upscale(clip, folder / clip.name, weights=weights, progress=False)
            return time.perf_counter() - start

        def on_ray(run: int) -> float:
            start = time.perf_counter()
            summary = vsrkit.batch(
                clips, work / f"ray{run}", workers=2, threads=1, weights=weights, progress=False
            )
            assert not summary["failed"], summary["failed"]
            return time.perf_counter() - start

        start = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
        )
        ray_start = time.perf_counter() - start
        try:
            # Alternated, so that a change in the machine's load hits both alike. Ray's first run
            # also starts its workers' Python (imports torch and vsrkit); the second finds them warm.
            times = {"one": [], "ray": []}
            for run, label in enumerate(("workers cold", "workers warm")):
                one, on = one_process(run), on_ray(run)
                times["one"].append(one)
                times["ray"].append(on)
                print(
                    f"run {run + 1} ({label}): 1 process × 2 threads {one:.1f} s "
                    f"({frames / one:.2f} frames/s), "
                    f"Ray 2 workers × 1 thread {on:.1f} s ({frames / on:.2f} frames/s): "
                    f"ratio {on / one:.3f} ({(on / one - 1) * 100:+.1f} %)",
                    flush=True,
                )
            best = min(times["ray"]) / min(times["one"])
            print(
                f"best of each: ratio {best:.3f} ({(best - 1) * 100:+.1f} %); "
                f"Ray's start {ray_start:.1f} s more"
            )

            from test_scene_cuts import make_three_shot_film

            film = make_three_shot_film(SHARED, work / "film.mp4", args.shot_frames)
            start = time.perf_counter()
            upscale(
                film,
                work / "film_sequential.mp4",
                weights=weights,
                scene_cuts=True,
                min_shot_frames=4,
                progress=False,
            )
            sequential = time.perf_counter() - start
            start = time.perf_counter()
            summary = vsrkit.batch(
                [film],
                work / "split",
                workers=2,
                threads=1,
                weights=weights,
                scene_cuts=True,
                min_shot_frames=4,
                progress=False,
            )
            split = time.perf_counter() - start
            assert not summary["failed"], summary["failed"]
            print(
                f"three-shot film ({3 * args.shot_frames} frames): sequential (1 process × 2 threads) "
                f"{sequential:.1f} s, split over 2 workers × 1 thread {split:.1f} s "
                f"(ratio {split / sequential:.3f})"
            )
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
