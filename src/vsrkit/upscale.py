"""``vsrkit.upscale(input, output)``: a video file or image folder in, a 4× one out."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from torch import nn

from .checks import check_crf
from .engine import EngineOptions, Upscaler, resolve_device
from .errors import VsrkitError
from .models import Family, default_family, families, get_family, model_config
from .scenes import DEFAULT_MIN_SHOT_FRAMES, DEFAULT_THRESHOLD

# The weights used when only an architecture is named, by family (each family's own default).
DEFAULT_WEIGHTS_FOR: Mapping[str, str] = MappingProxyType(
    {name: family.default_weights for name, family in families().items() if family.default_weights}
)


def model_family(model: str | None, weights: str | os.PathLike | None = None) -> Family:
    """The family to build: the one named by ``model``; else the one of ``weights`` (a registered
    name, or a checkpoint file whose architecture is read from it); else the default family."""
    if model is not None:
        return get_family(model)
    if weights is None:
        return default_family()
    if os.path.exists(weights):
        from .weights import infer_arch, read_checkpoint

        ckpt = read_checkpoint(weights)
        return get_family(ckpt.arch or infer_arch(ckpt.state_dict, str(weights)))
    from .hub import get_entry

    return get_family(get_entry(os.fspath(weights)).arch)


def check_model_options(
    model: str | None, config: Mapping[str, Any] | None, weights: str | os.PathLike | None = None
) -> dict[str, Any]:
    """``config`` (``--set`` options) checked against the builder of :func:`model_family`: a bad key
    or value is one line naming it, before the input is read or weights are fetched."""
    family = model_family(model, weights)
    config = dict(config or {})
    model_config(family.name, source="--set", **config)
    return config


def load_upscaling_model(
    model: str | nn.Module | None = None,
    weights: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A model ready for inference: an architecture name (default: the default family's) plus
    weights (a name or a file; default: the family's default) and model options ``config``."""
    from . import create_model

    if isinstance(model, nn.Module):
        if config:
            raise VsrkitError("model options (--set) apply to a model built by name, not to a ready module")
        return model
    family = model_family(model, weights)
    config = check_model_options(family.name, config)
    return create_model(family.name, checkpoint=weights_or_default(family, weights), **config)


def weights_or_default(family: Family, weights: str | os.PathLike | None) -> str | os.PathLike:
    """``weights``, else ``family``'s default weights (one line if it has none)."""
    if weights is not None:
        return weights
    if family.default_weights is None:
        raise VsrkitError(f"{family.title} has no default weights; pass --weights")
    return family.default_weights


def upscale(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str | nn.Module | None = None,
    weights: str | os.PathLike | None = None,
    model_options: Mapping[str, Any] | None = None,
    device: str = "auto",
    precision: str = "fp32",
    backend: str = "pytorch",
    providers: str | Sequence[str] | None = None,
    tile: int | None = None,  # None: only where needed; 0: never
    tile_overlap: int = 16,
    segment_frames: int = 32,
    state_disk_mb: float = 2048,
    window_frames: int = 32,
    window_overlap: int = 8,
    overwrite: bool = False,
    codec: str | None = None,
    crf: int | None = 18,
    pix_fmt: str | None = None,
    stream: int | None = None,
    allow_corrupt: bool = False,
    scene_cuts: bool = False,
    scene_threshold: float = DEFAULT_THRESHOLD,
    min_shot_frames: int = DEFAULT_MIN_SHOT_FRAMES,
    shots: Sequence[tuple[int, int]] | None = None,
    progress: bool | Callable[[float], None] = True,
) -> dict[str, Any]:
    """Upscale a video file (anything FFmpeg reads) or a folder of images by 4.

    ``output`` with a video extension is encoded (H.264 by default, the input's frame rate and
    timestamps, its audio and subtitle streams copied); anything else becomes a folder of PNGs.
    The output appears only when complete. Returns a summary (frames, seconds, sizes).

    ``model`` is a family's name (default: the family of ``weights``, else the default family)
    or a ready module; ``weights`` a registered name or a file (default: the family's default
    weights); ``model_options`` the builder's options (``vsrkit upscale --set KEY=VALUE``),
    checked before the input is read.

    ``scene_cuts`` resets propagation at each scene cut (see :mod:`vsrkit.scenes`): each shot
    is upscaled and encoded on its own, and the shots are joined without re-encoding.
    ``shots`` (consecutive ``(start, stop)`` frame ranges; ``vsrkit batch`` gives them) upscales
    only those frames, one shot at a time, and makes ``output`` a folder that receives each
    shot's video-only segment (:func:`vsrkit.scenes.write_shot_segments`), to be joined later
    by :func:`vsrkit.scenes.join_segments`. ``progress`` may be a callable, given frames done.

    Colours, depth and orientation follow the input: its colour tags are carried over (or, when it has
    none, the ones players would guess are written), inputs deeper than 8 bits go through the model in
    float and come out at their depth (``pix_fmt`` chooses another pixel format), and frames are turned
    upright as the input's display matrix says. ``stream`` picks a video stream (0 for the first).

    ``backend="onnxruntime"`` runs the model's steps as ONNX graphs in onnxruntime, with
    ``providers`` (default: its CPU provider); see :mod:`vsrkit.backends.onnxruntime`.
    """
    from .data.video import open_frames, open_writer
    from .scenes import (
        check_shots,
        detect_shots,
        is_joinable,
        join_segments,
        run_shots,
        shot_folder_beside,
        write_shot_segments,
    )

    if shots is None and os.path.exists(output) and not overwrite:
        raise VsrkitError(f"{output} exists; pass --overwrite to replace it")
    # The writer checks crf against the encoder it picks; this refuses it before the model loads.
    webm = os.fspath(output).lower().endswith(".webm")
    crf = check_crf(crf, codec or ("libvpx-vp9" if webm else "libx264"))
    resolve_device(device)  # an absent GPU is refused before the input is read
    if not isinstance(model, nn.Module):
        check_model_options(model, model_options, weights)
    options = EngineOptions(
        device=device,
        precision=precision,
        backend=backend,
        providers=providers,
        tile=tile,
        tile_overlap=tile_overlap,
        segment_frames=segment_frames,
        state_disk_mb=state_disk_mb,
        window_frames=window_frames,
        window_overlap=window_overlap,
    )
    segments_only = shots is not None
    with open_frames(input, allow_corrupt=allow_corrupt, stream=stream, native_depth=True) as source:
        if shots is not None:
            shots = check_shots(shots)
        elif scene_cuts:
            shots = detect_shots(source, scene_threshold, min_shot_frames)
        net = load_upscaling_model(model, weights, model_options)
        engine = Upscaler(net, options)
        start = time.perf_counter()
        num_frames = shots[-1][1] - shots[0][0] if shots else source.num_frames
        steps = engine.progress_total(num_frames) if num_frames else None
        bar = None
        if callable(progress):
            report, frames_per_step = progress, (num_frames / steps if steps else 1.0)
            on_step = lambda n: report(n * frames_per_step)  # noqa: E731
        else:
            bar = _progress_bar(steps, progress)
            on_step = bar.update if bar else None
        try:
            if segments_only:
                write_shot_segments(
                    engine, source, shots, output, codec=codec, crf=crf, pix_fmt=pix_fmt, progress=on_step
                )
                count = num_frames
            elif shots is not None and is_joinable(output):
                # One segment per shot, joined without re-encoding: the same files whether the
                # shots ran here one after another or on several workers (vsrkit batch).
                folder = shot_folder_beside(output)
                try:
                    paths = write_shot_segments(
                        engine,
                        source,
                        shots,
                        folder,
                        codec=codec,
                        crf=crf,
                        pix_fmt=pix_fmt,
                        progress=on_step,
                        suffix=os.path.splitext(output)[1],
                    )
                    count = join_segments(
                        input, paths, output, overwrite=overwrite, allow_corrupt=allow_corrupt, stream=stream
                    )
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
            else:
                count = 0
                with open_writer(
                    output, source=source, codec=codec, crf=crf, pix_fmt=pix_fmt, overwrite=overwrite
                ) as writer:
                    for frame in run_shots(engine, source, shots, progress=on_step):
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
        "backend": backend,
        "shots": len(shots) if shots else 1,
    }


def _progress_bar(total: int | None, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", desc="upscaling", file=sys.stderr, dynamic_ncols=True)
