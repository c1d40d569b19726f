"""``vsrkit.upscale(input, output)``: a video file or image folder in, a 4× one out."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from torch import nn

from .engine import EngineOptions, Upscaler
from .errors import VsrkitError

# The weights used when only an architecture is named: each family's REDS model, the most
# general of the published ones (REDS is real footage with large motion).
DEFAULT_WEIGHTS_FOR = {
    "basicvsr": "basicvsr_reds4",
    "iconvsr": "iconvsr_reds4",
    "basicvsr_pp": "basicvsr_pp_reds4",
}


def load_upscaling_model(
    model: str | nn.Module = "basicvsr", weights: str | os.PathLike | None = None
) -> nn.Module:
    """A model ready for inference: an architecture name plus weights (a name or a file)."""
    from . import create_model

    if isinstance(model, nn.Module):
        return model
    if model not in DEFAULT_WEIGHTS_FOR:
        raise VsrkitError(f"unknown model {model!r} (choose from {', '.join(DEFAULT_WEIGHTS_FOR)})")
    return create_model(model, checkpoint=weights if weights is not None else DEFAULT_WEIGHTS_FOR[model])


def upscale(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str | nn.Module = "basicvsr",
    weights: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "fp32",
    tile: int | None = None,  # None: only where needed; 0: never
    tile_overlap: int = 16,
    segment_frames: int = 32,
    state_disk_mb: float = 2048,
    window_frames: int = 32,
    window_overlap: int = 8,
    overwrite: bool = False,
    codec: str | None = None,
    crf: int | None = 18,
    allow_corrupt: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Upscale a video file (anything FFmpeg reads) or a folder of images by 4.

    ``output`` with a video extension is encoded (H.264 by default, the input's frame rate and
    timestamps, its audio and subtitle streams copied); anything else becomes a folder of PNGs.
    The output appears only when complete. Returns a summary (frames, seconds, sizes).
    """
    from .data.video import open_frames, open_writer

    if os.path.exists(output) and not overwrite:
        raise VsrkitError(f"{output} exists; pass --overwrite to replace it")
    options = EngineOptions(
        device=device,
        precision=precision,
        tile=tile,
        tile_overlap=tile_overlap,
        segment_frames=segment_frames,
        state_disk_mb=state_disk_mb,
        window_frames=window_frames,
        window_overlap=window_overlap,
    )
    with open_frames(input, allow_corrupt=allow_corrupt) as source:
        net = load_upscaling_model(model, weights)
        engine = Upscaler(net, options)
        start = time.perf_counter()
        count = 0
        with open_writer(output, source=source, codec=codec, crf=crf, overwrite=overwrite) as writer:
            bar = _progress_bar(
                engine.progress_total(source.num_frames) if source.num_frames else None, progress
            )
            try:
                for frame in engine.run(source, progress=bar.update if bar else None):
                    writer.write(frame)
                    count += 1
            finally:
                if bar is not None:
                    bar.close()
    seconds = time.perf_counter() - start
    return {
        "input": str(input),
        "output": str(output),
        "frames": count,
        "input_size": (source.width, source.height),
        "output_size": (source.width * engine.scale, source.height * engine.scale),
        "seconds": seconds,
        "device": str(engine.device),
        "precision": precision,
    }


def _progress_bar(total: int | None, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", desc="upscaling", file=sys.stderr, dynamic_ncols=True)
