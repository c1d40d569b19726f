"""Training samples: random LR/GT clip crops from data-set layouts or from a folder of videos.

Two sources share one sample recipe (window of ``num_frames`` frames → aligned LR/GT crop →
flips, transpose, temporal flip → Vimeo mirror):

* **Data-set layouts** (``reds``, ``vimeo90k``, ... anything ``vsrkit.data.datasets.list_clips``
  knows) read with ``split="train"``. LR frames shipped with the data set are used when
  present (``use_lq_files``); otherwise the LR crop is made from the GT crop on the fly.
* **A folder of video files** (``layout: videos``). Each video is decoded once with PyAV into an
  on-disk cache of raw uint8 frames (``cache_dir``), then memory-mapped: workers and DDP ranks
  share the pages through the OS cache, nothing is held per process, and a restart reuses the
  cache. Decoding random windows on every sample would cost a seek plus a GOP of decoding per
  sample, which on two CPU cores is slower than the model itself. ``max_frames_per_video`` caps
  the disk use (640×480 is 0.9 MB a frame).

**On-the-fly degradation.** The GT crop is read with a margin of ``_MARGIN_LR`` LR pixels on every
side (where the frame has them), degraded with ``vsrkit.data.degradations.degrade`` as uint8 (the
papers' LR were uint8 PNGs), and the margin is cut off. The bicubic kernel at ×4 reaches 2 LR
pixels and the BD Gaussian less, so the LR crop equals the crop of the degraded full frame.

**Randomness is a function of the sample index.** Sample ``i`` draws everything (clip, window,
crop, flips) from ``numpy.random.default_rng([seed, i])``; iteration ``k`` of rank ``r`` takes the
indices ``k·B·W + r·B + j``. So the data order does not depend on the number of workers, ranks
never see the same sample, and resuming at iteration ``k`` replays exactly what an uninterrupted
run would have seen (no sampler state to save).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import VsrkitError
from .degradations import degrade

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".y4m")
# LR pixels of context kept around an on-the-fly crop (see the module docstring).
_MARGIN_LR = 2


# -------------------------------------------------------------------------------- video cache


@dataclass
class CachedVideo:
    """A decoded video: ``frames`` is a read-only (T, H, W, 3) uint8 memory map."""

    name: str
    frames: np.ndarray


def _cache_key(path: Path, max_frames: int | None) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{max_frames}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _open_cached(raw: Path, meta: Path) -> np.ndarray | None:
    try:
        info = json.loads(meta.read_text())
        shape = tuple(int(v) for v in info["shape"])
    except (OSError, ValueError, KeyError):
        return None
    if not raw.is_file() or raw.stat().st_size != int(np.prod(shape)):
        return None
    return np.memmap(raw, dtype=np.uint8, mode="r", shape=shape)


def cache_video(
    path: str | os.PathLike, cache_dir: str | os.PathLike, max_frames: int | None = None
) -> CachedVideo:
    """Decode ``path`` once into ``cache_dir`` (raw uint8 + JSON shape) and memory-map it.

    Both files are written under temporary names and renamed, the shape file last, so a killed
    process leaves either a complete cache entry or none.
    """
    from ..weights import atomic_write
    from .video import open_frames

    path = Path(path)
    cache_dir = Path(cache_dir)
    key = _cache_key(path, max_frames)
    raw = cache_dir / f"{path.name}.{key}.u8"
    meta = cache_dir / f"{path.name}.{key}.json"
    frames = _open_cached(raw, meta)
    if frames is not None:
        return CachedVideo(path.name, frames)

    shape: list[int] = []

    def write_raw(tmp: str) -> None:
        count = 0
        with open(tmp, "wb") as f, open_frames(path) as source:
            iterator = iter(source)
            try:
                for frame in iterator:
                    if not shape:
                        shape.extend(frame.shape)
                    f.write(np.ascontiguousarray(frame).tobytes())
                    count += 1
                    if max_frames is not None and count >= max_frames:
                        break
            finally:
                iterator.close()  # type: ignore[attr-defined]
        shape.insert(0, count)

    atomic_write(raw, write_raw)
    atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps({"source": str(path), "shape": shape})))
    frames = _open_cached(raw, meta)
    if frames is None:  # pragma: no cover - only on a concurrent, different writer
        raise VsrkitError(f"frame cache for {path} is inconsistent: delete {cache_dir}")
    return CachedVideo(path.name, frames)


def list_videos(
    root: str | os.PathLike, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> list[Path]:
    """Video files directly in ``root`` (sorted), filtered by glob patterns on the file name."""
    root = Path(root)
    if not root.is_dir():
        raise VsrkitError(f"video folder not found: {root} (set data.root)")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if include:
        files = [p for p in files if any(fnmatch.fnmatch(p.name, pat) for pat in include)]
    files = [p for p in files if not any(fnmatch.fnmatch(p.name, pat) for pat in exclude)]
    if not files:
        raise VsrkitError(
            f"no video files left in {root} (include={list(include or [])}, exclude={list(exclude)})"
        )
    return files


# -------------------------------------------------------------------------------- sample recipe


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 → (T, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


def degrade_crop(
    frames: np.ndarray, y: int, x: int, patch: int, scale: int, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """LR crop at LR position (y, x), size ``patch``, made from GT ``frames`` (T, H, W, 3) uint8.

    Returns ``(lq, gt)`` as uint8 (T, p, p, 3) and (T, p·s, p·s, 3). The LR crop equals the same
    crop of the degraded full frames (see the module docstring).
    """
    t, h, w = frames.shape[:3]
    lh, lw = h // scale, w // scale
    y0, x0 = max(0, y - _MARGIN_LR), max(0, x - _MARGIN_LR)
    y1, x1 = min(lh, y + patch + _MARGIN_LR), min(lw, x + patch + _MARGIN_LR)
    region = np.ascontiguousarray(frames[:, y0 * scale : y1 * scale, x0 * scale : x1 * scale])
    # torch uint8 in, uint8 out: vectorised over the frames, rounded like MATLAB's uint8 path.
    lq = degrade(torch.from_numpy(region).permute(0, 3, 1, 2), kind, scale).permute(0, 2, 3, 1).numpy()
    lq = lq[:, y - y0 : y - y0 + patch, x - x0 : x - x0 + patch]
    gt = frames[:, y * scale : (y + patch) * scale, x * scale : (x + patch) * scale]
    return np.ascontiguousarray(lq), np.ascontiguousarray(gt)


def augment(
    lq: np.ndarray, gt: np.ndarray, rng: np.random.Generator, cfg: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """h/v flips and transpose (each p=0.5, same for LR, GT and all frames), temporal flip, mirror."""
    # Draw all coins unconditionally so switching one augmentation off leaves the others' draws.
    hflip, vflip, transpose, tflip = rng.random(4) < 0.5
    if cfg.get("flip", True):
        if hflip:
            lq, gt = lq[:, :, ::-1], gt[:, :, ::-1]
        if vflip:
            lq, gt = lq[:, ::-1], gt[:, ::-1]
    if cfg.get("transpose", True) and transpose:
        lq, gt = lq.transpose(0, 2, 1, 3), gt.transpose(0, 2, 1, 3)
    if cfg.get("temporal_flip", False) and tflip:
        lq, gt = lq[::-1], gt[::-1]
    if cfg.get("mirror", False):
        # Vimeo-90K recipe: 7 frames → 14, the clip followed by itself reversed.
        lq = np.concatenate([lq, lq[::-1]])
        gt = np.concatenate([gt, gt[::-1]])
    return lq, gt


class TrainClips(Dataset):
    """Map-style data set: index ``i`` → ``(lq, gt)`` float tensors (T, 3, p, p), (T, 3, sp, sp).

    ``cfg`` is the ``data`` section of a training config. Build with :func:`build_train_dataset`.
    """

    def __init__(self, cfg: dict[str, Any], seed: int, cache_dir: str | os.PathLike | None = None) -> None:
        self.cfg = dict(cfg)
        self.seed = int(seed)
        self.scale = int(cfg.get("scale", 4))
        self.patch = int(cfg["lr_patch"])
        self.num_frames = int(cfg["num_frames"])
        self.kind = str(cfg.get("degradation", "bi")).lower()
        self.layout = str(cfg["layout"]).lower()
        self.videos: list[CachedVideo] = []
        self.clips: list[Any] = []
        if self.layout == "videos":
            self._init_videos(cache_dir)
        else:
            self._init_layout()

    # -- sources
    def _init_videos(self, cache_dir: str | os.PathLike | None) -> None:
        cfg = self.cfg
        files = list_videos(cfg["root"], cfg.get("clips"), cfg.get("exclude") or ())
        cache = Path(cfg.get("cache_dir") or cache_dir or Path(cfg["root"]) / ".vsrkit_frame_cache")
        need = self.patch * self.scale
        for f in files:
            video = cache_video(f, cache, cfg.get("max_frames_per_video"))
            t, h, w = video.frames.shape[:3]
            if t < self.num_frames or h // self.scale < self.patch or w // self.scale < self.patch:
                warnings.warn(
                    f"skipping {f.name}: {t} frames of {w}x{h} are too few/small for "
                    f"{self.num_frames} frames of {need}x{need} GT",
                    stacklevel=2,
                )
                continue
            self.videos.append(video)
        if not self.videos:
            raise VsrkitError(f"no usable training video in {cfg['root']}")
        windows = np.array([v.frames.shape[0] - self.num_frames + 1 for v in self.videos], dtype=np.float64)
        # Every window of every video equally likely: long videos weigh more.
        self._video_p = windows / windows.sum()

    def _init_layout(self) -> None:
        try:
            from . import datasets
        except ImportError as exc:  # pragma: no cover - until vsrkit.data.datasets is present
            raise VsrkitError(f"data layout {self.layout!r} needs vsrkit.data.datasets ({exc})") from None
        self.clips = list(
            datasets.list_clips(
                self.layout,
                self.cfg["root"],
                split=self.cfg.get("split", "train"),
                degradation=self.kind,
                clips=self.cfg.get("clips"),
            )
        )
        exclude = self.cfg.get("exclude") or ()
        self.clips = [c for c in self.clips if not any(fnmatch.fnmatch(c.name, p) for p in exclude)]
        if not self.clips:
            raise VsrkitError(f"no training clips in {self.cfg['root']} ({self.layout} layout)")

    # -- sampling
    def __len__(self) -> int:
        # Nominal: the sampler draws indices without end; this is one "epoch" for the layouts.
        return len(self.clips) if self.clips else len(self.videos)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self._rng(index)
        if self.videos:
            lq, gt = self._sample_video(rng)
        else:
            lq, gt = self._sample_clip(index, rng)
        lq, gt = augment(lq, gt, rng, self.cfg)
        return _to_tensor(lq), _to_tensor(gt)

    def _crop_position(self, rng: np.random.Generator, h: int, w: int) -> tuple[int, int]:
        lh, lw = h // self.scale, w // self.scale
        return int(rng.integers(0, lh - self.patch + 1)), int(rng.integers(0, lw - self.patch + 1))

    def _sample_video(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        video = self.videos[int(rng.choice(len(self.videos), p=self._video_p))]
        t, h, w = video.frames.shape[:3]
        start = int(rng.integers(0, t - self.num_frames + 1))
        y, x = self._crop_position(rng, h, w)
        window = video.frames[start : start + self.num_frames]
        return degrade_crop(window, y, x, self.patch, self.scale, self.kind)

    def _sample_clip(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # Clips in a fresh permutation per epoch, like a shuffled sampler, but index-derived.
        n = len(self.clips)
        epoch, pos = divmod(int(index), n)
        clip = self.clips[int(np.random.default_rng([self.seed, 1 << 30, epoch]).permutation(n)[pos])]
        if clip.gt_frames is None:
            raise VsrkitError(f"clip {clip.name} has no GT frames (for video files use data.layout: videos)")
        gt_paths = list(clip.gt_frames)
        if len(gt_paths) < self.num_frames:
            raise VsrkitError(f"clip {clip.name} has {len(gt_paths)} frames, {self.num_frames} needed")
        start = int(rng.integers(0, len(gt_paths) - self.num_frames + 1))
        gt_all = np.stack([_read_image(p) for p in gt_paths[start : start + self.num_frames]])
        lq_paths = list(clip.lq_frames or []) if self.cfg.get("use_lq_files", True) else []
        h, w = gt_all.shape[1:3]
        y, x = self._crop_position(rng, h, w)
        if lq_paths:
            lq_all = np.stack([_read_image(p) for p in lq_paths[start : start + self.num_frames]])
            if lq_all.shape[1] * self.scale != h or lq_all.shape[2] * self.scale != w:
                raise VsrkitError(
                    f"clip {clip.name}: LR {lq_all.shape[1:3]} is not GT {(h, w)} / {self.scale}"
                )
            p, s = self.patch, self.scale
            return (
                np.ascontiguousarray(lq_all[:, y : y + p, x : x + p]),
                np.ascontiguousarray(gt_all[:, y * s : (y + p) * s, x * s : (x + p) * s]),
            )
        return degrade_crop(gt_all, y, x, self.patch, self.scale, self.kind)


def build_train_dataset(
    cfg: dict[str, Any], seed: int, cache_dir: str | os.PathLike | None = None
) -> TrainClips:
    """The training data set of a config's ``data`` section."""
    return TrainClips(cfg, seed, cache_dir)


class IterationBatchSampler(Sampler[list[int]]):
    """Endless batches of sample indices for one rank, starting at ``start_iteration``.

    Iteration ``k`` of rank ``r`` of ``W`` with per-rank batch ``B`` gets indices
    ``k·B·W + r·B + j`` for ``j < B``: disjoint across ranks (the sharding a DistributedSampler
    gives) and a pure function of ``k``, so resuming needs no sampler state.
    """

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start_iteration: int = 0) -> None:
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_iteration = int(start_iteration)

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start_iteration
        per_iter = self.batch_size * self.world_size
        while True:
            base = k * per_iter + self.rank * self.batch_size
            yield list(range(base, base + self.batch_size))
            k += 1

    def __len__(self) -> int:  # pragma: no cover - endless; DataLoader only needs it for len()
        return 2**62


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: distinct, reproducible global RNG seeds per worker and rank.

    The samples themselves draw from index-derived generators; this covers any library code
    that uses the global generators.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


# -------------------------------------------------------------------------------- validation


@dataclass
class ValClip:
    name: str
    lq: torch.Tensor  # (T, 3, h, w) float in [0, 1]
    gt: np.ndarray  # (T, H, W, 3) uint8


def _centre_crop(frames: np.ndarray, size: int | None, multiple: int) -> np.ndarray:
    h, w = frames.shape[1:3]
    ch = min(h, size) if size else h
    cw = min(w, size) if size else w
    ch, cw = ch - ch % multiple, cw - cw % multiple
    y, x = (h - ch) // 2, (w - cw) // 2
    return frames[:, y : y + ch, x : x + cw]


def load_val_clips(cfg: dict[str, Any]) -> list[ValClip]:
    """Validation clips of a config's merged ``val`` section (layout, root, clips, ...).

    ``max_frames`` keeps the first frames, ``gt_crop`` a centre crop of that many GT pixels: on
    a CPU a whole 640×480 clip through a full model takes minutes.
    """
    scale = int(cfg.get("scale", 4))
    kind = str(cfg.get("degradation", "bi")).lower()
    max_frames = cfg.get("max_frames")
    crop = cfg.get("gt_crop")
    out: list[ValClip] = []
    layout = str(cfg["layout"]).lower()
    if layout == "videos":
        from .video import read_all_frames

        for f in list_videos(cfg["root"], cfg.get("clips"), cfg.get("exclude") or ()):
            gt = _centre_crop(read_all_frames(f, max_frames), crop, scale)
            lq = degrade(torch.from_numpy(np.ascontiguousarray(gt)).permute(0, 3, 1, 2), kind, scale)
            out.append(ValClip(f.name, lq.float().div_(255.0), np.ascontiguousarray(gt)))
        return out
    from . import datasets

    for clip in datasets.list_clips(
        layout, cfg["root"], split="test", degradation=kind, clips=cfg.get("clips")
    ):
        lq_u8, gt = datasets.load_clip(clip, degradation=kind, scale=scale, max_frames=max_frames)
        if gt is None:
            raise VsrkitError(f"validation clip {clip.name} has no ground truth")
        gt = gt[:, : lq_u8.shape[1] * scale, : lq_u8.shape[2] * scale]
        if crop:
            # Centre crop on the LR grid so that LR and GT stay aligned.
            lq_u8 = _centre_crop(lq_u8, max(1, crop // scale), 1)
            h, w = lq_u8.shape[1:3]
            y = (gt.shape[1] // scale - h) // 2
            x = (gt.shape[2] // scale - w) // 2
            gt = gt[:, y * scale : (y + h) * scale, x * scale : (x + w) * scale]
        out.append(ValClip(clip.name, _to_tensor(lq_u8), np.ascontiguousarray(gt)))
    return out
