"""Inference on clips of any length in bounded memory, with spatial tiles and reduced precision.

Bidirectional models need the whole future of a frame before they can output it: the
references keep every frame's features in memory (about 26 MB per frame at 180×320 for
BasicVSR, 105 MB for BasicVSR++) and fail past a few hundred frames. Here:

The engine learns everything about a model from the :class:`~vsrkit.models.base.VSRModel`
interface (``streams_exactly``, ``pad_multiple``, ``scale``, the per-frame steps), never from
its name; the families below are examples.

**BasicVSR and IconVSR: exact streaming.** The input is spooled once to a temporary file of
raw LR frames (uint8, 173 kB per 180×320 frame; uint16 for deeper input). Pass 1 runs
the backward branch over the whole clip from the last frame, saving the backward state at
every ``segment_frames``-th frame, plus the backward flows and the IconVSR keyframe features,
to the temporary folder.
Pass 2 walks the segments in order: it reads or recomputes the segment's backward states,
runs the forward branch and emits finished HR frames. The first segment's states are still
in memory at the end of pass 1. Of the later segments, as many as fit in ``state_disk_mb``
(default 2048 MB: 139 frames of BasicVSR at 180×320) have every backward state written to
disk in pass 1 and read back; the others are recomputed from the state saved at their end,
which costs one more backward trunk per frame (about a third of BasicVSR's work per frame).
Memory holds ``segment_frames`` states; disk holds one state per recomputed segment plus the
stored ones. The result equals
the one-pass output (differences are float rounding, measured ≤ 1e-5).

**Refine passes.** A model with ``refine_passes`` (RealBasicVSR's image cleaning) first gets
up to that many passes over the spooled clip, whole frames (padded as the steps need) one at a
time: each writes ``lq + model.refine(lq)`` to a new raw fp32 file in the temporary folder (12
bytes per LR pixel per frame; the previous pass's file is removed once the next is complete) and
sums |residue| in float64; after a pass, ``model.refine_done(mean)`` decides whether another
runs. The steps then read the refined frames. The result equals :meth:`VSRModel.propagate_clip`
on the whole clip; ``progress`` does not count these passes.

**BasicVSR++: overlapping windows.** Its four interleaved branches have no cheap exact
decomposition. The clip is processed in windows of ``window_frames`` frames that overlap by
``window_overlap``; each frame is taken from the window in which it lies furthest from an
edge. The deviation from one pass is measured by ``tests/test_engine.py`` and
``benchmarks/memory.py``.

**Tiles and memory.** With ``tile=N`` each frame is cut into overlapping N×N LR tiles (at
least the model's minimum size, 64), each with its own recurrent state; outputs are blended
with linear ramps across the overlaps, so there are no seams. Before anything large is
allocated, :meth:`Upscaler.plan` estimates the peak from the model's own figures
(``model.inference_memory``) and compares it with :func:`vsrkit.memory.available_memory`.
``tile=None`` (the default) tiles only when the whole frame would not fit, choosing the largest
tile that does; ``tile=0`` never tiles. Where nothing fits, the run is refused with one line.
The tiles that fit the budget together run in lockstep, as one group. When all of them fit,
frames stream as above. Otherwise each group runs over the whole clip in turn and adds its
weighted HR outputs to a raw fp32 file in the temporary folder (12 bytes per HR pixel per
frame: 4× the size of the uncompressed 8-bit output), from which a last pass emits the frames;
memory is then one group plus one HR frame, whatever the frame size. The sums are taken in the
same order as in lockstep, so the output is the same.

**Precision and speed.** On the CPU the model is first prepared by
:func:`vsrkit.accel.prepare_for_inference` (a copy: channels_last, for ``fp32`` NNPACK's
Winograd/FFT convolutions where they run, and for ``bf16`` bf16 weights instead of autocast;
warping grids, sampling, flow sums and the output stay fp32).
On CUDA, ``bf16`` or ``fp16`` autocast runs the networks' convs and SPyNet stays fp32. Flows
are computed for up to ``flow_batch`` frame pairs in one SPyNet call: its small 7×7 convs and
coarse pyramid levels use the cores poorly one pair at a time. CPU runs also tell glibc's
malloc to keep freed memory for reuse (:func:`vsrkit.accel.keep_freed_memory`;
``keep_freed_memory=False`` leaves the allocator alone).
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .accel import keep_freed_memory, prepare_for_inference, prepared_precision
from .backends import check_backend, wrap_model
from .checks import DEVICE, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_INT, choice, integer
from .errors import VsrkitError
from .fsutil import disk_full_error, is_disk_full, make_spill_dir, remove_dead_spill
from .memory import available_memory, format_mb
from .models.base import StepInput, VSRModel, pad_to_multiple
from .ops import nnpack

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_TILE = 64
_SPILL_HINT = "set TMPDIR to a folder with more room, or lower --state-disk-mb"
# Automatic tiles are tried from this side down; an overlap must leave room for them.
_max_tile_side = 4096
# Beyond the model's figures, a run's first frames cost the thread pools, the allocator's
# arenas and the spool's buffers: measured 130-190 MB in a fresh process.
_RUN_OVERHEAD = 256 * 2**20
# Frames are padded up to what the networks need (64 px for BasicVSR++'s flows), but a frame
# under 8 px holds too little to upscale and is almost certainly a mistake.
MIN_INPUT_SIDE = 8
# Frame arrays the engine takes and gives back: 8-bit, or 16-bit (full scale 65535) for deeper input.
FRAME_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA when present) or the named device, which must exist on this machine."""
    if isinstance(device, str):
        device = DEVICE(device, "device")
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VsrkitError(f"device {device} was asked for, but no CUDA GPU is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise VsrkitError(
                f"device {device} was asked for, but this machine has {count} CUDA GPU(s): "
                f"cuda:0 to cuda:{count - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise VsrkitError("device mps was asked for, but Metal (MPS) is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise VsrkitError(f"device must be auto, cpu, cuda or cuda:N, got {str(device)!r}")
    return device


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager:
    if precision not in PRECISIONS:
        raise VsrkitError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise VsrkitError("fp16 needs a CUDA device; use --precision bf16 on the CPU")
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


@dataclass
class EngineOptions:
    device: str | torch.device | None = "auto"
    precision: str = "fp32"
    tile: int | None = None  # None: only where the whole frame would not fit; 0: never
    tile_overlap: int = 16
    segment_frames: int = 32
    window_frames: int = 32
    window_overlap: int = 8
    tmp_dir: str | None = None
    flow_batch: int = 4
    keep_freed_memory: bool = True
    state_disk_mb: float = 2048
    nnpack: bool | None = None  # CPU: NNPACK's Winograd/FFT convs (None: where available)
    memory_limit_mb: float | None = None  # instead of the measured available memory
    backend: str = "pytorch"  # "onnxruntime": the steps run as exported graphs (vsrkit.backends)
    providers: str | list[str] | None = None  # onnxruntime's execution providers (default: CPU)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse (one line) and normalise bad values; the options may be changed after creation."""
        if isinstance(self.device, str):
            self.device = DEVICE(self.device, "device")
        self.precision = choice(*PRECISIONS)(self.precision, "precision")
        self.segment_frames = POSITIVE_INT(self.segment_frames, "segment_frames")
        self.window_frames = integer(2)(self.window_frames, "window_frames")
        self.window_overlap = NON_NEGATIVE_INT(self.window_overlap, "window_overlap")
        if self.window_overlap >= self.window_frames:
            raise VsrkitError(
                f"window_overlap must be smaller than window_frames ({self.window_frames}), "
                f"got {self.window_overlap}"
            )
        self.flow_batch = POSITIVE_INT(self.flow_batch, "flow_batch")
        self.state_disk_mb = NON_NEGATIVE_FLOAT(self.state_disk_mb, "state_disk_mb")
        self.backend = check_backend(self.backend, self.providers)
        if self.backend != "pytorch" and self.precision != "fp32":
            raise VsrkitError(f"--backend {self.backend} runs in fp32 only, not --precision {self.precision}")


# -- temporary storage ----------------------------------------------------------------------
class _SpillDir:
    """A private temporary folder for frames and tensors that must not stay in memory.

    Named ``vsrkit-PID-HOST-XXXXXXXX`` (:mod:`vsrkit.fsutil`): those left by killed runs are removed here
    when their process is gone. A full disk is one line naming the folder.
    """

    def __init__(self, parent: str | None) -> None:
        remove_dead_spill(parent)
        try:
            self.path = make_spill_dir(parent)
        except OSError as exc:
            folder = parent if parent is not None else tempfile.gettempdir()
            if is_disk_full(exc):
                raise disk_full_error(exc, folder, _SPILL_HINT) from None
            reason = exc.strerror or exc
            raise VsrkitError(f"cannot create a temporary folder in {folder}: {reason}") from None

    def disk_full(self, exc: BaseException) -> None:
        """Re-raise ``exc`` as one line if it is a full disk in this folder."""
        if is_disk_full(exc, self.path):
            raise disk_full_error(exc, self.path, _SPILL_HINT) from None

    def put(self, key: str, tensor: torch.Tensor) -> None:
        path = self.path / f"{key}.pt"
        try:
            # Through a file object: torch.save to a path hides the OSError of a full disk.
            with open(path, "wb") as f:
                torch.save(tensor.detach().cpu(), f)
        except (OSError, RuntimeError) as exc:
            path.unlink(missing_ok=True)
            self.disk_full(exc)
            raise

    def get(self, key: str, device: torch.device) -> torch.Tensor:
        return torch.load(self.path / f"{key}.pt", weights_only=True).to(device)

    def pop(self, key: str, device: torch.device) -> torch.Tensor:
        tensor = self.get(key, device)
        (self.path / f"{key}.pt").unlink()
        return tensor

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class _FrameSpool:
    """LR frames in one raw file, readable in any order (uint8, or uint16 for deeper input)."""

    def __init__(self, spill: _SpillDir, frames: Iterable[np.ndarray]) -> None:
        self.file = open(spill.path / "frames.u8", "w+b")  # noqa: SIM115 - closed by close()
        self.shape: tuple[int, int, int] | None = None
        self.dtype: np.dtype | None = None
        self.count = 0
        for frame in frames:
            frame = np.ascontiguousarray(frame)
            if frame.dtype not in FRAME_DTYPES or frame.ndim != 3 or frame.shape[2] != 3:
                raise VsrkitError(
                    f"frames must be uint8 or uint16 (H, W, 3) RGB arrays, got {frame.dtype} {frame.shape}"
                )
            if self.dtype is None:
                self.dtype = frame.dtype
            elif frame.dtype != self.dtype:
                raise VsrkitError(f"frame {self.count} is {frame.dtype}, earlier frames are {self.dtype}")
            if self.shape is None:
                if min(frame.shape[:2]) < MIN_INPUT_SIDE:
                    h, w = frame.shape[:2]
                    raise VsrkitError(
                        f"frames are too small ({w}×{h}); at least {MIN_INPUT_SIDE}×{MIN_INPUT_SIDE} px"
                    )
                self.shape = frame.shape
            elif frame.shape != self.shape:
                raise VsrkitError(
                    f"frame {self.count} is {frame.shape[:2]}, earlier frames are {self.shape[:2]}"
                )
            try:
                self.file.write(frame.tobytes())
            except OSError as exc:
                spill.disk_full(exc)
                raise
            self.count += 1
        if self.count == 0:
            raise VsrkitError("the input has no frames")
        try:
            self.file.flush()
        except OSError as exc:
            spill.disk_full(exc)
            raise
        assert self.dtype is not None
        self.frame_bytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.count

    def read(self, index: int) -> np.ndarray:
        self.file.seek(index * self.frame_bytes)
        return np.frombuffer(self.file.read(self.frame_bytes), dtype=self.dtype).reshape(self.shape)

    def close(self) -> None:
        self.file.close()


# -- tiles ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tile:
    top: int
    left: int
    height: int
    width: int

    def crop(self, x: torch.Tensor, scale: int = 1) -> torch.Tensor:
        t, l = self.top * scale, self.left * scale
        return x[..., t : t + self.height * scale, l : l + self.width * scale]


def _axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    if tile >= length:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


def plan_tiles(height: int, width: int, tile: int | None, overlap: int, multiple: int = 1) -> list[_Tile]:
    """Overlapping tiles covering an (H, W) LR frame; one tile when ``tile`` is None."""
    if not tile:
        return [_Tile(0, 0, height, width)]
    tile = max(tile, MIN_TILE, 2 * overlap + 1)
    tile = math.ceil(tile / multiple) * multiple
    th, tw = min(tile, height), min(tile, width)
    return [
        _Tile(top, left, th, tw)
        for top in _axis_starts(height, th, overlap)
        for left in _axis_starts(width, tw, overlap)
    ]


def _blend_weight(tile: _Tile, height: int, width: int, overlap: int, scale: int) -> torch.Tensor:
    """Linear ramps over the part of each tile edge that overlaps a neighbour (1 elsewhere)."""

    def ramp(start: int, size: int, total: int) -> torch.Tensor:
        n = size * scale
        w = torch.ones(n)
        ramp_len = overlap * scale
        if ramp_len == 0:
            return w
        ramp = (torch.arange(ramp_len, dtype=torch.float32) + 0.5) / ramp_len
        if start > 0:
            w[:ramp_len] = torch.minimum(w[:ramp_len], ramp)
        if start + size < total:
            w[n - ramp_len :] = torch.minimum(w[n - ramp_len :], ramp.flip(0))
        return w

    wy = ramp(tile.top, tile.height, height)
    wx = ramp(tile.left, tile.width, width)
    return wy[:, None] * wx[None, :]


class _Blender:
    """Accumulates tile outputs into whole HR frames."""

    def __init__(self, tiles: list[_Tile], height: int, width: int, overlap: int, scale: int) -> None:
        self.tiles, self.scale = tiles, scale
        self.shape = (height * scale, width * scale)
        self.single = len(tiles) == 1
        if not self.single:
            self.weights = [_blend_weight(t, height, width, overlap, scale) for t in tiles]

    def join(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        if self.single:
            return outputs[0].float()
        acc = torch.zeros(outputs[0].shape[0], 3, *self.shape, device=outputs[0].device)
        norm = torch.zeros(*self.shape, device=outputs[0].device)
        for tile, weight, out in zip(self.tiles, self.weights, outputs, strict=True):
            weight = weight.to(out.device)
            tile.crop(acc, self.scale).add_(out.float() * weight)
            tile.crop(norm, self.scale).add_(weight)
        return acc / norm


class _HRSpool:
    """Blended HR frames on disk: each frame's weighted sum of tile outputs, as raw fp32.

    Groups of tiles add their outputs one after another, in tile order (the order of
    :meth:`_Blender.join`, so the sums are the same); only the pages a group touches are mapped.
    """

    def __init__(
        self,
        spill: _SpillDir,
        frames: int,
        tiles: list[_Tile],
        height: int,
        width: int,
        overlap: int,
        scale: int,
    ) -> None:
        self.tiles, self.height, self.width, self.overlap, self.scale = tiles, height, width, overlap, scale
        self.shape = (1, 3, height * scale, width * scale)
        self.frame_bytes = 4 * int(np.prod(self.shape))
        self.path = spill.path / "hr.f32"
        with open(self.path, "wb") as f:
            f.truncate(frames * self.frame_bytes)  # sparse: zeros until written

    def _map(self, index: int, mode: str) -> np.memmap:
        return np.memmap(self.path, np.float32, mode, offset=index * self.frame_bytes, shape=self.shape)

    def weight(self, tile: _Tile) -> torch.Tensor:
        # Computed per use: all tiles' weights together are as large as a few HR frames.
        return _blend_weight(tile, self.height, self.width, self.overlap, self.scale)

    def add(self, index: int, tiles: list[_Tile], outputs: list[torch.Tensor]) -> None:
        mapped = self._map(index, "r+")
        acc = torch.from_numpy(mapped)
        for tile, out in zip(tiles, outputs, strict=True):
            tile.crop(acc, self.scale).add_((out.float() * self.weight(tile).to(out.device)).cpu())
        mapped.flush()
        del acc, mapped

    def norm(self) -> torch.Tensor:
        norm = torch.zeros(*self.shape[2:])
        for tile in self.tiles:
            tile.crop(norm, self.scale).add_(self.weight(tile))
        return norm

    def frame(self, index: int, norm: torch.Tensor) -> torch.Tensor:
        mapped = self._map(index, "r")
        acc = torch.from_numpy(np.array(mapped))
        del mapped
        return acc.div_(norm)


class _RefinedFrames:
    """Frames changed by a model's refine pass: (1, 3, H, W) fp32 in one raw file (12 bytes a pixel)."""

    def __init__(self, spill: _SpillDir, name: str) -> None:
        self.spill = spill
        self.path = spill.path / name
        self.file = open(self.path, "w+b")  # noqa: SIM115 - closed by close()
        self.shape: tuple[int, ...] | None = None
        self.count = 0

    def write(self, lq: torch.Tensor) -> None:
        array = lq.detach().float().cpu().numpy()
        if self.shape is None:
            self.shape = array.shape
            self.frame_bytes = array.nbytes
        try:
            self.file.write(array.tobytes())
        except OSError as exc:
            self.spill.disk_full(exc)
            raise
        self.count += 1

    def finish(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self.spill.disk_full(exc)
            raise

    def read(self, index: int) -> torch.Tensor:
        assert self.shape is not None
        self.file.seek(index * self.frame_bytes)
        data = np.frombuffer(self.file.read(self.frame_bytes), dtype=np.float32).reshape(self.shape)
        return torch.from_numpy(data.copy())

    def read_to(self, device: torch.device) -> Callable[[int], torch.Tensor]:
        return lambda i: self.read(i).to(device)

    def close(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class RunPlan:
    """How a clip will be run: the tile size (None: whole frames), tiles per group, the estimate."""

    tile: int | None
    tiles: int
    group: int
    estimate: int
    available: int
    source: str

    @property
    def spooled(self) -> bool:
        return self.group < self.tiles


def tensor_to_frame(hr: torch.Tensor, dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """(1, 3, H, W) float in [0, 1] → (H, W, 3) uint8 or uint16, rounded as the references quantise."""
    if np.dtype(dtype) == np.uint16:
        # torch has no uint16 arithmetic on every device: round in int32, narrow in numpy.
        scaled = hr[0].float().clamp_(0, 1).mul_(65535).round_().to(torch.int32)
        return scaled.permute(1, 2, 0).cpu().numpy().astype(np.uint16)
    return hr[0].float().clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


# -- the engine ---------------------------------------------------------------------------------
class Upscaler:
    """Runs a model over a stream of frames. ``run(frames)`` yields HR frames (the input's dtype) in order."""

    def __init__(self, model: nn.Module, options: EngineOptions | None = None, **kwargs) -> None:
        if not isinstance(model, VSRModel):
            raise VsrkitError(f"unsupported model type {type(model).__name__} (not a vsrkit VSRModel)")
        self.options = options or EngineOptions(**kwargs)
        self.options.check()
        self.device = resolve_device(self.options.device)
        autocast_context(self.device, self.options.precision)  # validates early
        if self.options.backend != "pytorch":
            # The adapter takes and gives host tensors; its providers choose where the graphs run.
            if self.device.type != "cpu" and self.options.device not in (None, "auto"):
                raise VsrkitError(
                    f"--device {self.options.device} is for the PyTorch backend; "
                    f"--backend {self.options.backend} runs where --providers say"
                )
            self.device = torch.device("cpu")
            self.model = wrap_model(model, self.options.backend, self.options.providers)
        elif self.device.type == "cpu":
            # A prepared copy: the caller's model keeps its dtype and memory format.
            try:
                self.model = prepare_for_inference(
                    model, self.device, self.options.precision, nnpack=self.options.nnpack
                )
            except RuntimeError as e:  # nnpack=True where it cannot run
                raise VsrkitError(str(e)) from e
            if self.options.keep_freed_memory:
                keep_freed_memory()
        else:
            self.model = model.to(self.device).eval()
        self.scale = model.scale
        self._progress: Callable[[int], None] | None = None
        self._refined: _RefinedFrames | None = None
        self._frame_dtype: np.dtype | None = np.dtype(np.uint8)
        tile, overlap = self.options.tile, self.options.tile_overlap
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int)):
            raise VsrkitError(f"--tile must be a whole number of pixels, got {tile!r}")
        if tile is not None and tile != 0 and tile < MIN_TILE:
            raise VsrkitError(
                f"--tile must be 0 (off) or at least {MIN_TILE} (the models' minimum), got {tile}"
            )
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise VsrkitError(f"--tile-overlap must be a whole number ≥ 0, got {overlap!r}")
        if tile and 2 * overlap >= tile:
            raise VsrkitError(f"--tile-overlap must be less than half the tile ({tile}), got {overlap}")
        if 2 * overlap >= _max_tile_side:
            raise VsrkitError(f"--tile-overlap {overlap} is too large (at most {_max_tile_side // 2 - 1})")

    def progress_total(self, num_frames: int) -> int:
        """How many times ``run`` calls ``progress(1)`` for a clip: the backward pass counts too.

        A model's refine passes (which may stop early) are not counted.
        """
        two_pass = self.model.streams_exactly and self.model.bidirectional
        return 2 * num_frames if two_pass else num_frames

    # -- memory ---------------------------------------------------------------------------------
    def _windowed(self) -> bool:
        return not self.model.streams_exactly

    def _tile_multiple(self) -> int:
        return self.model.pad_multiple

    def estimate(
        self, height: int, width: int, tile_height: int, tile_width: int, group: int, frames: int
    ) -> int:
        """Peak bytes for (height, width) LR frames with ``group`` tiles of the given size in lockstep."""
        element_size = PRECISIONS[self.options.precision].itemsize
        mem = self.model.inference_memory(tile_height, tile_width, element_size)
        pixels = tile_height * tile_width
        hr_tile = 3 * self.scale**2 * 4 * pixels  # one fp32 HR tile output
        if self._windowed():
            window = min(self.options.window_frames, frames)
            # One tile's window forward at a time; every tile's HR outputs of the window kept.
            per_tile = window * hr_tile
            work = window * mem.frame_state + mem.step + 2 * window * 3 * 4 * pixels
        else:
            kept = min(self.options.segment_frames, frames) if self.model.bidirectional else 0
            flows = 2 * (self.options.flow_batch + 1) * 2 * 4 * pixels
            lq_cache = 18 * 3 * 4 * pixels
            per_tile = (kept + 2) * mem.frame_state + mem.clip_state + hr_tile + flows + lq_cache
            work = mem.step
        # The HR frame: the blend's sum and weights, the result, the 8-bit frame and the
        # writer's copy (four fp32 frames cover them), plus one whole LR frame in fp32.
        frame = (4 * 3 * self.scale**2 * 4 + 12) * height * width
        peak = _RUN_OVERHEAD + group * per_tile + work + frame
        if self.model.refine_passes > 0 and not self._windowed():
            # Refine passes run alone, before the steps, on whole frames: one refine call (its
            # step bound) plus the frame, its residue and the refined frame in fp32.
            refine = self.model.inference_memory(height, width, element_size).step + 3 * 12 * height * width
            peak = max(peak, _RUN_OVERHEAD + refine)
        return peak

    def plan(self, height: int, width: int, frames: int, notice: bool = True) -> RunPlan:
        """Choose the tiling for (height, width) LR frames from the estimate and the memory available."""
        available, source = available_memory(self.device, self.options.memory_limit_mb)
        multiple = self._tile_multiple()
        hp, wp = math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple
        overlap = self.options.tile_overlap

        def fit(tile: int | None) -> tuple[RunPlan | None, int]:
            tiles = plan_tiles(hp, wp, tile, overlap, multiple)
            th, tw = tiles[0].height, tiles[0].width
            one = self.estimate(height, width, th, tw, 1, frames)
            if one > available:
                return None, one
            per_tile = self.estimate(height, width, th, tw, 2, frames) - one
            group = len(tiles) if per_tile <= 0 else min(len(tiles), 1 + (available - one) // per_tile)
            est = self.estimate(height, width, th, tw, group, frames)
            return RunPlan(tile, len(tiles), int(group), est, available, source), one

        size = f"{width}×{height}"
        have = f"{format_mb(available)} available ({source})"
        option = self.options.tile
        if option is not None:
            run_plan, need = fit(option or None)
            if run_plan is None:
                how = "without tiles" if not option else f"in {option}×{option} tiles"
                hint = "; leave out --tile 0 to tile automatically" if option == 0 else ""
                raise VsrkitError(f"{size} frames need about {format_mb(need)} {how}; {have}{hint}")
            return run_plan
        whole, need_whole = fit(None)
        need = need_whole
        if whole is not None and not whole.spooled:
            return whole
        step = 32 * multiple if multiple > 1 else 32
        largest = min(max(hp, wp), _max_tile_side)
        for side in range(largest - largest % step, MIN_TILE - 1, -step):
            if 2 * overlap >= side:
                break
            run_plan, need = fit(side)
            if run_plan is not None:
                if notice:
                    how = f", {run_plan.group} of {run_plan.tiles} at a time" if run_plan.spooled else ""
                    print(
                        f"vsrkit: {size} frames need about {format_mb(need_whole)} whole; {have}: "
                        f"upscaling in {side}×{side} tiles{how}",
                        file=sys.stderr,
                    )
                return run_plan
        raise VsrkitError(
            f"{size} frames need about {format_mb(need_whole)} whole and {format_mb(need)} even in "
            f"{MIN_TILE}×{MIN_TILE} tiles; {have}"
        )

    def _autocast(self) -> AbstractContextManager:
        if prepared_precision(self.model) is not None:
            # Prepared on the CPU: the weights already have the precision, autocast would only
            # re-cast them at every call.
            return nullcontext()
        return autocast_context(self.device, self.options.precision)

    def _lq(self, spool: _FrameSpool, index: int, box: _Tile | None = None) -> torch.Tensor:
        """Frame ``index`` as (1, 3, H, W) fp32, padded as the steps need (refined, if the model refines)."""
        if self._refined is not None:
            lq = self._refined.read(index).to(self.device)
        else:
            lq = self._spooled_lq(spool, index)
        if box is not None:
            # A group's part only (a copy, so that the whole frame is freed).
            lq = box.crop(lq).clone()
        return lq

    def _spooled_lq(self, spool: _FrameSpool, index: int) -> torch.Tensor:
        array = spool.read(index)
        if array.dtype == np.uint16:
            # Converted on the host: uint16 tensors lack most operations.
            frame = torch.from_numpy(array.astype(np.float32)).to(self.device)
            lq = frame.permute(2, 0, 1).unsqueeze(0).div_(65535)
        else:
            frame = torch.from_numpy(array.copy()).to(self.device)
            lq = frame.permute(2, 0, 1).unsqueeze(0).float().div_(255)
        multiple = self.model.pad_multiple
        if multiple > 1 and self.model.streams_exactly:
            # The steps need sides that are multiples of pad_multiple (a windowed model's
            # forward pads by itself).
            lq = pad_to_multiple(lq.unsqueeze(1), multiple)[:, 0]
        return lq

    def _flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        """Flows for a batch of pairs, fp32 whatever the precision (see ``VSRModel.flow``)."""
        return self.model.flow(ref, supp)

    def _flows(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """``spynet(ref, supp)`` for each pair, ``flow_batch`` pairs per SPyNet call."""
        out: list[torch.Tensor] = []
        step = self.options.flow_batch
        for s in range(0, len(pairs), step):
            chunk = pairs[s : s + step]
            if len(chunk) == 1:
                out.append(self._flow(*chunk[0]))
                continue
            flows = self._flow(torch.cat([p[0] for p in chunk]), torch.cat([p[1] for p in chunk]))
            out.extend(flows.split([p[0].shape[0] for p in chunk]))
        return out

    def run(
        self, frames: Iterable[np.ndarray], progress: Callable[[int], None] | None = None
    ) -> Iterator[np.ndarray]:
        """Yield the upscaled frames of ``frames`` ((H, W, 3) RGB) one at a time, in the input's dtype.

        Frames are uint8, or uint16 with full scale 65535 (for sources deeper than 8 bits); the
        model sees both as float in [0, 1].
        """
        for hr in self.run_tensors(frames, progress):
            yield tensor_to_frame(hr, self._frame_dtype)

    def run_tensors(
        self, frames: Iterable[np.ndarray], progress: Callable[[int], None] | None = None
    ) -> Iterator[torch.Tensor]:
        """Like :meth:`run`, but yields the unquantised (1, 3, 4H, 4W) fp32 outputs."""
        spill = _SpillDir(self.options.tmp_dir)
        spool = None
        self._progress = progress
        self._share = 1.0
        try:
            spool = _FrameSpool(spill, frames)
            self._frame_dtype = spool.dtype
            if len(spool) < self.model.min_frames:
                need = self.model.min_frames
                raise VsrkitError(
                    f"{self.model.title} needs at least {need} frames; the input has {len(spool)}"
                )
            run_plan = self.plan(*spool.shape[:2], len(spool))
            with torch.inference_mode():
                if self.model.refine_passes > 0 and self.model.streams_exactly:
                    self._refined = self._refine(spool, spill)
                if self._windowed():
                    steps = self._run_windows(spool, spill, run_plan)
                else:
                    steps = self._run_tiled(spool, spill, run_plan)
                for hr in steps:
                    yield hr
                    if progress is not None:
                        progress(1)
        finally:
            if self._refined is not None:
                self._refined.close()
                self._refined = None
            if spool is not None:
                spool.close()
            spill.close()
            nnpack.release_scratch()  # the NNPACK calls' scratch memory, kept between calls

    def _refine(self, spool: _FrameSpool, spill: _SpillDir) -> _RefinedFrames:
        """The model's refine passes over the whole clip, each into a new fp32 frame file.

        Whole frames, padded as the steps need; the clip-wide mean |residue| is summed in
        float64 and decides, after each pass, whether the next one runs.
        """
        source: Callable[[int], torch.Tensor] = lambda i: self._spooled_lq(spool, i)  # noqa: E731
        refined: _RefinedFrames | None = None
        for n in range(self.model.refine_passes):
            out = _RefinedFrames(spill, f"refined_{n}.f32")
            total, count = 0.0, 0
            try:
                for i in range(len(spool)):
                    lq = source(i)
                    with self._autocast():
                        residue = self.model.refine(lq).float()
                    total += residue.abs().sum(dtype=torch.float64).item()
                    count += residue.numel()
                    out.write(lq + residue)
                out.finish()
            except BaseException:
                out.close()
                raise
            if refined is not None:
                refined.close()  # the previous pass's frames: no longer read
            refined = out
            source = refined.read_to(self.device)
            if self.model.refine_done(total / count):
                break
        assert refined is not None
        return refined

    # -- exact streaming through the model's steps ----------------------------------------------
    def _run_tiled(self, spool: _FrameSpool, spill: _SpillDir, run_plan: RunPlan) -> Iterator[torch.Tensor]:
        """All tiles in lockstep where they fit; else group after group through an HR spool."""
        h0, w0 = spool.shape[:2]
        multiple = self._tile_multiple()
        hp, wp = math.ceil(h0 / multiple) * multiple, math.ceil(w0 / multiple) * multiple
        overlap = self.options.tile_overlap
        tiles = plan_tiles(hp, wp, run_plan.tile, overlap, multiple)
        if not run_plan.spooled:
            blender = _Blender(tiles, hp, wp, overlap, self.scale)
            for outputs in self._run_recurrent(spool, spill, tiles):
                yield blender.join(outputs)[..., : self.scale * h0, : self.scale * w0]
            return
        hr = _HRSpool(spill, len(spool), tiles, hp, wp, overlap, self.scale)
        groups = [tiles[g : g + run_plan.group] for g in range(0, len(tiles), run_plan.group)]
        self._share = 1 / len(groups)
        for n, group in enumerate(groups):
            top, left = min(t.top for t in group), min(t.left for t in group)
            bottom = max(t.top + t.height for t in group)
            right = max(t.left + t.width for t in group)
            box = _Tile(top, left, bottom - top, right - left)
            local = [_Tile(t.top - top, t.left - left, t.height, t.width) for t in group]
            for i, outputs in enumerate(self._run_recurrent(spool, spill, local, box, f"g{n}_")):
                hr.add(i, group, outputs)
        norm = hr.norm()
        for i in range(len(spool)):
            yield hr.frame(i, norm)[..., : self.scale * h0, : self.scale * w0]

    def _run_recurrent(
        self,
        spool: _FrameSpool,
        spill: _SpillDir,
        tiles: list[_Tile],
        box: _Tile | None = None,
        prefix: str = "",
    ) -> Iterator[list[torch.Tensor]]:
        """Each frame's HR tile outputs, for ``tiles`` of the part ``box`` of the frames."""
        model, t = self.model, len(spool)
        keys = set(model.keyframes(t))
        bidirectional = model.bidirectional
        k = self.options.segment_frames
        segments = [range(s, min(s + k, t)) for s in range(0, t, k)]
        # Segments (by start) whose backward states pass 1 stores on disk, within
        # state_disk_mb: pass 2 reads them instead of recomputing the segment.
        stored: set[int] = set()
        disk_budget = max(0.0, self.options.state_disk_mb) * 2**20

        # Pass 1 visits the keyframes last first; each tile keeps its own frame pyramids.
        pass1_keys = sorted(keys, reverse=True)
        keyframe_features = [model.keyframe_features(t, pass1_keys) for _ in tiles] if keys else []

        def keyframe(
            i: int, ti: int, lq_window: Callable[[int], torch.Tensor] | None = None, last_use: bool = False
        ) -> torch.Tensor | None:
            """Frame ``i``'s keyframe feature: computed in pass 1, then read back from disk."""
            if i not in keys:
                return None
            if lq_window is None:
                read = spill.pop if last_use else spill.get
                return read(prefix + f"keyframe_{i}_{ti}", self.device)
            with self._autocast():
                feat = keyframe_features[ti](i, lambda j: tiles[ti].crop(lq_window(j)))
            spill.put(prefix + f"keyframe_{i}_{ti}", feat)
            return feat

        def backward_step(x: StepInput, feat: torch.Tensor | None) -> torch.Tensor:
            with self._autocast():
                return model.backward_step(x, feat)

        # Pass 1: backward branch over the whole clip, last frame first.
        kept: dict[int, list[torch.Tensor]] = {}
        if bidirectional:
            cache: dict[int, torch.Tensor] = {}

            def lq_at(j: int) -> torch.Tensor:
                # Keyframe windows reach a few frames either side: keep a small cache.
                if j not in cache:
                    if len(cache) > 16:
                        cache.pop(max(cache))
                    cache[j] = self._lq(spool, j, box)
                return cache[j]

            feats: list[torch.Tensor | None] = [None] * len(tiles)
            backward_flows: dict[int, list[torch.Tensor]] = {}
            disk_used = 0
            for i in range(t - 1, -1, -1):
                lq = lq_at(i)
                lq_next = lq_at(i + 1) if i < t - 1 else None
                if lq_next is not None and i not in backward_flows:
                    # This frame's flows and those of the next few frames of the pass at once.
                    batch = list(range(i, max(i - self.options.flow_batch, -1), -1))
                    pairs = [(tile.crop(lq_at(j)), tile.crop(lq_at(j + 1))) for j in batch for tile in tiles]
                    flat = self._flows(pairs)
                    for n_j, j in enumerate(batch):
                        backward_flows[j] = flat[n_j * len(tiles) : (n_j + 1) * len(tiles)]
                for ti, tile in enumerate(tiles):
                    x = StepInput(
                        tile.crop(lq),
                        tile.crop(lq_next) if lq_next is not None else None,
                        backward_flows[i][ti] if lq_next is not None else None,
                        keyframe(i, ti, lq_at),
                    )
                    feats[ti] = backward_step(x, feats[ti])
                    if i < k:
                        kept.setdefault(i, []).append(feats[ti])
                if i >= k:
                    start = i - i % k
                    if i == min(start + k, t) - 1:
                        # First frame of this segment in the backward pass: store all of its
                        # states on disk if the budget allows, else recompute them in pass 2.
                        frame_bytes = sum(f.numel() * f.element_size() for f in feats)
                        if disk_used + frame_bytes * (i + 1 - start) <= disk_budget:
                            stored.add(start)
                            disk_used += frame_bytes * (i + 1 - start)
                    for ti in range(len(tiles)):
                        if start in stored:
                            spill.put(prefix + f"backward_{i}_{ti}", feats[ti])
                            continue
                        # Pass 2 recomputes this segment: it needs the flows, and the segment
                        # before it the state at this segment's start.
                        if lq_next is not None:
                            spill.put(prefix + f"flow_{i}_{ti}", backward_flows[i][ti])
                        if i == start:
                            spill.put(prefix + f"state_{i}_{ti}", feats[ti])
                backward_flows.pop(i, None)
                for j in [j for j in cache if j > i + max(1, model.keyframe_reach)]:
                    del cache[j]
                if self._progress is not None:
                    self._progress(self._share)
            cache.clear()

        # Pass 2: segment by segment, recompute backward states, then forward and reconstruct.
        forward_feats: list[torch.Tensor | None] = [None] * len(tiles)
        forward_flows: dict[int, list[torch.Tensor]] = {}

        def forward_flow(i: int, ti: int) -> torch.Tensor:
            """``flow(lq[i], lq[i-1])`` for tile ``ti``, computed ``flow_batch`` frames at a time."""
            if i not in forward_flows:
                batch = list(range(i, min(i + self.options.flow_batch, t)))
                lqs = {j: self._lq(spool, j, box) for j in range(i - 1, batch[-1] + 1)}
                pairs = [(tile.crop(lqs[j]), tile.crop(lqs[j - 1])) for j in batch for tile in tiles]
                flat = self._flows(pairs)
                for n_j, j in enumerate(batch):
                    forward_flows[j] = flat[n_j * len(tiles) : (n_j + 1) * len(tiles)]
            return forward_flows[i][ti]

        lq_prev = None
        for segment in segments:
            states: dict[int, list[torch.Tensor]] = {}
            if bidirectional:
                if segment.start == 0:
                    states, kept = kept, {}
                elif segment.start in stored:
                    states = {
                        i: [spill.pop(prefix + f"backward_{i}_{ti}", self.device) for ti in range(len(tiles))]
                        for i in segment
                    }
                else:
                    end = segment.stop
                    # The backward state at the next segment's start: its checkpoint, or its
                    # stored state (read, not popped: that segment still needs it).
                    feats = [
                        None
                        if end >= t
                        else spill.get(prefix + f"backward_{end}_{ti}", self.device)
                        if end in stored
                        else spill.pop(prefix + f"state_{end}_{ti}", self.device)
                        for ti in range(len(tiles))
                    ]
                    lq_next = self._lq(spool, end, box) if end < t else None
                    for i in range(end - 1, segment.start - 1, -1):
                        lq = self._lq(spool, i, box)
                        states[i] = []
                        for ti, tile in enumerate(tiles):
                            x = StepInput(
                                tile.crop(lq),
                                tile.crop(lq_next) if lq_next is not None else None,
                                spill.pop(prefix + f"flow_{i}_{ti}", self.device) if i < t - 1 else None,
                                keyframe(i, ti),
                            )
                            feats[ti] = backward_step(x, feats[ti])
                            states[i].append(feats[ti])
                        lq_next = lq
            for i in segment:
                lq = self._lq(spool, i, box)
                outputs = []
                for ti, tile in enumerate(tiles):
                    lq_t = tile.crop(lq)
                    x = StepInput(
                        lq_t,
                        tile.crop(lq_prev) if lq_prev is not None else None,
                        forward_flow(i, ti) if lq_prev is not None else None,
                        keyframe(i, ti, last_use=True),
                    )
                    back = states[i][ti] if bidirectional else None
                    with self._autocast():
                        fwd = model.forward_step(x, forward_feats[ti], back)
                        forward_feats[ti] = fwd
                        outputs.append(model.reconstruct(lq_t, fwd, back))
                forward_flows.pop(i, None)
                if bidirectional:
                    del states[i]
                lq_prev = lq
                yield outputs

    # -- models that do not stream exactly: overlapping windows ---------------------------------
    def _run_windows(self, spool: _FrameSpool, spill: _SpillDir, run_plan: RunPlan) -> Iterator[torch.Tensor]:
        t = len(spool)
        h0, w0 = spool.shape[:2]
        size, overlap = self.options.window_frames, self.options.window_overlap
        starts = _axis_starts(t, size, overlap)
        tiles = plan_tiles(h0, w0, run_plan.tile, self.options.tile_overlap, self._tile_multiple())
        if run_plan.spooled:
            yield from self._run_windows_spooled(spool, spill, tiles, starts)
            return
        blender = _Blender(tiles, h0, w0, self.options.tile_overlap, self.scale)
        # Each frame comes from the window whose centre is nearest to it.
        owner = [min(starts, key=lambda s: (abs(i - (s + (min(size, t) - 1) / 2)), s)) for i in range(t)]
        for start in starts:
            frames = [i for i in range(start, min(start + size, t)) if owner[i] == start]
            if not frames:
                continue
            lqs = torch.stack([self._lq(spool, i) for i in range(start, min(start + size, t))], dim=1)
            per_tile = []
            for tile in tiles:
                with self._autocast():
                    per_tile.append(self.model(tile.crop(lqs)))
            for i in frames:
                yield blender.join([out[:, i - start] for out in per_tile])[
                    ..., : self.scale * h0, : self.scale * w0
                ]

    def _run_windows_spooled(
        self, spool: _FrameSpool, spill: _SpillDir, tiles: list[_Tile], starts: list[int]
    ) -> Iterator[torch.Tensor]:
        """One tile's window at a time, its HR outputs added to a spool instead of kept."""
        t = len(spool)
        h0, w0 = spool.shape[:2]
        size = self.options.window_frames
        hr = _HRSpool(spill, t, tiles, h0, w0, self.options.tile_overlap, self.scale)
        norm = hr.norm()
        owner = [min(starts, key=lambda s: (abs(i - (s + (min(size, t) - 1) / 2)), s)) for i in range(t)]
        for start in starts:
            window = range(start, min(start + size, t))
            frames = [i for i in window if owner[i] == start]
            if not frames:
                continue
            for tile in tiles:
                lqs = torch.stack([self._lq(spool, i, tile) for i in window], dim=1)
                with self._autocast():
                    out = self.model(lqs)
                del lqs
                for i in frames:
                    hr.add(i, [tile], [out[:, i - start]])
                del out
            for i in frames:
                yield hr.frame(i, norm)[..., : self.scale * h0, : self.scale * w0]


def upscale_frames(
    frames: Iterable[np.ndarray],
    model: nn.Module,
    progress: Callable[[int], None] | None = None,
    **options,
) -> Iterator[np.ndarray]:
    """Upscale a stream of uint8 or uint16 (H, W, 3) RGB frames; yields HR frames of that dtype in order.

    ``options`` are :class:`EngineOptions` fields (``device``, ``precision``, ``tile``, ...).
    """
    return Upscaler(model, EngineOptions(**options)).run(frames, progress)
