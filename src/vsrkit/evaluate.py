"""Score a model on a test set with the papers' protocol (BasicVSR, IconVSR, BasicVSR++).

The protocol (mmagic ``basicvsr_test_config.py``, BasicSR's test options, Table 2 of the papers):

* each clip is restored whole, in one forward pass (no segments, no tiles), under ``torch.no_grad()``
  with the model in eval mode;
* outputs are quantised to 8 bits (:func:`vsrkit.metrics.to_uint8`) before scoring;
* PSNR/SSIM per frame with ``crop_border=0``, on RGB for REDS4/REDSval4 and on BT.601 Y elsewhere;
  every frame counts, border frames included;
* the score of a dataset is the mean over clips of the per-clip means over frames;
* Vimeo-90K-T: the 7 LR frames are mirror-extended to 14 (``lq + lq[::-1]``), and the prediction of
  the centre frame ``im4`` is the mean of the two outputs for it, ``0.5 * (out[3] + out[10])``; only
  ``im4`` is scored;
* ``bicubic``, the papers' baseline, is MATLAB ``imresize(lq, 4)`` of the same LR.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from vsrkit.checks import NON_NEGATIVE_INT, POSITIVE_INT, optional
from vsrkit.data.datasets import DATASETS, Clip, list_clips, load_clip
from vsrkit.data.degradations import imresize
from vsrkit.errors import VsrkitError
from vsrkit.metrics import MetricAverager, psnr, ssim, to_uint8
from vsrkit.models.registry import Family

__all__ = [
    "BICUBIC_PAPER_SCORES",
    "default_space",
    "default_weights",
    "evaluate",
    "format_table",
    "published_scores",
]

SCALE = 4
_VIMEO = ("vimeo90k-t", "vimeo90k")
_RGB_DATASETS = ("reds4", "redsval4", "reds")
# Score-table column names of the registry (vsrkit.hub) for each test set.
_SCORE_NAMES = {"reds4": "REDS4", "vimeo90k-t": "Vimeo-90K-T", "vid4": "Vid4", "udm10": "UDM10"}

#: Table 2 of the BasicVSR/IconVSR paper, row "Bicubic" (PSNR, SSIM).
BICUBIC_PAPER_SCORES: dict[str, tuple[float, float]] = {
    "REDS4 BI": (26.14, 0.7292),
    "Vimeo-90K-T BI": (31.32, 0.8684),
    "Vid4 BI": (23.78, 0.6347),
    "UDM10 BD": (28.47, 0.8253),
    "Vimeo-90K-T BD": (31.30, 0.8687),
    "Vid4 BD": (21.80, 0.5246),
}


def default_space(dataset: str) -> str:
    """The papers' colour space for ``dataset``: RGB for REDS, Y for everything else."""
    return "rgb" if dataset.lower() in _RGB_DATASETS else "y"


def default_weights(arch: str, dataset: str, degradation: str) -> str:
    """The registered weights the papers test ``arch`` with on ``dataset``/``degradation``.

    BI on REDS: the REDS-trained model; other BI sets: the Vimeo-90K BI model; BD: the Vimeo-90K BD
    model (Table 2 of the papers). Chosen from the family's weights entries by their training
    data and degradation; among several (the same model in two layouts), the one with published
    scores, then the family's default, then the first listed.
    """
    family = _family(arch)
    deg = degradation.upper()
    training_data = "REDS" if deg == "BI" and dataset.lower() in _RGB_DATASETS else "Vimeo-90K"
    found = [
        e
        for e in family.weights
        if e.degradation == deg and e.training_data == training_data and e.scale == SCALE
    ]
    if not found:
        raise VsrkitError(
            f"{family.title} has no published weights trained on {training_data} {deg}; "
            "pass --weights"
        )
    found.sort(key=lambda e: (not e.scores, e.name != family.default_weights))
    return found[0].name


def _family(arch: str) -> Family:
    from .models import families, get_family

    try:
        return get_family(arch)
    except VsrkitError:
        raise VsrkitError(
            f"unknown model {arch!r}; choose bicubic or one of: {', '.join(families())}"
        ) from None


def _score_key(dataset: str, degradation: str, split: str) -> str | None:
    key = dataset.lower()
    if split == "test" and key == "reds":
        key = "reds4"
    elif split == "test" and key == "vimeo90k":
        key = "vimeo90k-t"
    name = _SCORE_NAMES.get(key) if split == "test" else None
    return f"{name} {degradation.upper()}" if name else None


def published_scores(
    model: str, weights: str | None, dataset: str, degradation: str, split: str = "test"
) -> dict[str, tuple[float, float | None]]:
    """Published (PSNR, SSIM) for this model on this test set: ``{"mmagic": ..., "paper": ...}``.

    ``mmagic`` is mmagic's test of its release of the checkpoint, ``paper`` the paper's Table 2; empty
    when nothing was published (unregistered weights, or a dataset outside the papers' tables).
    """
    key = _score_key(dataset, degradation, split)
    if key is None:
        return {}
    if model == "bicubic":
        return {"paper": BICUBIC_PAPER_SCORES[key]} if key in BICUBIC_PAPER_SCORES else {}
    if weights is None:
        return {}
    from vsrkit.hub import get_entry

    try:
        entry = get_entry(weights)
    except VsrkitError:
        return {}  # a file path, not a registered name
    found: dict[str, tuple[float, float | None]] = {}
    if key in entry.scores:
        found["mmagic"] = entry.scores[key]
    if key in entry.paper_scores:
        found["paper"] = entry.paper_scores[key]
    return found


def _resolve_device(device: str | torch.device) -> torch.device:
    from .engine import resolve_device

    return resolve_device(device)


def _build_model(
    model: str | nn.Module, weights: str | None, dataset: str, degradation: str, config: dict[str, Any]
) -> tuple[str, nn.Module | None, str | None]:
    """(name, module or None for bicubic, weights actually used)."""
    if isinstance(model, nn.Module):
        return str(getattr(model, "arch", type(model).__name__)), model, weights
    name = str(model).lower()
    if name == "bicubic":
        if weights is not None or config:
            raise VsrkitError("the bicubic baseline takes no weights and no model options")
        return name, None, None
    name = _family(name).name
    weights = weights or default_weights(name, dataset, degradation)
    from vsrkit import create_model

    try:
        module = create_model(name, checkpoint=weights, **config)
    except (ValueError, TypeError) as exc:
        # The model constructors check their options with ValueError/TypeError.
        raise VsrkitError(f"cannot build {name} with {config}: {exc}") from None
    return name, module, weights


def _forward(module: nn.Module, lq: np.ndarray, device: torch.device, clip: str) -> torch.Tensor:
    """Run the whole clip (T, h, w, 3) uint8 through the model: (T, 3, 4h, 4w) float on the CPU."""
    x = torch.from_numpy(lq).to(device).permute(0, 3, 1, 2).float().div_(255.0).unsqueeze(0)
    try:
        with torch.no_grad():
            out = module(x)
    except ValueError as exc:  # the models' own input checks (e.g. IconVSR's minimum length)
        raise VsrkitError(f"clip {clip!r}: {exc}") from None
    t, _, h, w = x.shape[1:]
    expected = (1, t, 3, SCALE * h, SCALE * w)
    if tuple(out.shape) != expected:
        raise VsrkitError(f"clip {clip!r}: model output has shape {tuple(out.shape)}, expected {expected}")
    return out[0].float().cpu()


def _predict(
    module: nn.Module | None, lq: np.ndarray, device: torch.device, clip: str, vimeo: bool
) -> list[np.ndarray]:
    """uint8 (H, W, 3) predictions: every frame, or the centre frame only for Vimeo-90K."""
    t = len(lq)
    centre = t // 2
    if module is None:  # bicubic; mirroring cannot change a per-frame upscale
        frames = [lq[centre]] if vimeo else list(lq)
        return [imresize(f, SCALE) for f in frames]
    if vimeo:
        # Mirror-extend (mmagic MirrorSequence): frame `centre` is seen at index centre and 2t-1-centre.
        out = _forward(module, np.concatenate([lq, lq[::-1]]), device, clip)
        return [to_uint8(0.5 * (out[centre] + out[2 * t - 1 - centre]))]
    out = _forward(module, lq, device, clip)
    return [to_uint8(out[i]) for i in range(t)]


def _frames_to_score(clip: Clip, vimeo: bool, max_frames: int | None) -> int | None:
    if vimeo:
        return 1
    n = clip.num_frames
    if n is None:
        return None
    return min(n, max_frames) if max_frames else n


def _score(
    clip_list: list[Clip],
    module: nn.Module | None,
    dev: torch.device,
    desc: str,
    deg: str,
    vimeo: bool,
    max_frames: int | None,
    crop_border: int,
    space: str,
    progress: bool,
) -> tuple[MetricAverager, MetricAverager, dict[str, int]]:
    """Per-frame PSNR and SSIM of every clip, and the number of frames scored per clip."""
    from tqdm import tqdm

    psnrs, ssims = MetricAverager(), MetricAverager()
    frames: dict[str, int] = {}
    counts = [_frames_to_score(c, vimeo, max_frames) for c in clip_list]
    total = None if any(n is None for n in counts) else sum(n for n in counts if n is not None)
    bar = tqdm(total=total, unit="frame", desc=desc, file=sys.stderr, disable=not progress, leave=False)
    with bar:
        for clip in clip_list:
            if not clip.has_gt:
                raise VsrkitError(f"clip {clip.name!r} has no ground truth to score against")
            bar.set_postfix_str(clip.name)
            lq, gt = load_clip(clip, degradation=deg, scale=SCALE, max_frames=None if vimeo else max_frames)
            assert gt is not None
            preds = _predict(module, lq, dev, clip.name, vimeo)
            targets = [gt[len(gt) // 2]] if vimeo else list(gt)
            for pred, target in zip(preds, targets, strict=True):
                psnrs.add(clip.name, psnr(pred, target, crop_border=crop_border, space=space))
                ssims.add(clip.name, ssim(pred, target, crop_border=crop_border, space=space))
                frames[clip.name] = frames.get(clip.name, 0) + 1
                bar.update(1)
    return psnrs, ssims, frames


def evaluate(
    model: str | nn.Module,
    *,
    weights: str | None = None,
    dataset: str,
    root: str | os.PathLike[str],
    degradation: str = "bi",
    split: str = "test",
    clips: list[str] | None = None,
    space: str | None = None,
    crop_border: int = 0,
    device: str | torch.device | None = None,
    max_frames: int | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``dataset`` (see the module docstring for the protocol).

    ``model`` is ``"bicubic"``, an architecture (a family of ``vsrkit.models.families()``)
    built with ``weights`` (a registered name or a file; default: :func:`default_weights`) and the
    model options ``config``, or a ready ``nn.Module`` mapping (N, T, 3, h, w) to (N, T, 3, 4h, 4w).
    ``space`` defaults to :func:`default_space`; ``max_frames`` scores the first frames of each clip
    only (not for Vimeo-90K, whose clips are 7 frames). ``progress`` draws a tqdm bar on stderr.
    ``device``: ``"cpu"``, ``"cuda"`` or ``"auto"``; by default the CPU, or for a ready module the
    device it is on. A ready module is put in eval mode for the run and given back in its own mode.

    Returns ``{"model", "dataset", "clips": {name: {"psnr", "ssim", "frames"}}, "mean": {"psnr",
    "ssim"}}`` plus ``weights``, ``degradation``, ``space``, ``split``, ``crop_border``,
    ``max_frames``, ``full_protocol`` (whether the numbers are comparable with published ones) and,
    where such numbers exist, ``published`` (``{"mmagic"|"paper": [psnr, ssim]}``).
    """
    key = str(dataset).lower()
    if key not in DATASETS:
        raise VsrkitError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    deg = str(degradation).lower()
    space = (space or default_space(key)).lower()
    if space not in ("y", "rgb"):
        raise VsrkitError(f"unknown colour space {space!r}: expected 'y' or 'rgb'")
    crop_border = NON_NEGATIVE_INT(crop_border, "crop_border")
    max_frames = optional(POSITIVE_INT)(max_frames, "max_frames")
    config = dict(config or {})
    if isinstance(model, str) and model.lower() != "bicubic":
        from vsrkit.models import model_config

        model_config(_family(model).name, **config)  # a bad option fails before any data is read
    vimeo = key in _VIMEO

    # List the clips first: a wrong root or clip name should fail before loading weights.
    clip_list = list_clips(key, root, split=split, degradation=deg, clips=clips)
    name, module, used_weights = _build_model(model, weights, key, deg, config)
    if device is None and module is not None and isinstance(model, nn.Module):
        # A caller's module (e.g. during training) is scored where it is, not moved.
        param = next(module.parameters(), None)
        dev = param.device if param is not None else torch.device("cpu")
    else:
        dev = _resolve_device(device or "cpu")
    was_training = module.training if module is not None else False
    if module is not None:
        module = module.to(dev).eval()
    try:
        psnrs, ssims, frames = _score(
            clip_list, module, dev, f"{name} on {key}", deg, vimeo, max_frames, crop_border, space, progress
        )
    finally:
        if module is not None and was_training:
            module.train()

    clip_psnr, clip_ssim = psnrs.clip_means(), ssims.clip_means()
    full = clips is None and max_frames is None and crop_border == 0 and space == default_space(key)
    full = full and not config and split == "test"
    result: dict[str, Any] = {
        "model": name,
        "dataset": key,
        "clips": {c: {"psnr": clip_psnr[c], "ssim": clip_ssim[c], "frames": frames[c]} for c in clip_psnr},
        "mean": {"psnr": psnrs.mean(), "ssim": ssims.mean()},
        "weights": None if used_weights is None else str(used_weights),
        "degradation": deg,
        "space": space,
        "split": split,
        "crop_border": crop_border,
        "max_frames": max_frames,
        "full_protocol": full,
    }
    published = published_scores(name, result["weights"], key, deg, split)
    if published:
        result["published"] = {src: list(v) for src, v in published.items()}
    return result


def _fmt(psnr_value: float, ssim_value: float | None, psnr_digits: int = 4) -> str:
    p = "inf" if math.isinf(psnr_value) else f"{psnr_value:.{psnr_digits}f}"
    s = "-" if ssim_value is None else f"{ssim_value:.4f}"
    return f"{p}/{s}"


def format_table(result: dict[str, Any]) -> str:
    """The result as the papers print it: ``PSNR/SSIM`` per clip and the mean over clips.

    Published numbers for the same model and test set follow the mean, with the difference in dB.
    """
    header = (
        f"model {result['model']}, weights {result.get('weights') or '-'}, dataset {result['dataset']}"
        f" ({result.get('split', 'test')}), degradation {str(result.get('degradation', '?')).upper()}, "
        f"space {str(result.get('space', '?')).upper()}, crop_border {result.get('crop_border', 0)}"
    )
    if result.get("max_frames"):
        header += f", first {result['max_frames']} frames"
    published = result.get("published", {})
    labels = {source: f"{source} (published)" for source in published}
    width = max(12, *(len(n) for n in [*result["clips"], *labels.values()])) + 2
    lines = [header, f"{'clip':<{width}}{'frames':>7}  PSNR/SSIM"]
    total = 0
    for clip, row in result["clips"].items():
        total += row["frames"]
        lines.append(f"{clip:<{width}}{row['frames']:>7}  {_fmt(row['psnr'], row['ssim'])}")
    mean = result["mean"]
    lines.append(f"{'mean':<{width}}{total:>7}  {_fmt(mean['psnr'], mean['ssim'])}")
    for source, (p, s) in published.items():
        digits = 4 if source == "mmagic" else 2  # as each source prints them
        note = f"  (ours {mean['psnr'] - p:+.4f} dB)" if math.isfinite(mean["psnr"]) else ""
        lines.append(f"{labels[source]:<{width}}{'':>7}  {_fmt(p, s, digits)}{note}")
    if published and not result.get("full_protocol", True):
        lines.append("(published numbers are for the full test set with the default protocol)")
    return "\n".join(lines)
