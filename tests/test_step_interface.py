"""The model step interface (vsrkit.models.base): the engine drives any VSRModel through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vsrkit
from vsrkit.engine import Upscaler
from vsrkit.errors import VsrkitError
from vsrkit.models import families
from vsrkit.models.base import VSRModel
from vsrkit.models.basicvsr import BasicVSR


class RefiningBasicVSR(BasicVSR):
    """BasicVSR whose frames first go through up to three passes of a conv, stopping below a mean."""

    refine_passes = 3

    def __init__(self, threshold: float, **config) -> None:
        super().__init__(**config)
        self.threshold = threshold
        self.cleaner = nn.Conv2d(3, 3, 3, padding=1)
        self.refine_calls = 0

    def refine(self, lq: torch.Tensor) -> torch.Tensor:
        self.refine_calls += 1
        return 0.05 * torch.tanh(self.cleaner(lq))

    def refine_done(self, mean_abs_residue: float) -> bool:
        return mean_abs_residue < self.threshold


def _clip(frames: int = 5, height: int = 20, width: int = 28) -> np.ndarray:
    rng = np.random.default_rng(3)
    smooth = rng.integers(0, 256, (frames, height // 4, width // 4, 3)).repeat(4, 1).repeat(4, 2)
    noise = rng.integers(-20, 21, smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("threshold", "passes"), [(1.0, 1), (0.0, 3)])
def test_refine_passes_stream_like_the_one_pass_forward(threshold, passes):
    torch.manual_seed(0)
    model = RefiningBasicVSR(threshold, mid_channels=8, num_blocks=1).eval()
    frames = _clip()
    lqs = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255).unsqueeze(0)
    with torch.no_grad():
        expected = model(lqs)[0]
        unrefined = BasicVSR.forward(_without_refine(model), lqs)[0]
    assert model.refine_calls == passes  # frame-batched: one call per pass

    model.refine_calls = 0
    engine = Upscaler(model, device="cpu", tile=0, segment_frames=2)
    streamed = torch.cat(list(engine.run_tensors(iter(frames))))
    # The engine refines frame by frame: one call per frame and pass.
    assert engine.model.refine_calls == passes * len(frames)
    diff = (streamed - expected).abs().max().item()
    changed = (expected - unrefined).abs().max().item()
    print(f"{passes} refine pass(es): streamed vs one pass {diff:.2e}; refining changed {changed:.2e}")
    assert streamed.shape == expected.shape
    assert diff <= 1e-5
    assert changed > 1e-3  # the refined frames, not the spooled ones, went through the steps


def _without_refine(model: RefiningBasicVSR) -> BasicVSR:
    plain = BasicVSR(mid_channels=8, num_blocks=1).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("cleaner.")})
    return plain


def test_a_model_that_is_not_a_vsr_model_is_refused_in_one_line():
    with pytest.raises(VsrkitError, match="not a vsrkit VSRModel"):
        Upscaler(nn.Conv2d(3, 3, 1), device="cpu")


def test_too_short_clip_names_the_family():
    needy = [m for m in _tiny_models() if m.min_frames > 2]
    assert needy, "no family needs more than 2 frames: nothing to check"
    for model in needy:
        title = type(model).family.title
        needs = f"{title} needs at least {model.min_frames} frames; the input has 2"
        with pytest.raises(VsrkitError, match=needs):
            list(Upscaler(model, device="cpu", tile=0).run(iter(_clip(frames=2))))


def _tiny_models() -> list[VSRModel]:
    models = []
    for name in families():
        model = vsrkit.create_model(name, mid_channels=8, num_blocks=1)
        models.append(model.eval())
    return models


def test_every_family_builds_a_vsr_model_with_consistent_attributes():
    for model in _tiny_models():
        assert isinstance(model, VSRModel), type(model)
        assert type(model).family is families()[model.arch]
        assert model.scale in (1, 4) and model.min_frames >= 1 and model.pad_multiple >= 1
        if model.streams_exactly:
            assert not model.keyframes(model.min_frames) or model.keyframe_reach > 0


def test_engine_names_no_architecture():
    source = (Path(vsrkit.__file__).parent / "engine.py").read_text()
    for name, family in families().items():
        for spelling in (name, *family.aliases):
            assert f'"{spelling}"' not in source and f"'{spelling}'" not in source, spelling
