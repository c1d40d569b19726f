"""IconVSR's keyframe features with each frame's EDVR-M pyramid computed once."""

from __future__ import annotations

import pytest
import torch

from vsrkit.models.iconvsr import IconVSR


def _tiny_iconvsr(temporal_padding: int) -> IconVSR:
    torch.manual_seed(temporal_padding)
    model = IconVSR(mid_channels=8, num_blocks=1, temporal_padding=temporal_padding, edvr_channels=16).eval()
    with torch.no_grad():
        # Non-zero offset convs, so that the deformable convs sample off the grid.
        for p in model.edvr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _count_pyramid_frames(model: IconVSR) -> list[int]:
    """Patches ``model.edvr.pyramid`` to record how many frames each call gets."""
    counts: list[int] = []
    pyramid = model.edvr.pyramid

    def counted(frames: torch.Tensor) -> list[torch.Tensor]:
        counts.append(frames.shape[0])
        return pyramid(frames)

    model.edvr.pyramid = counted
    return counts


@pytest.mark.parametrize("temporal_padding", [2, 3])
@pytest.mark.parametrize("num_frames", [7, 16])
@pytest.mark.parametrize("descending", [False, True])
def test_shared_pyramids_give_the_stacked_windows_features(
    temporal_padding: int, num_frames: int, descending: bool
) -> None:
    model = _tiny_iconvsr(temporal_padding)
    lqs = torch.rand(2, num_frames, 3, 12, 16)
    keys = model.keyframes(num_frames)
    order = sorted(keys, reverse=descending)
    counts = _count_pyramid_frames(model)
    with torch.no_grad():
        features = model.keyframe_features(num_frames, order)
        shared = {i: features(i, lambda j: lqs[:, j]) for i in order}
        shared_count = sum(counts) // lqs.shape[0]
        stacked = {i: model.keyframe_feature(lqs[:, model.keyframe_window(i, num_frames)]) for i in order}
    for i in keys:
        torch.testing.assert_close(shared[i], stacked[i], rtol=1e-5, atol=1e-5)
    # The stacked windows compute 2p+1 pyramids each; shared, no frame's pyramid twice, and the
    # windows that overlap (the ends, and every pair of neighbours with p = 3) compute fewer.
    window_frames = {j for i in keys for j in model.keyframe_window(i, num_frames)}
    assert shared_count == len(window_frames)
    assert shared_count < len(keys) * (2 * temporal_padding + 1)


def test_model_forward_uses_the_shared_pyramids() -> None:
    model = _tiny_iconvsr(2)
    lqs = torch.rand(1, 6, 3, 12, 16)
    counts = _count_pyramid_frames(model)
    with torch.no_grad():
        out = model(lqs)
    # Keyframes 0 and 5 read frames {4, 3, 0, 1, 2} and {3, 4, 5, 2, 1}: six distinct frames.
    assert sum(counts) == 6
    assert out.shape == (1, 6, 3, 48, 64)
