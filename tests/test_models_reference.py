"""vsrkit's networks against BasicSR 1.4.2 (the oracle), full size, both checkpoint layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vsrkit
from reference_oracle import basicsr_arch, reference_basicvsrpp
from vsrkit.weights import native_to_mmagic

PAPER_PARAMS = {
    ("basicvsr", ()): 6_291_311,
    ("iconvsr", (("temporal_padding", 2),)): 8_694_991,
    ("iconvsr", (("temporal_padding", 3),)): 8_711_375,
    ("basicvsr_pp", ()): 7_322_927,
}


@pytest.mark.parametrize(("arch", "config"), list(PAPER_PARAMS))
def test_parameter_counts_match_the_papers(arch, config):
    model = vsrkit.create_model(arch, **dict(config))
    count = sum(p.numel() for p in model.parameters())
    print(f"{arch} {dict(config)}: {count:,} parameters")
    assert count == PAPER_PARAMS[(arch, config)]


def _reference(arch: str, **kw) -> torch.nn.Module:
    if arch == "basicvsr":
        return basicsr_arch("basicvsr_arch").BasicVSR(num_feat=64, num_block=30)
    if arch == "iconvsr":
        return basicsr_arch("basicvsr_arch").IconVSR(num_feat=64, num_block=30, **kw)
    return reference_basicvsrpp(mid_channels=64, num_blocks=7)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights, with the zero-initialised offset convs made non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.02 if "conv_offset" in name else 0.005))


def _mmagic_file(state: dict, arch: str, tmp_path, *, with_spynet_buffers: bool) -> str:
    sd = native_to_mmagic(state, arch)
    if not with_spynet_buffers:
        sd = {k: v for k, v in sd.items() if not k.endswith(("spynet.mean", "spynet.std"))}
    else:
        sd["generator.step_counter"] = torch.tensor([300000.0])
    path = tmp_path / f"{arch}_mmagic.pth"
    torch.save({"meta": {"iter": 1}, "state_dict": sd}, path)
    return str(path)


CASES = [
    ("basicvsr", {}, (1, 4, 3, 64, 72)),
    ("iconvsr", {"temporal_padding": 2}, (1, 6, 3, 62, 70)),  # not a multiple of 4: padding path
    ("iconvsr", {"temporal_padding": 3}, (1, 7, 3, 64, 64)),
    ("basicvsr_pp", {}, (1, 4, 3, 64, 80)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "config", "shape"), CASES, ids=[f"{a}-{c}" for a, c, _ in CASES])
def test_equal_to_basicsr_in_both_layouts(arch, config, shape, tmp_path, shared_data):
    torch.manual_seed(0)
    reference = _reference(arch, **config).eval()
    _perturb(reference, seed=1)
    state = reference.state_dict()

    frames = sorted((shared_data / "reds_lr_000").glob("*.png"))[: shape[1]]
    lqs = (
        torch.stack(
            [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in frames]
        ).float()[None]
        / 255
    )
    lqs = lqs[..., 40 : 40 + shape[3], 100 : 100 + shape[4]].contiguous()

    with torch.no_grad():
        expected = reference(lqs)

    basicsr_file = tmp_path / f"{arch}_basicsr.pth"
    torch.save({"params": state}, basicsr_file)
    files = {
        "basicsr": str(basicsr_file),
        "mmagic": _mmagic_file(state, arch, tmp_path, with_spynet_buffers=False),
        "mmagic+buffers": _mmagic_file(state, arch, tmp_path, with_spynet_buffers=True),
    }
    # The forward pass runs on the BasicSR-layout load; the mmagic-layout loads must give the
    # very same tensors, hence the same output bit for bit.
    model = vsrkit.create_model(arch, checkpoint=files["basicsr"], **config)
    with torch.no_grad():
        out = model(lqs)
    assert out.shape == expected.shape
    diff = (out - expected).abs().max().item()
    loaded = model.state_dict()
    for layout in ("mmagic", "mmagic+buffers"):
        other = vsrkit.create_model(arch, checkpoint=files[layout], **config).state_dict()
        assert other.keys() == loaded.keys()
        assert all(torch.equal(other[k], loaded[k]) for k in loaded), layout
    print(
        f"{arch} {config}: output max |x| {expected.abs().max().item():.3f}; max |diff| vs BasicSR "
        f"{diff:.2e} (basicsr layout; mmagic layouts load identical tensors)"
    )
    assert diff <= 1e-5


def test_mmagic_key_scheme_matches_the_reference_notes():
    """Key names quoted in the reference notes (§1) appear in the mmagic layout we write."""
    examples = {
        "basicvsr": [
            "generator.spynet.basic_module.5.basic_module.4.conv.bias",
            "generator.backward_resblocks.main.2.29.conv2.weight",
            "generator.upsample1.upsample_conv.weight",
            "generator.fusion.weight",
        ],
        "iconvsr": [
            "generator.edvr.feat_l2_conv1.conv.weight",
            "generator.edvr.pcd_alignment.offset_conv3.l1.conv.weight",
            "generator.edvr.pcd_alignment.dcn_pack.l3.conv_offset.weight",
            "generator.edvr.pcd_alignment.dcn_pack.l3.weight",
            "generator.edvr.pcd_alignment.cas_dcnpack.weight",
            "generator.edvr.fusion.feat_fusion.conv.weight",
            "generator.edvr.fusion.spatial_attn5.weight",
            "generator.edvr.fusion.spatial_attn_l3.conv.weight",
            "generator.edvr.fusion.spatial_attn_add2.weight",
            "generator.backward_fusion.weight",
        ],
        "basicvsr_pp": [
            "generator.deform_align.forward_2.conv_offset.6.weight",
            "generator.backbone.forward_2.main.0.weight",
            "generator.reconstruction.main.2.4.conv1.weight",
            "generator.upsample2.upsample_conv.weight",
        ],
    }
    for arch, keys in examples.items():
        mm = native_to_mmagic(vsrkit.create_model(arch).state_dict(), arch)
        missing = [k for k in keys if k not in mm]
        assert not missing, (arch, missing)
