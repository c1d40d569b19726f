"""The test (and training) sets of the BasicVSR papers, read in place from their usual layouts.

Everything here only reads: no cache, index or LR file is ever written into a dataset root. When the
LR frames of the chosen degradation are not shipped, :func:`load_clip` makes them from the ground truth
in memory with :func:`vsrkit.data.degradations.degrade` (MATLAB bicubic for BI, ``BD_degradation.m``
for BD), exactly as the papers' data were made.

Layouts (``ROOT`` is the ``root`` argument; the first candidate that exists wins):

``reds4``, ``redsval4``, ``reds``
    GT ``ROOT/train_sharp/NNN/00000000.png`` (or ``ROOT/train/train_sharp/...`` as the official zips
    unpack), BI LR ``ROOT/train_sharp_bicubic/X4/NNN/...``; the official validation set likewise under
    ``val_sharp`` / ``val_sharp_bicubic/X4``. mmagic and BasicSR merge the 30 validation clips into
    ``train_sharp`` as clips 240-269; that layout is recognised too. A stand-alone REDS4 folder
    (``ROOT/GT/NNN`` + ``ROOT/sharp_bicubic/NNN``, as BasicSR and mmagic prepare it) is accepted for
    ``reds4``. REDS ships BI LR only; BD LR is always made on the fly.

    * REDS4 = clips 000, 011, 015, 020 of the training set (the test set of every paper).
    * REDSval4 = clips 000, 001, 006, 017 of the official *validation* set: footnote 3 of the
      BasicVSR/IconVSR paper. In the merged layout these are clips 240, 241, 246, 257.
    * ``reds`` with ``split="train"``: every clip of ``train_sharp`` except REDS4 (mmagic's and
      BasicSR's "REDS4 partition"; in the merged layout this includes the 30 validation clips, as both
      reference trainings did). ``split="val"``: the 30 official validation clips. ``split="test"``:
      REDS4.

``vimeo90k-t``, ``vimeo90k``
    GT septuplets ``ROOT/sequences/XXXXX/YYYY/im1..7.png`` (the official ``vimeo_septuplet``) or
    ``ROOT/GT/...`` (mmagic). Clip lists: ``sep_testlist.txt`` / ``sep_trainlist.txt`` (official) or
    mmagic's ``meta_info_Vimeo90K_{test,train}_GT.txt``; clips are named ``XXXXX/YYYY``. LR, when
    present: ``ROOT/BIx4`` / ``ROOT/BDx4`` (mmagic), ``ROOT/sequences_BIx4`` / ``ROOT/sequences_BDx4``,
    or, beside a root named ``vimeo_septuplet``, BasicSR/KAIR's ``vimeo_septuplet_matlabLRx4/sequences``
    (BI) and ``vimeo_septuplet_BDLRx4/sequences`` (BD). ``vimeo90k-t`` is ``vimeo90k`` with
    ``split="test"`` (7,824 septuplets).

``vid4``, ``udm10``
    ``ROOT/GT/<clip>/*.png`` and, when present, ``ROOT/BIx4/<clip>/`` and ``ROOT/BDx4/<clip>/``
    (mmagic and BasicSR). GT and LR frames are paired in natural name order (UDM10 names them
    ``0000.png`` and ``000.png``).

``folder``
    Your own ground truth: ``ROOT/<clip>/*.png`` (any image type) or ``ROOT/<clip>.mp4`` (any video
    file FFmpeg reads). LR is always made on the fly.

Frame sizes not divisible by the scale: the LR of the papers was made after MATLAB's ``modcrop``
(keep the top-left ``H - H mod 4`` rows and ``W - W mod 4`` columns), so GT frames are cropped the same
way before degrading, or to exactly ``scale`` times the shipped LR size. The standard sets need no
crop (Vid4 is 720x576, 704x576 and 720x480; REDS 1280x720; Vimeo-90K 448x256).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vsrkit.data.degradations import degrade
from vsrkit.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, open_frames, read_all_frames
from vsrkit.errors import VsrkitError

__all__ = [
    "DATASETS",
    "DEGRADATIONS",
    "REDS4_CLIPS",
    "REDSVAL4_CLIPS",
    "Clip",
    "list_clips",
    "load_clip",
]

DATASETS = ("reds4", "redsval4", "reds", "vimeo90k-t", "vimeo90k", "vid4", "udm10", "folder")
DEGRADATIONS = ("bi", "bd")
#: REDS4: clips of the REDS *training* set held out as the test set (EDVR's partition).
REDS4_CLIPS = ("000", "011", "015", "020")
#: REDSval4: clips of the official REDS *validation* set (BasicVSR paper, footnote 3).
REDSVAL4_CLIPS = ("000", "001", "006", "017")
# mmagic/BasicSR rename validation clip NNN to 240 + NNN when merging it into train_sharp.
_MERGED_VAL_OFFSET = 240
_NUM_VAL_CLIPS = 30


@dataclass
class Clip:
    """One clip of a dataset: where its frames are, not the frames themselves.

    ``gt_frames`` / ``lq_frames`` are image files in frame order; ``lq_frames`` is None when the LR of
    the requested degradation is not shipped (:func:`load_clip` then makes it from the GT), and
    ``gt_frames`` is None when only LR exists or when the GT is the video file ``gt_video``.
    """

    name: str
    gt_frames: list[Path] | None
    lq_frames: list[Path] | None
    gt_video: Path | None = None

    @property
    def has_gt(self) -> bool:
        """Whether ground truth exists (as images or as a video)."""
        return self.gt_frames is not None or self.gt_video is not None

    @property
    def num_frames(self) -> int | None:
        """Number of frames; for a video, its packet count (None if the file cannot say)."""
        if self.gt_frames is not None:
            return len(self.gt_frames)
        if self.lq_frames is not None:
            return len(self.lq_frames)
        if self.gt_video is not None:
            with open_frames(self.gt_video) as source:
                return source.num_frames
        return None


# --------------------------------------------------------------------------- helpers


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _images(folder: Path) -> list[Path]:
    """Image files of ``folder`` in natural name order (hidden files skipped)."""
    try:
        names = [
            e.name
            for e in os.scandir(folder)
            if e.is_file() and not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS
        ]
    except OSError as exc:
        raise VsrkitError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return [folder / n for n in sorted(names, key=_natural_key)]


def _subdirs(folder: Path) -> list[str]:
    try:
        names = [e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
    except OSError as exc:
        raise VsrkitError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return sorted(names, key=_natural_key)


def _first_dir(candidates: Iterable[Path]) -> Path | None:
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _check_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise VsrkitError(f"dataset root not found: {path}")
    if not path.is_dir():
        raise VsrkitError(f"dataset root is not a folder: {path}")
    return path


def _norm_degradation(degradation: str) -> str:
    key = str(degradation).lower()
    if key not in DEGRADATIONS:
        raise VsrkitError(f"unknown degradation {degradation!r}: expected 'bi' or 'bd'")
    return key


def _bad_split(dataset: str, split: str, allowed: Iterable[str]) -> VsrkitError:
    return VsrkitError(f"dataset {dataset!r} has no {split!r} split (available: {', '.join(allowed)})")


def _pair_clip(name: str, gt_dir: Path | None, lq_dir: Path | None) -> Clip:
    """A clip from its GT folder and (optional) LR folder, checking that they agree."""
    gt = _images(gt_dir) if gt_dir is not None else None
    lq = _images(lq_dir) if lq_dir is not None else None
    if gt is not None and not gt:
        raise VsrkitError(f"clip {name!r}: no images in {gt_dir}")
    if lq is not None and not lq:
        raise VsrkitError(f"clip {name!r}: no images in {lq_dir}")
    if gt is not None and lq is not None and len(gt) != len(lq):
        raise VsrkitError(
            f"clip {name!r}: {len(gt)} GT frames in {gt_dir} but {len(lq)} LR frames in {lq_dir}"
        )
    return Clip(name, gt, lq)


def _clips_from_dirs(names: list[str], gt_root: Path | None, lq_root: Path | None) -> list[Clip]:
    """Clips ``names`` under ``gt_root`` / ``lq_root`` (either may be None, not both)."""
    clips = []
    for name in names:
        gt_dir = gt_root / name if gt_root is not None else None
        lq_dir = lq_root / name if lq_root is not None else None
        if gt_dir is not None and not gt_dir.is_dir():
            raise VsrkitError(f"clip {name!r} not found: no folder {gt_dir}")
        if lq_dir is not None and not lq_dir.is_dir():
            if gt_dir is None:
                raise VsrkitError(f"clip {name!r} not found: no folder {lq_dir}")
            # An LR folder that lacks some clips is a damaged copy: making those clips' LR on the fly
            # would mix two data sources in one score, so refuse.
            raise VsrkitError(f"{lq_root} has no clip {name!r} (the LR folder is incomplete)")
        clips.append(_pair_clip(name, gt_dir, lq_dir))
    return clips


def _select(names: list[str], wanted: list[str] | None, dataset: str) -> list[str]:
    """The names in ``wanted`` (in that order, without repeats); unknown names are an error."""
    if wanted is None:
        return names
    chosen = list(dict.fromkeys(w.strip() for w in wanted if w.strip()))
    if not chosen:
        raise VsrkitError("no clip names given")
    known = set(names)
    missing = [n for n in chosen if n not in known]
    if missing:
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise VsrkitError(f"unknown clip(s) {', '.join(missing)} in {dataset}; available: {shown}")
    return chosen


# A listing: clip names in dataset order, and the GT and LR folders holding one sub-folder per clip.
_Listing = tuple[list[str], Path | None, Path | None]


# --------------------------------------------------------------------------- REDS


def _reds_part(root: Path, part: str) -> tuple[Path | None, Path | None]:
    """(GT folder, BI LR folder) of REDS ``part`` ('train' or 'val'); None where absent."""
    gt = _first_dir([root / f"{part}_sharp", root / part / f"{part}_sharp"])
    lq = _first_dir([root / f"{part}_sharp_bicubic" / "X4", root / part / f"{part}_sharp_bicubic" / "X4"])
    return gt, lq


def _list_reds(dataset: str, root: Path, split: str, deg: str) -> _Listing:
    allowed = {"reds4": ("test", "train"), "redsval4": ("test", "val"), "reds": ("train", "val", "test")}
    if split not in allowed[dataset]:
        raise _bad_split(dataset, split, allowed[dataset])
    train_gt, train_lq = _reds_part(root, "train")
    val_gt, val_lq = _reds_part(root, "val")
    if deg != "bi":  # REDS ships bicubic LR only
        train_lq = val_lq = None

    if dataset == "redsval4" or split == "val":
        if val_gt is not None or val_lq is not None:
            base = val_gt if val_gt is not None else val_lq
            assert base is not None
            names = list(REDSVAL4_CLIPS) if dataset == "redsval4" else _subdirs(base)
            return names, val_gt, val_lq
        # mmagic/BasicSR merged layout: validation clip NNN is train_sharp/(240 + NNN).
        base = train_gt if train_gt is not None else train_lq
        if base is None or not (base / str(_MERGED_VAL_OFFSET)).is_dir():
            raise VsrkitError(
                f"no REDS validation clips in {root}: expected val_sharp/ (or val_sharp_bicubic/X4/), "
                f"or train_sharp/{_MERGED_VAL_OFFSET}..{_MERGED_VAL_OFFSET + _NUM_VAL_CLIPS - 1} "
                "(mmagic/BasicSR merged layout)"
            )
        offsets = [int(n) for n in REDSVAL4_CLIPS] if dataset == "redsval4" else range(_NUM_VAL_CLIPS)
        return [f"{_MERGED_VAL_OFFSET + i:03d}" for i in offsets], train_gt, train_lq

    if train_gt is None and train_lq is None:
        if split == "test":
            # Stand-alone REDS4 as BasicSR and mmagic prepare it: ROOT/GT + ROOT/sharp_bicubic.
            gt = _first_dir([root / "GT"])
            lq = _first_dir([root / "sharp_bicubic" / "X4", root / "sharp_bicubic"]) if deg == "bi" else None
            base = gt if gt is not None else lq
            if base is not None and any((base / n).is_dir() for n in REDS4_CLIPS):
                return list(REDS4_CLIPS), gt, lq
        raise VsrkitError(
            f"no REDS data in {root}: expected train_sharp/NNN/ (GT) and/or train_sharp_bicubic/X4/NNN/ (LR)"
            + (", or REDS4's GT/NNN/ and sharp_bicubic/NNN/" if split == "test" else "")
        )
    if split == "test":
        return list(REDS4_CLIPS), train_gt, train_lq
    base = train_gt if train_gt is not None else train_lq
    assert base is not None
    return [n for n in _subdirs(base) if n not in REDS4_CLIPS], train_gt, train_lq


# --------------------------------------------------------------------------- Vimeo-90K

_VIMEO_LISTS = {
    "test": ("sep_testlist.txt", "meta_info_Vimeo90K_test_GT.txt"),
    "train": ("sep_trainlist.txt", "meta_info_Vimeo90K_train_GT.txt"),
}


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VsrkitError(f"cannot read {path}: {exc}") from None
    # sep_*list.txt holds "00001/0001"; mmagic's meta_info holds "00001/0001 7 (256,448,3)".
    return list(dict.fromkeys(line.split()[0].strip("/") for line in lines if line.strip()))


def _vimeo_lq_root(root: Path, deg: str) -> Path | None:
    tag = f"{deg.upper()}x4"
    candidates = [root / tag, root / f"sequences_{tag}", root / "LR" / tag]
    if root.name == "vimeo_septuplet":
        sibling = "vimeo_septuplet_matlabLRx4" if deg == "bi" else "vimeo_septuplet_BDLRx4"
        candidates.append(root.parent / sibling / "sequences")
    found = _first_dir(candidates)
    if found is not None and (found / "sequences").is_dir():
        found = found / "sequences"
    return found


def _list_vimeo(dataset: str, root: Path, split: str, deg: str) -> tuple[_Listing, Path]:
    allowed = ("test",) if dataset == "vimeo90k-t" else ("test", "train")
    if split not in allowed:
        raise _bad_split(dataset, split, allowed)
    gt_root = _first_dir([root / "sequences", root / "GT"])
    lq_root = _vimeo_lq_root(root, deg)
    if gt_root is None and lq_root is None:
        raise VsrkitError(f"no Vimeo-90K data in {root}: expected sequences/ or GT/ (septuplets XXXXX/YYYY/)")
    list_file = next((root / n for n in _VIMEO_LISTS[split] if (root / n).is_file()), None)
    if list_file is None:
        # Never fall back to "every sequence found": the folder may hold the training septuplets too.
        raise VsrkitError(f"no clip list in {root}: expected {' or '.join(_VIMEO_LISTS[split])}")
    names = _read_list(list_file)
    if not names:
        raise VsrkitError(f"{list_file} lists no septuplets")
    return (names, gt_root, lq_root), list_file


def _check_present(names: list[str], base: Path, list_file: Path) -> None:
    missing = [n for n in names if not (base / n).is_dir()]
    if missing:
        raise VsrkitError(
            f"{len(missing)} of the {len(names)} septuplets asked for from {list_file.name} are missing "
            f"under {base} (first: {missing[0]})"
        )


# --------------------------------------------------------------------------- Vid4 / UDM10 / folder


def _list_gt_lq(dataset: str, root: Path, split: str, deg: str) -> _Listing:
    if split != "test":
        raise _bad_split(dataset, split, ("test",))
    gt_root = _first_dir([root / "GT"])
    lq_root = _first_dir([root / f"{deg.upper()}x4"])
    base = gt_root if gt_root is not None else lq_root
    if base is None:
        raise VsrkitError(
            f"no {dataset} data in {root}: expected GT/<clip>/ (and optionally {deg.upper()}x4/<clip>/)"
        )
    return _subdirs(base), gt_root, lq_root


def _list_folder(root: Path, split: str) -> dict[str, Clip]:
    if split != "test":
        raise _bad_split("folder", split, ("test",))
    clips: dict[str, Clip] = {}
    try:
        entries = sorted(os.scandir(root), key=lambda e: _natural_key(e.name))
    except OSError as exc:
        raise VsrkitError(f"cannot list {root}: {exc.strerror or exc}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_dir():
            frames = _images(path)
            if not frames:
                continue  # not a clip (e.g. a folder of notes)
            name, clip = entry.name, Clip(entry.name, frames, None)
        elif entry.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
            name, clip = path.stem, Clip(path.stem, None, None, gt_video=path)
        else:
            continue
        if name in clips:
            raise VsrkitError(f"two clips named {name!r} in {root} (a folder and a video?)")
        clips[name] = clip
    return clips


# --------------------------------------------------------------------------- public API


def list_clips(
    dataset: str,
    root: str | os.PathLike[str],
    *,
    split: str = "test",
    degradation: str = "bi",
    clips: list[str] | None = None,
) -> list[Clip]:
    """The clips of ``dataset`` (one of :data:`DATASETS`) under ``root``, in dataset order.

    ``split`` is ``"test"`` for the test sets; ``reds``/``reds4`` also have ``"train"`` (REDS minus
    REDS4), ``reds`` and ``redsval4`` ``"val"``, ``vimeo90k`` ``"train"``. ``degradation`` picks which
    shipped LR folder is used (``"bi"`` or ``"bd"``); without one, ``lq_frames`` is None. ``clips``
    keeps only those clips, in the order given. Raises :class:`VsrkitError` for a missing root, an
    empty or incomplete dataset and unknown clip names (the message lists the available ones).
    """
    key = str(dataset).lower()
    if key not in DATASETS:
        raise VsrkitError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    deg = _norm_degradation(degradation)
    path = _check_root(root)
    if key == "folder":
        found = _list_folder(path, split)
        if not found:
            exts = ", ".join(VIDEO_EXTENSIONS)
            raise VsrkitError(f"no clips in {path}: expected sub-folders of images or video files ({exts})")
        return [found[n] for n in _select(list(found), clips, key)]
    if key in ("vimeo90k-t", "vimeo90k"):
        (names, gt_root, lq_root), list_file = _list_vimeo(key, path, split, deg)
        names = _select(names, clips, key)
        base = gt_root if gt_root is not None else lq_root
        assert base is not None
        _check_present(names, base, list_file)
    else:
        lister = _list_reds if key in ("reds4", "redsval4", "reds") else _list_gt_lq
        names, gt_root, lq_root = lister(key, path, split, deg)
        if not names:
            raise VsrkitError(f"no clips found in {path}")
        names = _select(names, clips, key)
    return _clips_from_dirs(names, gt_root, lq_root)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise VsrkitError(f"cannot read image {path}: {exc}") from None


def _stack(frames: list[np.ndarray], what: str) -> np.ndarray:
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise VsrkitError(f"{what}: frames differ in size ({', '.join(str(s[:2]) for s in sorted(shapes))})")
    return np.stack(frames)


def load_clip(
    clip: Clip, *, degradation: str = "bi", scale: int = 4, max_frames: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a clip: ``(lq, gt)`` as uint8 RGB arrays (T, h, w, 3) and (T, H, W, 3) (``gt`` may be None).

    The shipped LR is used when ``clip.lq_frames`` is set; otherwise the LR is made from the GT with
    ``degrade(gt, degradation, scale)``. GT is cropped top-left to ``scale`` times the LR size (MATLAB
    ``modcrop``), so ``gt.shape[1:3] == (scale*h, scale*w)`` always holds. ``max_frames`` keeps the
    first frames only.
    """
    deg = _norm_degradation(degradation)
    if max_frames is not None and max_frames <= 0:
        raise VsrkitError(f"max_frames must be positive, got {max_frames}")
    stop = max_frames

    gt: np.ndarray | None = None
    if clip.gt_frames is not None:
        gt = _stack([_read_image(p) for p in clip.gt_frames[:stop]], f"clip {clip.name!r} GT")
    elif clip.gt_video is not None:
        gt = read_all_frames(clip.gt_video, max_frames=stop)

    if clip.lq_frames is not None:
        lq = _stack([_read_image(p) for p in clip.lq_frames[:stop]], f"clip {clip.name!r} LR")
        if gt is None:
            return lq, None
        if len(gt) != len(lq):
            raise VsrkitError(f"clip {clip.name!r}: {len(gt)} GT frames but {len(lq)} LR frames")
        h, w = lq.shape[1] * scale, lq.shape[2] * scale
        gh, gw = gt.shape[1:3]
        # The GT may exceed scale x LR by less than one LR pixel (MATLAB modcrop), never more.
        if not (h <= gh < h + scale and w <= gw < w + scale):
            raise VsrkitError(
                f"clip {clip.name!r}: GT frames are {gw}x{gh} but LR frames are "
                f"{lq.shape[2]}x{lq.shape[1]} (x{scale} would be {w}x{h})"
            )
        return lq, np.ascontiguousarray(gt[:, :h, :w])

    if gt is None:
        raise VsrkitError(f"clip {clip.name!r} has neither GT nor LR frames")
    gh, gw = gt.shape[1:3]
    h, w = gh - gh % scale, gw - gw % scale
    if h == 0 or w == 0:
        raise VsrkitError(f"clip {clip.name!r}: frames of {gw}x{gh} are smaller than the scale {scale}")
    gt = np.ascontiguousarray(gt[:, :h, :w])
    lq = np.stack([degrade(frame, deg, scale) for frame in gt])
    return lq, gt
