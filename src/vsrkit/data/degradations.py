"""The BI and BD degradations of the BasicVSR / IconVSR / BasicVSR++ papers, reimplemented exactly.

* **BI**: MATLAB ``imresize(I, 1/4)`` (bicubic, antialiased). :func:`imresize` follows MATLAB's
  ``contributions`` step by step: cubic kernel with a = -0.5, the kernel stretched by ``1/scale``
  on downscaling, MATLAB's output-to-input coordinate mapping, and out-of-range taps folded back
  by symmetric (mirror-with-edge) indexing.
* **BD**: the authors' ``BD_degradation.m``: ``imfilter(I, fspecial('gaussian', 12, 1.6),
  'replicate')`` followed by ``I(2:4:end-2, 2:4:end-2, :)`` (1-based).

Both are separable linear maps, one per image axis. Each axis map is stored as taps (a weight and a
source index per output pixel and tap); numpy images are filtered tap by tap in float64 (MATLAB
computes in double), torch tensors as two matmuls with the dense form of the same maps.

Accepted inputs: numpy ``uint8`` or floating arrays of shape (H, W) or (H, W, C), and torch
tensors of shape (..., H, W) (typically (..., C, H, W), batched). ``uint8`` in gives ``uint8`` out,
rounded half away from zero and saturated as MATLAB casts double to uint8; floating input stays
floating and unrounded.
"""

from __future__ import annotations

import functools
import math
from typing import TypeVar

import numpy as np
import torch

from vsrkit.errors import VsrkitError

__all__ = ["imresize", "bi_degrade", "bd_degrade", "degrade", "gaussian_kernel"]

Image = TypeVar("Image", np.ndarray, torch.Tensor)

# One axis of a separable map: weights (out, taps) float64 and source indices (out, taps) int64.
_AxisTaps = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- axis maps


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, the kernel of MATLAB's 'bicubic'."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def _mirror(indices: np.ndarray, length: int) -> np.ndarray:
    """Fold 0-based indices into [0, length) by symmetric padding (edge sample repeated).

    Same as MATLAB's ``aux = [1:n, n:-1:1]; aux(mod(ind-1, 2n) + 1)``, which also handles taps that
    reach past more than one reflection (tiny inputs).
    """
    period = np.concatenate([np.arange(length), np.arange(length - 1, -1, -1)])
    return period[np.mod(indices, 2 * length)]


@functools.lru_cache(maxsize=128)
def _resize_taps(in_len: int, out_len: int, scale: float, antialias: bool) -> _AxisTaps:
    """MATLAB imresize's ``contributions`` for the bicubic kernel (width 4)."""
    width = 4.0
    stretch = scale < 1 and antialias
    if stretch:
        # Antialiasing: widen the kernel by 1/scale so it low-passes at the output's Nyquist rate.
        width = width / scale
    x = np.arange(1, out_len + 1, dtype=np.float64)  # 1-based output coordinates, as in MATLAB
    # Maps output pixel centres to input coordinates so that the two images' outer edges coincide.
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = math.ceil(width) + 2  # one spare tap either side; their weights come out zero
    ind = left[:, None] + np.arange(taps)[None, :]  # 1-based input indices
    dist = u[:, None] - ind
    weights = scale * _cubic(scale * dist) if stretch else _cubic(dist)
    weights = weights / weights.sum(axis=1, keepdims=True)
    # MATLAB drops all-zero tap columns; keeping them changes nothing (0 * finite = 0).
    return weights, _mirror(ind.astype(np.int64) - 1, in_len)


def gaussian_kernel(sigma: float = 1.6, size: int | None = None) -> np.ndarray:
    """The 1-D factor of MATLAB's ``fspecial('gaussian', size, sigma)``, normalised to sum 1.

    ``size`` defaults to ``BD_degradation.m``'s ``ceil(3 * sigma) * 2 + 2`` (12 for sigma 1.6). The 2-D
    kernel is the outer product of this vector with itself. (fspecial also zeroes taps below
    ``eps * max``; that only happens for sigma <= 0.25, on taps whose effect is below double
    precision, so it is left out.)
    """
    if sigma <= 0:
        raise VsrkitError(f"BD blur sigma must be positive, got {sigma}")
    if size is None:
        size = math.ceil(3 * sigma) * 2 + 2
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


@functools.lru_cache(maxsize=128)
def _bd_taps(in_len: int, scale: int, sigma: float) -> _AxisTaps:
    """Gaussian correlation with replicate padding, evaluated only at the kept samples.

    MATLAB's imfilter correlates (no kernel flip) and anchors a kernel of size k at 1-based tap
    ``c = floor((k + 1) / 2)``: output(i) = sum_j h(j) * in(i + j - c), j = 1..k. So it pads
    ``c - 1`` samples before and ``k - c`` after: 5 and 6 for k = 12. For even k the filtered
    image is thus centred half a pixel down/right of each input pixel.

    ``lq(scale/2 : scale : end - scale/2)`` keeps 1-based samples scale/2, scale/2 + scale, ...,
    i.e. 0-based rows 1, 5, 9, ... for scale 4. With the half-pixel offset, sample 1 is centred at
    1.5, the centre of input block 0..3: the blur+subsample is aligned with the HR grid.
    """
    g = gaussian_kernel(sigma)
    k = g.size
    anchor = (k + 1) // 2  # 1-based, MATLAB's centre
    half = scale // 2
    kept = np.arange(half - 1, in_len - half, scale)  # 0-based form of scale/2 : scale : end-scale/2
    src = kept[:, None] + np.arange(k)[None, :] - (anchor - 1)
    src = np.clip(src, 0, in_len - 1)  # 'replicate' padding
    weights = np.broadcast_to(g, src.shape)
    return weights, src


def _dense(taps: _AxisTaps, in_len: int) -> np.ndarray:
    """(out, in) matrix of an axis map; taps that fold onto the same source pixel are summed."""
    weights, src = taps
    mat = np.zeros((weights.shape[0], in_len), dtype=np.float64)
    rows = np.broadcast_to(np.arange(weights.shape[0])[:, None], src.shape)
    np.add.at(mat, (rows, src), weights)
    return mat


# --------------------------------------------------------------------------- applying them


def _quantise(x: np.ndarray) -> np.ndarray:
    """MATLAB's double -> uint8 cast: saturate, round half away from zero (values are >= 0 here)."""
    return np.floor(np.clip(x, 0.0, 255.0) + 0.5)


def _apply_axis(img: np.ndarray, taps: _AxisTaps, axis: int) -> np.ndarray:
    """out[i] = sum_t w[i, t] * img[src[i, t]] along ``axis`` (0 or 1), one tap at a time."""
    weights, src = taps
    out = None
    for t in range(weights.shape[1]):
        w = weights[:, t]
        picked = np.take(img, src[:, t], axis=axis)
        w = (
            w.reshape((-1,) + (1,) * (img.ndim - 1))
            if axis == 0
            else w.reshape((1, -1) + (1,) * (img.ndim - 2))
        )
        term = picked * w
        out = term if out is None else out + term
    assert out is not None
    return out


def _apply_numpy(img: np.ndarray, taps_h: _AxisTaps, taps_w: _AxisTaps, round_between: bool) -> np.ndarray:
    if img.dtype == np.uint8:
        out = _apply_axis(img.astype(np.float64), taps_h, 0)
        if round_between:
            out = _quantise(out)
        return _quantise(_apply_axis(out, taps_w, 1)).astype(np.uint8)
    out = _apply_axis(img.astype(np.float64, copy=False), taps_h, 0)
    return _apply_axis(out, taps_w, 1).astype(img.dtype, copy=False)


def _apply_torch(
    img: torch.Tensor, mat_h: np.ndarray, mat_w: np.ndarray, round_between: bool
) -> torch.Tensor:
    if img.dtype == torch.uint8:
        work = torch.float64  # exact integers in, same rounding as the numpy path
    elif img.dtype == torch.float64:
        work = torch.float64
    else:
        work = torch.float32  # half/bfloat16 are upcast: the weights need more than 8 bits
    x = img.to(work)
    mh = torch.as_tensor(mat_h, dtype=work, device=img.device)
    mw = torch.as_tensor(mat_w, dtype=work, device=img.device)
    x = torch.matmul(mh, x)  # (out_h, H) @ (..., H, W): along H first, as MATLAB does for equal scales
    if img.dtype == torch.uint8:
        if round_between:
            x = torch.floor(x.clamp(0, 255) + 0.5)
        x = torch.matmul(x, mw.T)
        return torch.floor(x.clamp(0, 255) + 0.5).to(torch.uint8)
    return torch.matmul(x, mw.T).to(img.dtype)


def _hw(img: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """Validate the input and return its (H, W)."""
    if isinstance(img, torch.Tensor):
        if img.ndim < 2:
            raise VsrkitError(f"expected a tensor of shape (..., H, W), got shape {tuple(img.shape)}")
        if not (img.dtype.is_floating_point or img.dtype == torch.uint8):
            raise VsrkitError(f"expected a floating or uint8 tensor, got {img.dtype}")
        return int(img.shape[-2]), int(img.shape[-1])
    if isinstance(img, np.ndarray):
        if img.ndim not in (2, 3):
            raise VsrkitError(f"expected an image of shape (H, W) or (H, W, C), got shape {img.shape}")
        if not (img.dtype == np.uint8 or np.issubdtype(img.dtype, np.floating)):
            raise VsrkitError(f"expected a uint8 or floating image, got dtype {img.dtype}")
        return int(img.shape[0]), int(img.shape[1])
    raise VsrkitError(f"expected a numpy array or a torch tensor, got {type(img).__name__}")


def _apply(
    img: Image, taps_h: _AxisTaps, taps_w: _AxisTaps, in_hw: tuple[int, int], round_between: bool
) -> Image:
    if isinstance(img, torch.Tensor):
        return _apply_torch(img, _dense(taps_h, in_hw[0]), _dense(taps_w, in_hw[1]), round_between)
    return _apply_numpy(img, taps_h, taps_w, round_between)


# --------------------------------------------------------------------------- public API


def imresize(img: Image, scale: float, antialias: bool = True) -> Image:
    """MATLAB ``imresize(img, scale)`` with the bicubic kernel (antialiased when downscaling).

    The output size is ``ceil(scale * H) x ceil(scale * W)``, like MATLAB. Height is resized first,
    then width (MATLAB's order when both scales are equal). For uint8 input MATLAB keeps the uint8
    class between the two passes, so the intermediate image is rounded too; this is reproduced,
    since the papers' LR data were made from uint8 frames.
    """
    if not scale > 0 or not math.isfinite(scale):
        raise VsrkitError(f"resize scale must be a positive number, got {scale}")
    h, w = _hw(img)
    out_h, out_w = math.ceil(h * scale), math.ceil(w * scale)
    taps_h = _resize_taps(h, out_h, float(scale), bool(antialias))
    taps_w = _resize_taps(w, out_w, float(scale), bool(antialias))
    return _apply(img, taps_h, taps_w, (h, w), round_between=True)


def bi_degrade(img: Image, scale: int = 4) -> Image:
    """BI degradation: MATLAB bicubic downscaling ``imresize(img, 1/scale)``."""
    return imresize(img, 1.0 / scale)


def bd_degrade(img: Image, scale: int = 4, sigma: float = 1.6) -> Image:
    """BD degradation of ``BD_degradation.m``: Gaussian blur (replicate borders), then subsample.

    Output size: ``floor(H / scale) x floor(W / scale)``. uint8 input is rounded once, after
    filtering, as MATLAB's imfilter on uint8 does; the subsampling only selects pixels.
    """
    if int(scale) != scale or scale < 2 or scale % 2:
        # scale/2 must be a whole 1-based index for MATLAB's `lq(scale/2:scale:end-scale/2)`.
        raise VsrkitError(f"BD degradation needs an even integer scale, got {scale}")
    scale = int(scale)
    h, w = _hw(img)
    if h < scale or w < scale:
        raise VsrkitError(f"image of {h}x{w} is too small for x{scale} BD degradation")
    taps_h = _bd_taps(h, scale, float(sigma))
    taps_w = _bd_taps(w, scale, float(sigma))
    return _apply(img, taps_h, taps_w, (h, w), round_between=False)


def degrade(img: Image, kind: str, scale: int = 4) -> Image:
    """Apply the named paper degradation: ``'bi'`` (bicubic) or ``'bd'`` (blur + subsample)."""
    key = kind.lower() if isinstance(kind, str) else kind
    if key == "bi":
        return bi_degrade(img, scale)
    if key == "bd":
        return bd_degrade(img, scale)
    raise VsrkitError(f"unknown degradation {kind!r}: expected 'bi' or 'bd'")
