"""PSNR and SSIM exactly as the BasicVSR / IconVSR / BasicVSR++ papers compute them.

The conventions (those of BasicSR's ``calculate_psnr`` / ``calculate_ssim`` and mmagic's metrics):

* Images are compared as 8-bit RGB. Float outputs in [0, 1] are first quantised the way the
  references' ``tensor2img`` does: clip to [0, 1], multiply by 255, round half to even.
* ``space='y'`` scores the BT.601 luma ``16 + (65.481 R + 128.553 G + 24.966 B) / 255`` of the 8-bit
  values, unrounded, on the [0, 255] scale; ``space='rgb'`` scores all three channels.
* ``crop_border`` pixels are dropped on every side first (0 in the papers).
* PSNR uses a peak of 255 over the whole image (all channels pooled); identical images give ``inf``.
* SSIM is Wang et al.'s: 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, only
  where the window fits entirely inside the image ('valid'), averaged over the map, then over
  channels.
* A data set's score is the mean over clips of each clip's mean over frames (:class:`MetricAverager`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from vsrkit.errors import VsrkitError

__all__ = ["rgb_to_y", "to_uint8", "psnr", "ssim", "MetricAverager"]

# BT.601 luma weights for RGB in [0, 1], giving Y in [16, 235].
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def rgb_to_y(img: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """BT.601 luma on the [0, 255] scale: ``16 + 65.481 R + 128.553 G + 24.966 B`` for RGB in [0, 1].

    Accepts a numpy array with RGB last, (..., 3), either uint8 (0..255) or float (0..1), and
    returns float64 of shape (...). A torch float tensor in [0, 1] with channels third from last,
    (..., 3, H, W), gives a tensor (..., H, W) of its own dtype. Values are not rounded, as in the
    references' ``rgb2ycbcr(y_only=True)`` used for scoring.
    """
    if isinstance(img, torch.Tensor):
        if img.ndim < 3 or img.shape[-3] != 3:
            raise VsrkitError(f"expected an RGB tensor (..., 3, H, W), got shape {tuple(img.shape)}")
        r, g, b = img.unbind(-3)
        return _Y_OFFSET + _Y_WEIGHTS[0] * r + _Y_WEIGHTS[1] * g + _Y_WEIGHTS[2] * b
    arr = np.asarray(img)
    if arr.ndim < 1 or arr.shape[-1] != 3:
        raise VsrkitError(f"expected an RGB array (..., 3), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        # Scale after the weighted sum: one division, so integer inputs give the exact value.
        rgb = arr.astype(np.float64)
        return _Y_OFFSET + (rgb @ np.asarray(_Y_WEIGHTS)) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise VsrkitError(f"expected a uint8 or float RGB array, got dtype {arr.dtype}")
    return _Y_OFFSET + arr.astype(np.float64) @ np.asarray(_Y_WEIGHTS)


def to_uint8(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """Return an image as uint8 (H, W, C), quantising float [0, 1] input as the references do.

    Accepts numpy uint8 or float (H, W) / (H, W, C), or a torch tensor (C, H, W), (1, C, H, W) or
    (H, W). Floats are clipped to [0, 1], scaled by 255 and rounded half to even, in float32 for
    tensors (like BasicSR's and mmagic's ``tensor2img``) and in the array's own precision for numpy.
    """
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        elif t.ndim != 2:
            raise VsrkitError(f"expected a tensor (C, H, W), (1, C, H, W) or (H, W), got {tuple(img.shape)}")
        if t.dtype == torch.uint8:
            arr = t.numpy()
        elif t.dtype.is_floating_point:
            arr = t.float().clamp(0, 1).numpy()
        else:
            raise VsrkitError(f"expected a float or uint8 tensor, got {t.dtype}")
    elif isinstance(img, np.ndarray):
        arr = img
    else:
        raise VsrkitError(f"expected a numpy array or a torch tensor, got {type(img).__name__}")

    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise VsrkitError(f"expected an image (H, W) or (H, W, C), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise VsrkitError(f"expected a uint8 or float image, got dtype {arr.dtype}")
    return np.round(np.clip(arr, 0, 1) * 255.0).astype(np.uint8)


def _prepare(
    pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, crop_border: int, space: str
) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 (H, W, C) in [0, 255], cropped and converted to the scored space."""
    if space not in ("y", "rgb"):
        raise VsrkitError(f"unknown colour space {space!r}: expected 'y' or 'rgb'")
    if crop_border < 0:
        raise VsrkitError(f"crop_border must be >= 0, got {crop_border}")
    a, b = to_uint8(pred), to_uint8(gt)
    if a.shape != b.shape:
        raise VsrkitError(f"images differ in shape: {a.shape} vs {b.shape}")
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if a.size == 0:
        raise VsrkitError(f"crop_border {crop_border} leaves nothing of a {a.shape} image")
    if space == "y" and a.shape[2] == 3:
        # Single-channel images are taken as luma already, as the references do.
        return rgb_to_y(a)[..., None], rgb_to_y(b)[..., None]
    return a.astype(np.float64), b.astype(np.float64)


def psnr(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    crop_border: int = 0,
    space: str = "y",
) -> float:
    """PSNR in dB with peak 255; see the module docstring for the conventions."""
    a, b = _prepare(pred, gt, crop_border, space)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return float("inf")
    return 10.0 * math.log10(255.0 * 255.0 / mse)


_SSIM_SIZE = 11
_SSIM_SIGMA = 1.5


def _gaussian_window() -> np.ndarray:
    x = np.arange(_SSIM_SIZE, dtype=np.float64) - (_SSIM_SIZE - 1) / 2
    g = np.exp(-(x * x) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable correlation of (N, H, W, C) maps over H and W, 'valid' region only."""
    k = g.size
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = g[0] * x[:, :h]
    for i in range(1, k):
        rows += g[i] * x[:, i : i + h]
    out = g[0] * rows[:, :, :w]
    for i in range(1, k):
        out += g[i] * rows[:, :, i : i + w]
    return out


# Output rows per block: keeps the five moment maps of a block in cache (2.5x faster at 720p).
_SSIM_BLOCK_ROWS = 16


def ssim(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    crop_border: int = 0,
    space: str = "y",
) -> float:
    """SSIM (Wang et al. 2004) averaged over the 'valid' map and then over channels.

    See the module docstring for the conventions. Needs at least 11x11 pixels after cropping.
    """
    a, b = _prepare(pred, gt, crop_border, space)
    k = _SSIM_SIZE
    if a.shape[0] < k or a.shape[1] < k:
        raise VsrkitError(f"SSIM needs at least {k}x{k} pixels, got {a.shape[:2]}")
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    g = _gaussian_window()
    out_h = a.shape[0] - k + 1
    total = np.zeros(a.shape[2])
    for r0 in range(0, out_h, _SSIM_BLOCK_ROWS):
        r1 = min(out_h, r0 + _SSIM_BLOCK_ROWS)
        ab, bb = a[r0 : r1 + k - 1], b[r0 : r1 + k - 1]
        moments = _filter_valid(np.stack([ab, bb, ab * ab, bb * bb, ab * bb]), g)
        mu_a, mu_b, e_aa, e_bb, e_ab = moments
        mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
        # Variances as E[x^2] - E[x]^2, like the references (not the two-pass form).
        var_a, var_b, cov = e_aa - mu_aa, e_bb - mu_bb, e_ab - mu_ab
        ssim_map = ((2 * mu_ab + c1) * (2 * cov + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2))
        total += ssim_map.sum(axis=(0, 1))
    per_channel = total / (out_h * (a.shape[1] - k + 1))
    return float(per_channel.mean())


class MetricAverager:
    """Per-frame values grouped by clip; the data-set score is the mean of the per-clip means.

    This is how the papers average (and BasicSR and mmagic): a long clip counts as much as a short
    one. Clips keep the order in which they were first seen.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[float]] = {}

    def add(self, clip: str, value: float) -> None:
        """Record one frame's value for ``clip``."""
        self._values.setdefault(clip, []).append(float(value))

    def extend(self, clip: str, values: Iterable[float]) -> None:
        """Record several frames' values for ``clip``."""
        self._values.setdefault(clip, []).extend(float(v) for v in values)

    @property
    def num_frames(self) -> int:
        """Number of frame values recorded over all clips."""
        return sum(len(v) for v in self._values.values())

    def clip_means(self) -> dict[str, float]:
        """Mean over frames of each clip."""
        return {clip: math.fsum(v) / len(v) for clip, v in self._values.items()}

    def mean(self) -> float:
        """Mean over clips of the per-clip means."""
        means = self.clip_means()
        if not means:
            raise VsrkitError("no metric values were recorded")
        return math.fsum(means.values()) / len(means)
