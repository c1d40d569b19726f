"""Streaming inference: equal to one pass, bounded state, tiles without seams, precisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vsrkit
from vsrkit.data.video import read_all_frames
from vsrkit.engine import Upscaler, plan_tiles, upscale_frames


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # BasicVSR++'s alignment has 16 deformable groups over 2C channels: C must be a multiple of 8.
    config = {"mid_channels": 16 if arch == "basicvsr_pp" else 12, "num_blocks": 2}
    if arch == "iconvsr":
        config["edvr_channels"] = 8
    model = vsrkit.create_model(arch, **config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.fixture(scope="module")
def lr_frames(shared_data) -> np.ndarray:
    """13 real REDS LR frames, cropped to 64×80."""
    return read_all_frames(shared_data / "reds_lr_000", max_frames=13)[:, 40:104, 100:180].copy()


def one_pass(model: torch.nn.Module, frames: np.ndarray) -> torch.Tensor:
    lqs = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)[None]
    with torch.no_grad():
        return model(lqs)[0]


# Disk budgets for the backward states: none (every later segment recomputed), about 1.2 MB
# (with segment_frames=4 the last two segments stored, the one before recomputed: 12 channels
# at 64x80 fp32 are 0.23 MB a frame) and the default (all stored).
DISK_BUDGETS = {"recompute": 0.0, "mixed": 1.2, "stored": 2048.0}


@pytest.mark.parametrize("arch", ["basicvsr", "iconvsr"])
@pytest.mark.parametrize(
    ("segment_frames", "disk"),
    [
        (1, "recompute"),
        (4, "recompute"),
        (4, "mixed"),
        (4, "stored"),
        (5, "mixed"),
        (13, "stored"),
        (64, "stored"),
    ],
)
def test_streaming_equals_one_pass(arch, segment_frames, disk, lr_frames):
    model = tiny(arch)
    expected = one_pass(model, lr_frames)
    engine = Upscaler(model, device="cpu", segment_frames=segment_frames, state_disk_mb=DISK_BUDGETS[disk])
    calls = []
    original = engine.model.backward_step

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    engine.model.backward_step = counting
    streamed = torch.cat(list(engine.run_tensors(iter(lr_frames))))
    diff = (streamed - expected).abs().max().item()
    print(
        f"{arch} segment_frames={segment_frames} disk={disk}: {len(calls)} backward steps for 13 frames, "
        f"max |streamed - one pass| = {diff:.2e}"
    )
    # Frames whose backward state pass 2 recomputes: those of the segments that did not fit
    # (mixed: with segment_frames 4 or 5, exactly the second segment).
    recomputed = {"recompute": max(0, 13 - segment_frames), "mixed": segment_frames, "stored": 0}
    assert len(calls) == 13 + recomputed[disk]
    assert streamed.shape == expected.shape
    assert diff <= 1e-4


def test_unidirectional_and_image_alignment_stream_exactly(lr_frames):
    for config in ({"propagation": "unidirectional"}, {"alignment": "image"}, {"alignment": "none"}):
        torch.manual_seed(0)
        model = vsrkit.create_model("basicvsr", mid_channels=8, num_blocks=1, **config).eval()
        expected = one_pass(model, lr_frames)
        streamed = torch.cat(
            list(Upscaler(model, device="cpu", segment_frames=3).run_tensors(iter(lr_frames)))
        )
        assert (streamed - expected).abs().max().item() <= 1e-4, config


def test_basicvsr_pp_windows_deviation_is_measured(lr_frames):
    model = tiny("basicvsr_pp")
    expected = one_pass(model, lr_frames)
    whole = torch.cat(list(Upscaler(model, device="cpu", window_frames=64).run_tensors(iter(lr_frames))))
    assert (whole - expected).abs().max().item() <= 1e-4  # one window = one pass
    windowed = torch.cat(
        list(Upscaler(model, device="cpu", window_frames=6, window_overlap=2).run_tensors(iter(lr_frames)))
    )
    mse = torch.mean((windowed.clamp(0, 1) - expected.clamp(0, 1)) ** 2).item()
    psnr = 10 * np.log10(1 / mse)
    print(f"basicvsr_pp windows of 6 overlapping by 2 vs one pass: {psnr:.1f} dB")
    assert windowed.shape == expected.shape
    assert psnr > 30


def test_state_kept_in_memory_does_not_grow_with_length(lr_frames, monkeypatch):
    """The number of live backward states is bounded by segment_frames, not by the clip length."""
    from vsrkit.models.basicvsr import BasicVSR

    model = tiny("basicvsr")
    live = []
    original = BasicVSR.backward_step

    def counting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        live.append(out)
        return out

    monkeypatch.setattr(BasicVSR, "backward_step", counting)
    frames = np.concatenate([lr_frames] * 4)  # 52 frames
    peak = 0
    import gc
    import weakref

    refs: list = []
    for _ in Upscaler(model, device="cpu", segment_frames=4, state_disk_mb=0).run(iter(frames)):
        refs.extend(weakref.ref(t) for t in live)
        live.clear()
        gc.collect()
        peak = max(peak, sum(r() is not None for r in refs))
    print(f"peak live backward states over 52 frames with segment_frames=4: {peak}")
    assert peak <= 4 + 1


def test_tiles_cover_the_frame_and_respect_the_minimum():
    tiles = plan_tiles(180, 320, 64, 16)
    assert all(t.height >= 64 and t.width >= 64 for t in tiles)
    covered = np.zeros((180, 320), bool)
    for t in tiles:
        covered[t.top : t.top + t.height, t.left : t.left + t.width] = True
    assert covered.all()
    assert plan_tiles(50, 40, 16, 4) == plan_tiles(50, 40, 64, 4)  # clamped to the minimum
    assert len(plan_tiles(180, 320, None, 16)) == 1


@pytest.mark.slow
def test_tiles_have_no_seams_with_official_weights(shared_data):
    """Real weights, real frames: tiled output is indistinguishable from whole-frame output."""
    model = vsrkit.create_model("basicvsr", checkpoint="basicvsr_reds4")
    frames = read_all_frames(shared_data / "reds_lr_000", max_frames=4)[:, :96, :128].copy()
    whole = np.stack(list(upscale_frames(iter(frames), model, device="cpu")))
    tiled = np.stack(list(upscale_frames(iter(frames), model, device="cpu", tile=64, tile_overlap=16)))
    mse = np.mean((whole.astype(np.float64) - tiled) ** 2)
    psnr = 10 * np.log10(255**2 / mse)
    # Seams would show as a jump in error along the tile borders; compare border columns with the rest.
    col_err = np.abs(whole.astype(int) - tiled).mean(axis=(0, 1, 3))
    print(f"tiled (64 px, overlap 16) vs whole frame: {psnr:.1f} dB; worst column error {col_err.max():.2f}")
    assert psnr > 40
    assert col_err.max() < 2.0


@pytest.mark.parametrize("arch", ["basicvsr", "iconvsr", "basicvsr_pp"])
def test_bf16_is_close_to_fp32(arch, lr_frames):
    model = tiny(arch)
    frames = lr_frames[:6]
    fp32 = np.stack(list(upscale_frames(iter(frames), model, device="cpu")))
    bf16 = np.stack(list(upscale_frames(iter(frames), model, device="cpu", precision="bf16")))
    mse = np.mean((fp32.astype(np.float64) - bf16) ** 2)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    print(f"{arch}: bf16 vs fp32 output {psnr:.1f} dB")
    assert psnr > 40


def test_bad_frames_are_user_errors():
    model = tiny("basicvsr")
    with pytest.raises(vsrkit.VsrkitError, match="no frames"):
        list(upscale_frames(iter([]), model, device="cpu"))
    with pytest.raises(vsrkit.VsrkitError, match="uint8"):
        list(upscale_frames(iter([np.zeros((8, 8, 3), np.float32)]), model, device="cpu"))
    with pytest.raises(vsrkit.VsrkitError, match="fp16 needs a CUDA"):
        Upscaler(model, device="cpu", precision="fp16")
    with pytest.raises(vsrkit.VsrkitError, match="IconVSR"):
        list(upscale_frames(iter([np.zeros((16, 16, 3), np.uint8)] * 3), tiny("iconvsr"), device="cpu"))
