"""BI / BD degradations against BasicSR 1.4.2's MATLAB port and a direct MATLAB-semantics reference.

Run with ``pytest -s`` to see the compared figures.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from reference_oracle import load_basicsr_file
from vsrkit.data.degradations import bd_degrade, bi_degrade, degrade, gaussian_kernel, imresize
from vsrkit.errors import VsrkitError

# Same location rule as conftest.py (kept here so the file stands alone).
DATA = Path(os.environ.get("VSRKIT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"


# --------------------------------------------------------------------------- oracle and data


@pytest.fixture(scope="module")
def bsr() -> ModuleType:
    """basicsr/utils/matlab_functions.py (imports only math, numpy and torch)."""
    return load_basicsr_file("utils/matlab_functions.py")


def _frame(rel: str) -> np.ndarray:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    return np.array(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def hr() -> np.ndarray:
    """A crop of a real 720p frame with texture and edges (the baseball player)."""
    return _frame("toflow_hr_baseball/01.png")[200:392, 480:736].copy()  # 192 x 256


@pytest.fixture(scope="module")
def lr() -> np.ndarray:
    """A crop of a real REDS low-resolution frame."""
    return _frame("reds_lr_000/00000000.png")[40:88, 100:164].copy()  # 48 x 64


def _matlab_round(x: np.ndarray) -> np.ndarray:
    """MATLAB's double -> uint8: saturate, then round half away from zero."""
    return np.floor(np.clip(x, 0, 255) + 0.5)


def _bsr_axis_pass(
    bsr: ModuleType, img: np.ndarray, axis: int, scale: float, abs_weights: bool = False
) -> np.ndarray:
    """Resize along one axis in float64 with BasicSR's MATLAB weights and symmetric padding."""
    n = img.shape[axis]
    weights, indices, sym_start, sym_end = bsr.calculate_weights_indices(
        n, math.ceil(n * scale), scale, "cubic", 4, True
    )
    weights = weights.double().numpy()
    if abs_weights:
        weights = np.abs(weights)
    first = indices[:, 0].long().numpy()  # index of each output's first tap in the padded signal
    padding = [(0, 0)] * img.ndim
    padding[axis] = (sym_start, sym_end)
    padded = np.moveaxis(np.pad(img, padding, mode="symmetric"), axis, 0)
    taps = weights.shape[1]
    out = np.stack(
        [np.tensordot(w, padded[f : f + taps], axes=1) for w, f in zip(weights, first, strict=True)]
    )
    return np.moveaxis(out, 0, axis)


# --------------------------------------------------------------------------- imresize (BI)


@pytest.mark.parametrize("scale", [1 / 4, 1 / 3, 1 / 2, 2, 4])
def test_imresize_float_matches_basicsr(
    bsr: ModuleType, hr: np.ndarray, lr: np.ndarray, scale: float
) -> None:
    img = (hr if scale < 1 else lr).astype(np.float64) / 255.0
    ours = imresize(img, scale)
    ref = bsr.imresize(img, scale)  # float32 inside
    assert ours.shape == ref.shape == (math.ceil(img.shape[0] * scale), math.ceil(img.shape[1] * scale), 3)
    diff = np.abs(ours - ref).max()
    print(f"imresize x{scale:.4g} float vs basicsr: max|diff| = {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parametrize("scale", [1 / 4, 1 / 3, 4])
def test_imresize_uint8_matches_matlab_two_pass(
    bsr: ModuleType, hr: np.ndarray, lr: np.ndarray, scale: float
) -> None:
    """uint8 follows MATLAB: imresizemex keeps the input class, so the H pass is rounded to uint8
    before the W pass. The oracle does exactly that with BasicSR's weights, in float64."""
    img = hr if scale < 1 else lr
    ours = imresize(img, scale)
    assert ours.dtype == np.uint8
    mid = _matlab_round(_bsr_axis_pass(bsr, img.astype(np.float64), 0, scale))
    ref = _matlab_round(_bsr_axis_pass(bsr, mid, 1, scale))
    n_diff = int((ours != ref).sum())
    print(f"imresize x{scale:.4g} uint8 vs two-pass oracle: {n_diff} of {ref.size} values differ")
    assert n_diff == 0


@pytest.mark.parametrize("scale", [1 / 4, 4])
def test_imresize_uint8_vs_basicsr_rounded_once(
    bsr: ModuleType, hr: np.ndarray, lr: np.ndarray, scale: float
) -> None:
    """BasicSR works in float32 and rounds once, at the end. Against it the MATLAB two-pass uint8
    result is off by 1 LSB where the intermediate rounding tips the final one, and by more only
    where the first pass overshot [0, 255] and MATLAB saturated it (bicubic ringing at clipped
    highlights when upscaling). Our float64 path rounded once agrees with BasicSR."""
    img = hr if scale < 1 else lr
    ref = _matlab_round(bsr.imresize(img.astype(np.float64), scale))
    two_pass = imresize(img, scale).astype(np.int64)
    one_pass = _matlab_round(imresize(img.astype(np.float64), scale))
    d_two = np.abs(two_pass - ref)
    d_one = np.abs(one_pass - ref)
    # Outputs whose second-pass taps read a saturated first-pass value.
    mid = _bsr_axis_pass(bsr, img.astype(np.float64), 0, scale)
    saturated = ((mid < 0) | (mid > 255)).astype(np.float64)
    touched = _bsr_axis_pass(bsr, saturated, 1, scale, abs_weights=True) > 0
    print(
        f"imresize x{scale:.4g} uint8 vs round(basicsr): {(d_two > 0).mean():.2%} differ, max "
        f"{d_two.max():.0f} LSB, max {d_two[~touched].max():.0f} LSB away from the {touched.sum()} outputs "
        f"fed by saturated intermediates; float64 path rounded once: {int((d_one > 0).sum())} of "
        f"{ref.size} differ"
    )
    assert d_two[~touched].max() <= 1
    # Rounding once from float64 vs float32 can only disagree on values within ~1e-4 of a .5 tie.
    assert (d_one > 0).mean() < 1e-3 and d_one.max() <= 1


def test_imresize_full_frame_shapes() -> None:
    frame = _frame("toflow_hr_baseball/01.png")
    lr = bi_degrade(frame)
    assert lr.shape == (180, 320, 3) and lr.dtype == np.uint8
    assert imresize(frame[:, :, 0], 0.25).shape == (180, 320)  # (H, W) input stays 2-D
    assert imresize(np.zeros((7, 9), np.float32), 1 / 3).shape == (3, 3)  # ceil, like MATLAB


# --------------------------------------------------------------------------- BD


def _fspecial_gaussian(size: int, sigma: float) -> np.ndarray:
    """MATLAB fspecial('gaussian', size, sigma), written out in 2-D as MATLAB defines it."""
    half = (size - 1) / 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(np.float64).eps * h.max()] = 0
    return h / h.sum()


def _bd_reference(img: np.ndarray, scale: int = 4, sigma: float = 1.6) -> np.ndarray:
    """BD_degradation.m step by step: imfilter(.., 'replicate') as a direct 2-D correlation, then
    MATLAB's 1-based ``scale/2 : scale : end - scale/2`` subsampling. Float64 result, unrounded."""
    k = math.ceil(3 * sigma) * 2 + 2
    h = _fspecial_gaussian(k, sigma)
    centre = (k + 1) // 2  # imfilter's anchor, 1-based
    pre, post = centre - 1, k - centre
    x = img.astype(np.float64)
    padded = np.pad(x, ((pre, post), (pre, post), (0, 0)), mode="edge")
    filtered = np.zeros_like(x)
    for i in range(k):
        for j in range(k):
            filtered += h[i, j] * padded[i : i + x.shape[0], j : j + x.shape[1]]
    rows = np.arange(scale // 2, x.shape[0] - scale // 2 + 1, scale) - 1  # 1-based colon -> 0-based
    cols = np.arange(scale // 2, x.shape[1] - scale // 2 + 1, scale) - 1
    return filtered[rows][:, cols]


def test_bd_kernel_is_fspecial() -> None:
    g = gaussian_kernel(1.6)
    assert g.size == 12
    diff = np.abs(np.outer(g, g) - _fspecial_gaussian(12, 1.6)).max()
    print(f"BD kernel vs fspecial('gaussian', 12, 1.6): max|diff| = {diff:.3g}")
    assert diff < 1e-17


def test_bd_matches_direct_reference(hr: np.ndarray) -> None:
    ref = _bd_reference(hr)
    ours_f = bd_degrade(hr.astype(np.float64))
    ours_u8 = bd_degrade(hr)
    assert ours_f.shape == ours_u8.shape == (hr.shape[0] // 4, hr.shape[1] // 4, 3)
    d_float = np.abs(ours_f - ref).max()
    n_u8 = int((ours_u8 != _matlab_round(ref)).sum())
    print(f"BD float vs direct 2-D reference: max|diff| = {d_float:.3g}; uint8: {n_u8} of {ref.size} differ")
    assert d_float < 1e-10
    assert ours_u8.dtype == np.uint8 and n_u8 == 0


def test_bd_matches_scipy_correlate(hr: np.ndarray) -> None:
    """A second, independent reference: scipy's correlate with edge ('nearest') padding. scipy puts
    an even kernel's anchor at 0-based k//2; MATLAB at (k+1)//2 - 1, one less: origin=-1."""
    ndimage = pytest.importorskip("scipy.ndimage", reason="scipy not installed")
    h = _fspecial_gaussian(12, 1.6)[:, :, None]
    filtered = ndimage.correlate(hr.astype(np.float64), h, mode="nearest", origin=(-1, -1, 0))
    ref = filtered[1:-2:4, 1:-2:4]  # lq(2:4:end-2, 2:4:end-2)
    diff = np.abs(bd_degrade(hr.astype(np.float64)) - ref).max()
    print(f"BD float vs scipy.ndimage.correlate: max|diff| = {diff:.3g}")
    assert diff < 1e-10


def test_bd_output_size() -> None:
    assert bd_degrade(np.zeros((720, 1280, 3), np.uint8)).shape == (180, 320, 3)
    assert bd_degrade(np.zeros((723, 1281), np.float32)).shape == (180, 320)  # floor(H / 4)
    assert bd_degrade(np.zeros((64, 112, 3), np.uint8), scale=2).shape == (32, 56, 3)


def test_bd_constant_stays_constant() -> None:
    assert np.all(bd_degrade(np.full((40, 52, 3), 137, np.uint8)) == 137)
    out = bd_degrade(np.full((40, 52), 0.3))
    print(f"BD of a constant 0.3: max|diff| = {np.abs(out - 0.3).max():.3g}")
    assert np.abs(out - 0.3).max() < 1e-15


def test_bd_impulse_lands_at_matlab_centre() -> None:
    """imfilter anchors the 12-tap kernel at its 6th tap (1-based), so the filtered value at HR row
    r weighs rows r-5..r+6 and peaks equally at rows r and r+1. Kept row r = 4i+1 (0-based) is
    therefore centred at 4i+1.5, the middle of HR rows 4i..4i+3."""
    g = gaussian_kernel(1.6)
    peak = g.max()
    for hr_pos, tap in [((41, 61), 5), ((42, 62), 6), ((40, 60), 4), ((43, 63), 7)]:
        img = np.zeros((80, 96))
        img[hr_pos] = 1.0
        out = bd_degrade(img)
        assert np.unravel_index(np.argmax(out), out.shape) == (10, 15)
        assert out[10, 15] == pytest.approx(g[tap] ** 2, rel=1e-12)
    # Equal response to rows 41 and 42 (the two central taps), less to 40 and 43.
    assert g[5] == pytest.approx(peak) and g[6] == pytest.approx(peak) and g[4] < peak and g[7] < peak


def test_bd_sigma_param(hr: np.ndarray) -> None:
    ref = _bd_reference(hr, sigma=1.2)
    diff = np.abs(bd_degrade(hr.astype(np.float64), sigma=1.2) - ref).max()
    print(f"BD sigma 1.2 (kernel {gaussian_kernel(1.2).size}) vs reference: max|diff| = {diff:.3g}")
    assert diff < 1e-10


# --------------------------------------------------------------------------- torch path


@pytest.mark.parametrize("kind", ["bi", "bd", "up4"])
def test_tensor_path_equals_numpy(hr: np.ndarray, lr: np.ndarray, kind: str) -> None:
    def fn(x):
        return imresize(x, 4) if kind == "up4" else degrade(x, kind)

    src = lr if kind == "up4" else hr
    frames = np.stack([src, src[::-1], src[:, ::-1], np.roll(src, 7, axis=1)])  # (4, H, W, 3)
    ref = np.stack([fn(f.astype(np.float64) / 255.0) for f in frames])
    x = torch.from_numpy(frames.astype(np.float64) / 255.0).permute(0, 3, 1, 2)  # (4, 3, H, W)
    batch = x.reshape(2, 2, *x.shape[1:])  # (B, T, C, H, W), as in training
    out32 = fn(batch.float())
    out64 = fn(batch)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    got32 = out32.reshape(4, *out32.shape[2:]).permute(0, 2, 3, 1).numpy()
    got64 = out64.reshape(4, *out64.shape[2:]).permute(0, 2, 3, 1).numpy()
    d32, d64 = np.abs(got32 - ref).max(), np.abs(got64 - ref).max()
    # uint8 tensors follow the numpy uint8 path (intermediate rounding for imresize).
    u8 = fn(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1).numpy()
    ref_u8 = np.stack([fn(f) for f in frames])
    print(f"{kind}: tensor float32 vs numpy max|diff| = {d32:.3g}, float64 {d64:.3g}")
    assert d32 < 1e-5 and d64 < 1e-12
    assert u8.dtype == np.uint8 and np.array_equal(u8, ref_u8)


# --------------------------------------------------------------------------- dispatch and errors


def test_degrade_dispatch(hr: np.ndarray) -> None:
    assert np.array_equal(degrade(hr, "bi"), bi_degrade(hr))
    assert np.array_equal(degrade(hr, "BD"), bd_degrade(hr))
    assert degrade(hr, "bi", scale=2).shape == (96, 128, 3)
    with pytest.raises(VsrkitError, match="unknown degradation"):
        degrade(hr, "jpeg")


def test_invalid_inputs() -> None:
    with pytest.raises(VsrkitError, match="even integer scale"):
        bd_degrade(np.zeros((30, 30)), scale=3)
    with pytest.raises(VsrkitError, match="dtype"):
        imresize(np.zeros((8, 8), np.uint16), 0.5)
    with pytest.raises(VsrkitError):
        imresize(np.zeros((8, 8, 3, 2)), 0.5)
    with pytest.raises(VsrkitError):
        imresize(np.zeros((8, 8)), 0)
