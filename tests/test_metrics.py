"""PSNR / SSIM / Y conversion / averaging against BasicSR 1.4.2's ``psnr_ssim.py`` and scikit-image.

Run with ``pytest -s`` to see the compared figures.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from types import ModuleType
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from reference_oracle import load_basicsr_file
from vsrkit.data.degradations import bd_degrade, bi_degrade, imresize
from vsrkit.errors import VsrkitError
from vsrkit.metrics import MetricAverager, psnr, rgb_to_y, ssim, to_uint8

# Same location rule as conftest.py (kept here so the file stands alone).
DATA = Path(os.environ.get("VSRKIT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"


# --------------------------------------------------------------------------- oracle and data


def _cv2_module() -> ModuleType:
    """Real OpenCV if installed; otherwise a stand-in with the two functions ``_ssim`` calls.

    ``getGaussianKernel(11, 1.5)`` is the normalised sampled Gaussian (a column), and
    ``filter2D(img, -1, k)`` is a correlation with BORDER_REFLECT_101 (scipy's 'mirror'); the
    border mode is irrelevant here because ``_ssim`` keeps only the valid region.
    """
    try:
        import cv2

        return cv2
    except ImportError:
        pass
    ndimage = pytest.importorskip("scipy.ndimage", reason="neither OpenCV nor scipy for the SSIM oracle")
    stand_in = types.ModuleType("cv2")

    def get_gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
        x = np.arange(ksize) - (ksize - 1) / 2
        g = np.exp(-(x**2) / (2 * sigma**2))
        return (g / g.sum())[:, None]

    def filter_2d(src: np.ndarray, ddepth: int, kernel: np.ndarray) -> np.ndarray:
        return ndimage.correlate(src, kernel, mode="mirror")

    stand_in.getGaussianKernel = get_gaussian_kernel
    stand_in.filter2D = filter_2d
    stand_in.__vsrkit_stand_in__ = True
    return stand_in


@pytest.fixture(scope="module")
def bsr() -> ModuleType:
    """basicsr/metrics/psnr_ssim.py, loaded without the basicsr package ``__init__``.

    Its imports (``basicsr.metrics.metric_util``, ``basicsr.utils.bgr2ycbcr``,
    ``basicsr.utils.color_util``, ``basicsr.utils.registry``) are served by the real
    ``color_util.py`` / ``metric_util.py`` files plus a no-op registry, only while it loads.
    """
    color_util = load_basicsr_file("utils/color_util.py", "basicsr.utils.color_util")
    utils = types.ModuleType("basicsr.utils")
    utils.bgr2ycbcr = color_util.bgr2ycbcr
    registry = types.ModuleType("basicsr.utils.registry")

    class _Registry:
        def register(self, *args, **kwargs):
            return lambda obj: obj

    registry.METRIC_REGISTRY = _Registry()
    stubs = {
        "basicsr": types.ModuleType("basicsr"),
        "basicsr.utils": utils,
        "basicsr.utils.color_util": color_util,
        "basicsr.utils.registry": registry,
        "cv2": _cv2_module(),
    }
    with mock.patch.dict(sys.modules, stubs):
        sys.modules["basicsr.metrics.metric_util"] = load_basicsr_file(
            "metrics/metric_util.py", "basicsr.metrics.metric_util"
        )
        module = load_basicsr_file("metrics/psnr_ssim.py", "basicsr.metrics.psnr_ssim")
    which = "a scipy stand-in for" if hasattr(module.cv2, "__vsrkit_stand_in__") else "real"
    print(f"SSIM oracle uses {which} cv2")
    module.color_util = color_util
    return module


def _frame(rel: str) -> np.ndarray:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    return np.array(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(prediction, ground truth) uint8 RGB pairs from real frames: a 720p crop restored by bicubic
    upscaling of its BI and BD degradations, and a REDS LR frame against its neighbour."""
    gt = _frame("toflow_hr_baseball/05.png")[160:400, 400:720].copy()  # 240 x 320
    reds0 = _frame("reds_lr_000/00000000.png")
    reds1 = _frame("reds_lr_000/00000001.png")
    return {
        "bi": (imresize(bi_degrade(gt), 4), gt),
        "bd": (imresize(bd_degrade(gt), 4), gt),
        "reds": (reds1, reds0),
    }


def _bgr(img: np.ndarray) -> np.ndarray:
    """BasicSR reads frames with OpenCV, so its Y conversion expects BGR channel order."""
    return np.ascontiguousarray(img[..., ::-1])


# --------------------------------------------------------------------------- PSNR / SSIM vs BasicSR


@pytest.mark.parametrize("space", ["y", "rgb"])
@pytest.mark.parametrize("crop_border", [0, 4])
def test_psnr_ssim_match_basicsr(bsr: ModuleType, pairs, space: str, crop_border: int) -> None:
    for name, (pred, gt) in pairs.items():
        y = space == "y"
        p_ref = bsr.calculate_psnr(_bgr(pred), _bgr(gt), crop_border, test_y_channel=y)
        s_ref = bsr.calculate_ssim(_bgr(pred), _bgr(gt), crop_border, test_y_channel=y)
        p, s = psnr(pred, gt, crop_border, space), ssim(pred, gt, crop_border, space)
        rel_p, rel_s = abs(p - p_ref) / p_ref, abs(s - s_ref) / s_ref
        print(
            f"{name} {space} crop {crop_border}: PSNR {p:.6f} vs {p_ref:.6f} (rel {rel_p:.2g}), "
            f"SSIM {s:.6f} vs {s_ref:.6f} (rel {rel_s:.2g})"
        )
        # BasicSR computes Y in float32 (rel ~1e-9 here); RGB agrees to rounding.
        assert rel_p < 1e-6 and rel_s < 1e-6


def test_ssim_matches_skimage_on_y(pairs) -> None:
    """skimage's Gaussian SSIM (11 taps: radius int(3.5 * 1.5 + 0.5) = 5) filters the full image
    with reflected borders but then averages only the map's interior, cropped by 5 pixels, which
    is exactly the 'valid' region: the two agree to rounding, not just to ~1e-3."""
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image not installed")
    for name, (pred, gt) in pairs.items():
        ref = metrics.structural_similarity(
            rgb_to_y(pred),
            rgb_to_y(gt),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
        )
        ours = ssim(pred, gt)
        print(f"{name}: SSIM(Y) {ours:.8f} vs skimage {ref:.8f}, |diff| {abs(ours - ref):.2g}")
        assert abs(ours - ref) < 1e-9


# --------------------------------------------------------------------------- conventions


def test_rgb_to_y(bsr: ModuleType, pairs) -> None:
    _, gt = pairs["bi"]
    y = rgb_to_y(gt)
    assert y.shape == gt.shape[:2] and y.dtype == np.float64
    ref = bsr.color_util.bgr2ycbcr(_bgr(gt).astype(np.float32) / 255.0, y_only=True) * 255.0
    diff = np.abs(y - ref).max()
    print(f"rgb_to_y vs BasicSR bgr2ycbcr (float32): max|diff| = {diff:.3g}")
    assert diff < 1e-4
    assert rgb_to_y(np.array([[0, 0, 0], [255, 255, 255]], np.uint8)) == pytest.approx([16.0, 235.0])
    # float [0, 1] input and tensors (..., 3, H, W) give the same numbers.
    assert np.abs(rgb_to_y(gt / 255.0) - y).max() < 1e-12
    t = torch.from_numpy(gt / 255.0).permute(2, 0, 1)[None]
    assert np.abs(rgb_to_y(t)[0].numpy() - y).max() < 1e-12


def test_float_inputs_are_quantised_first(pairs) -> None:
    """Float [0, 1] outputs are scored after clip, x255 and round, as the references' tensor2img."""
    _, gt = pairs["reds"]
    pred_f = imresize(bi_degrade(gt.astype(np.float64) / 255.0), 4)  # unrounded, rings past 1
    assert pred_f.max() > 1
    expected = np.round(np.clip(pred_f, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(to_uint8(pred_f), expected)
    tensor = torch.from_numpy(pred_f).permute(2, 0, 1).float()
    for p in (pred_f, tensor, tensor[None]):
        assert psnr(p, gt) == psnr(to_uint8(p), gt)
        assert ssim(p, gt, space="rgb") == ssim(to_uint8(p), gt, space="rgb")
    assert psnr(tensor, torch.from_numpy(gt).permute(2, 0, 1)) == psnr(tensor, gt)


def test_identical_images() -> None:
    img = _frame("reds_lr_000/00000003.png")
    assert psnr(img, img) == float("inf")
    assert psnr(img, img.copy(), space="rgb") == float("inf")
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)


def test_grayscale_and_errors(pairs) -> None:
    pred, gt = pairs["reds"]
    # A single channel is scored as is, whatever the space.
    assert psnr(pred[..., 1], gt[..., 1]) == psnr(pred[..., 1:2], gt[..., 1:2], space="rgb")
    with pytest.raises(VsrkitError, match="shape"):
        psnr(pred, gt[:-1])
    with pytest.raises(VsrkitError, match="colour space"):
        ssim(pred, gt, space="ycbcr")
    with pytest.raises(VsrkitError, match="11x11"):
        ssim(pred[:20, :20], gt[:20, :20], crop_border=5)
    with pytest.raises(VsrkitError, match="dtype"):
        psnr(pred.astype(np.int32), gt)


# --------------------------------------------------------------------------- averaging


def test_metric_averager_mean_of_clip_means() -> None:
    """Per frame, then per clip, then over clips: a 4-frame clip weighs as much as a 1-frame one."""
    clips = {
        "baseball": [_frame(f"toflow_hr_baseball/{i:02d}.png")[200:328, 480:640] for i in (1, 2, 3, 4)],
        "reds": [_frame("reds_lr_000/00000010.png")[:96, :128]],
    }
    avg = MetricAverager()
    frame_values = {}
    for clip, frames in clips.items():
        frame_values[clip] = [psnr(imresize(bi_degrade(f), 4), f) for f in frames]
        for v in frame_values[clip][:-1]:
            avg.add(clip, v)
        avg.extend(clip, frame_values[clip][-1:])
    means = avg.clip_means()
    expected = {clip: float(np.mean(v)) for clip, v in frame_values.items()}
    overall = (expected["baseball"] + expected["reds"]) / 2
    pooled = float(np.mean(sum(frame_values.values(), [])))
    print(f"clip means {means}; mean of clip means {avg.mean():.4f}; frame-pooled mean {pooled:.4f}")
    assert list(means) == ["baseball", "reds"]
    assert means == pytest.approx(expected, rel=1e-12)
    assert avg.mean() == pytest.approx(overall, rel=1e-12)
    assert avg.num_frames == 5
    assert abs(avg.mean() - pooled) > 0.1  # the two averagings really differ here
    with pytest.raises(VsrkitError):
        MetricAverager().mean()
