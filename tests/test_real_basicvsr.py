"""RealBasicVSR against mmagic 1.2.0's own network files (tests/mmagic_oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vsrkit
from mmagic_oracle import mmagic_real_basicvsr
from vsrkit.models import get_family
from vsrkit.models.registry import Family

TINY = {"mid_channels": 8, "num_blocks": 2, "num_cleaning_blocks": 2}


@pytest.fixture(scope="session")
def mmagic_net(tmp_path_factory):
    return mmagic_real_basicvsr(tmp_path_factory.mktemp("mmagic"))


def _oracle(module, threshold: float, state_dict=None):
    net = module.RealBasicVSRNet(
        mid_channels=TINY["mid_channels"],
        num_propagation_blocks=TINY["num_blocks"],
        num_cleaning_blocks=TINY["num_cleaning_blocks"],
        dynamic_refine_thres=threshold,
    )
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return net.eval()


def _perturbed(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``net``'s state dict with every parameter moved by noise of its own size."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in net.state_dict().items():
        if key.endswith(("spynet.mean", "spynet.std")):
            sd[key] = value.clone()
        else:
            noise = torch.randn(value.shape, generator=gen) * (value.std() if value.numel() > 1 else 0.1)
            sd[key] = value + 0.5 * noise
    return sd


def _count_calls(module: torch.nn.Module, means: list[float]):
    return module.register_forward_hook(lambda m, i, out: means.append(float(out.abs().mean())))


def _mmagic_checkpoint(path, state_dict: dict[str, torch.Tensor]) -> None:
    """mmagic's training checkpoint: the EMA generator (the one to load), a different
    generator and a discriminator, all under ``state_dict``."""
    sd = {f"generator_ema.{k}": v for k, v in state_dict.items()}
    sd.update({f"generator.{k}": v + 1.0 for k, v in state_dict.items()})
    sd["discriminator.conv0.weight"] = torch.randn(4, 3, 3, 3)
    sd["discriminator.conv0.bias"] = torch.randn(4)
    torch.save({"meta": {"mmagic_version": "1.2.0"}, "state_dict": sd}, path)


def test_parameter_count_and_entries():
    family = get_family("realbasicvsr")
    assert isinstance(family, Family) and family.name == "real_basicvsr"
    model = vsrkit.create_model("real_basicvsr")
    assert sum(p.numel() for p in model.parameters()) == 6_294_834
    assert model.dynamic_refine_thres == 5.0 and model.refine_passes == 3
    entries = {e.name: e for e in family.weights}
    default = entries[family.default_weights]
    assert default.config["dynamic_refine_thres"] == 5.0
    thresholds = sorted(e.config["dynamic_refine_thres"] for e in entries.values())
    assert thresholds == [1.5, 5.0]
    for entry in entries.values():
        assert entry.layout == "mmagic" and entry.degradation == "real" and entry.training_data == "REDS"
        assert entry.urls[0].endswith(entry.filename) and entry.sha256_prefix in entry.filename
        built = vsrkit.create_model(entry.arch, **entry.config)
        assert sum(p.numel() for p in built.parameters()) == 6_294_834


def test_oracle_parameter_count_and_key_rules(mmagic_net):
    from vsrkit.models.real_basicvsr import NATIVE_KEY_RULES
    from vsrkit.weights import mmagic_to_native

    net = mmagic_net.RealBasicVSRNet(dynamic_refine_thres=5)
    assert sum(p.numel() for p in net.parameters()) == 6_294_834
    mmagic = net.state_dict()
    native = vsrkit.create_model("real_basicvsr").state_dict()
    # mmagic → native (what loading does) and back (the rules for writing mmagic's layout).
    shapes = {k: v.shape for k, v in native.items()}
    assert {k: v.shape for k, v in mmagic_to_native(mmagic).items()} == shapes
    written = {}
    for key, value in native.items():
        for pattern, repl in NATIVE_KEY_RULES:
            key = pattern.sub(repl, key)
        written[key] = value.shape
    assert written == {k: v.shape for k, v in mmagic.items()}


@pytest.mark.parametrize("passes", [1, 3])
def test_equals_mmagic(mmagic_net, tmp_path, passes):
    torch.manual_seed(0)
    weights = _perturbed(_oracle(mmagic_net, 0.0), seed=passes)
    lqs = torch.rand(1, 3, 3, 32, 40)

    # The mean residue of each pass (oracle, never stopping early) sets a threshold that
    # stops after the first pass, or one below every pass's mean so that all three run.
    means: list[float] = []
    probe = _oracle(mmagic_net, 0.0, weights)
    handle = _count_calls(probe.image_cleaning, means)
    with torch.no_grad():
        probe(lqs.clone())
    handle.remove()
    assert len(means) == 3 and min(means) > 1e-3
    threshold = 255 * (2 * means[0] if passes == 1 else 0.5 * min(means[:2]))

    oracle_means: list[float] = []
    oracle = _oracle(mmagic_net, threshold, weights)
    _count_calls(oracle.image_cleaning, oracle_means)
    with torch.no_grad():
        expected = oracle(lqs.clone())

    path = tmp_path / "realbasicvsr_mmagic.pth"
    _mmagic_checkpoint(path, weights)
    model = vsrkit.create_model(checkpoint=path, dynamic_refine_thres=threshold)
    assert model.arch == "real_basicvsr" and model.config == {**TINY, "dynamic_refine_thres": threshold}
    native_means: list[float] = []
    _count_calls(model.image_cleaning, native_means)
    with torch.no_grad():
        got = model(lqs.clone())

    assert len(oracle_means) == len(native_means) == passes
    assert got.shape == expected.shape == (1, 3, 3, 128, 160)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("passes", [1, 3])
def test_cleaning_for_export_equals_eager(passes, monkeypatch):
    """torch.export cannot branch on the clip-wide mean: the branchless cleaning it traces
    gives the eager result whether the passes stop after the first or run all three."""
    from vsrkit.models import real_basicvsr

    torch.manual_seed(passes)
    model = vsrkit.create_model("real_basicvsr", **TINY).eval()
    lqs = torch.rand(1, 3, 3, 16, 20)
    means: list[float] = []
    _count_calls(model.image_cleaning, means)
    model.dynamic_refine_thres = 0.0
    with torch.no_grad():
        model.refine_clip(lqs)
    assert len(means) == 3 and min(means) > 0
    if passes == 1:
        model.dynamic_refine_thres = 255 * means[0] * 1.01
    means.clear()
    with torch.no_grad():
        eager = model.refine_clip(lqs)
    assert len(means) == passes
    monkeypatch.setattr(real_basicvsr, "is_exporting", lambda: True)
    with torch.no_grad():
        branchless = model.refine_clip(lqs)
    assert torch.equal(eager, branchless)


@pytest.mark.parametrize("passes", [1, 3])
def test_engine_streams_exactly(passes, shared_data, tmp_path):
    """`vsrkit upscale`'s engine in segments of 2 frames, with the cleaning passes run over the
    spooled clip, equals one `forward` (the weights saved in vsrkit's format, the threshold set
    when loading them)."""
    from vsrkit.data.video import read_all_frames
    from vsrkit.engine import Upscaler, tensor_to_frame, upscale_frames
    from vsrkit.weights import save_vsrkit

    frames = read_all_frames(shared_data / "reds_lr_000", max_frames=4)[:, 40:72, 100:140].copy()
    lqs = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)[None]
    torch.manual_seed(passes)
    probe = vsrkit.create_model("real_basicvsr", **TINY, dynamic_refine_thres=0.0).eval()
    probe.load_state_dict(_perturbed(probe, seed=passes))
    means: list[float] = []
    _count_calls(probe.image_cleaning, means)
    with torch.no_grad():
        probe(lqs)
    assert len(means) == 3 and min(means) > 1e-3
    threshold = 255 * (2 * means[0] if passes == 1 else 0.5 * min(means[:2]))
    path = tmp_path / "tiny.safetensors"
    save_vsrkit(probe, path)
    model = vsrkit.create_model(checkpoint=path, dynamic_refine_thres=threshold)
    with torch.no_grad():
        expected = model(lqs)[0]

    engine = Upscaler(model, device="cpu", segment_frames=2)
    refined: list[int] = []
    original = engine.model.refine
    engine.model.refine = lambda lq: (refined.append(lq.shape[0]), original(lq))[1]
    streamed = torch.cat(list(engine.run_tensors(iter(frames))))
    assert sum(refined) == passes * len(frames)
    assert streamed.shape == expected.shape
    assert (streamed - expected).abs().max().item() <= 1e-4

    if passes == 1:  # what `vsrkit upscale` writes: 8-bit frames, within one level
        out = np.stack(list(upscale_frames(iter(frames), model, device="cpu", segment_frames=2)))
        want = np.stack([tensor_to_frame(frame[None]) for frame in expected])
        assert np.abs(out.astype(int) - want.astype(int)).max() <= 1
