"""Every CPU fast path equals the plain path, within a stated tolerance.

Fast paths: fused conv epilogues (``conv_act``), channels_last, bf16 weights, the prepared
models (:func:`vsrkit.accel.prepare_for_inference`), the engine's batched SPyNet calls and the
custom deformable convolution (its op-level tests are in ``test_deform_conv.py``). Tiny models
on small frames; no timings are asserted (the speed is measured by ``benchmarks/speed.py``).

Tolerances: fp32 fast paths on oneDNN reorder nothing but oneDNN's own kernel choice (NHWC
against NCHW blocking), so they stay within 1e-5 of the plain output (the NNPACK path, with
its Winograd rounding, is tested in ``test_nnpack.py`` to 1e-4); bf16 keeps 8 mantissa bits, so bf16
paths are judged by PSNR (> 50 dB on [0, 1] outputs) against fp32.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vsrkit
from vsrkit.accel import prepare_for_inference, prepared_precision
from vsrkit.engine import Upscaler
from vsrkit.models.blocks import SubpixelConv2d, conv_act, conv_act_shuffle2
from vsrkit.ops import native, nnpack
from vsrkit.ops.deform_conv import deform_conv2d
from vsrkit.ops.fast_conv import FUSED_CONV, FastConv2d

ARCHS = ["basicvsr", "iconvsr", "basicvsr_pp"]


def tiny(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = {"mid_channels": 16, "num_blocks": 2}
    if arch == "iconvsr":
        config["edvr_channels"] = 8
    model = vsrkit.create_model(arch, **config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Non-zero offset convs, so the deformable alignment really deforms.
            p.add_(torch.randn_like(p) * (0.02 if "conv_offset" in name else 0.01))
    return model


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float().clamp(0, 1) - b.float().clamp(0, 1)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    # Smooth random frames with a small shift between frames: flows are non-trivial.
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 20, 24, generator=gen), size=(72, 88))
    return torch.stack([base[..., i : i + 64, 2 * i : 2 * i + 80] for i in range(5)], dim=1)


@pytest.mark.skipif(FUSED_CONV is None, reason="this torch build has no oneDNN fused conv")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("act", "residual"), [(None, False), ("relu", False), ("leaky_relu", False), (None, True)]
)
def test_fused_conv_epilogue_equals_conv_then_op(dtype, act, residual):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, 1, 1).eval()
    plain_conv = copy.deepcopy(conv).to(dtype, memory_format=torch.channels_last)
    fast = FastConv2d.from_conv(conv, dtype=dtype, channels_last=True, fuse=True)
    assert fast.fuse
    x = torch.randn(2, 16, 11, 13).to(dtype)
    res = torch.randn(2, 16, 11, 13).to(dtype) if residual else None
    with torch.no_grad():
        plain = conv_act(plain_conv, x, act, 0.1, res)
        fused = conv_act(fast, x, act, 0.1, res)
    assert fused.dtype == plain.dtype
    assert fused.is_contiguous(memory_format=torch.channels_last)
    tol = 0 if dtype == torch.float32 else 0.02  # bf16: the fused sum is rounded once, not twice
    assert (fused.float() - plain.float()).abs().max().item() <= tol


def test_fused_path_is_not_taken_under_autograd():
    """With autograd the compute weights come from the parameters in the graph: gradients reach them."""
    conv = FastConv2d.from_conv(nn.Conv2d(4, 4, 3, 1, 1), channels_last=True, fuse=True)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    conv_act(conv, x, "relu").sum().backward()
    assert x.grad is not None and conv.weight.grad is not None and conv.bias.grad is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_prepared_fp32_equals_plain(arch, clip):
    model = tiny(arch)
    with torch.inference_mode():
        plain = model(clip)
        fast = prepare_for_inference(model, "cpu", "fp32", nnpack=False)(clip)
    diff = (fast - plain).abs().max().item()
    print(f"{arch}: prepared fp32 (channels_last, fused, oneDNN) vs plain: max |diff| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize(
    ("arch", "spynet_precision"),
    [("basicvsr", "same"), ("basicvsr", "fp32"), ("iconvsr", "same"), ("basicvsr_pp", "same")],
)
def test_prepared_bf16_is_close_to_fp32(arch, spynet_precision, clip):
    model = tiny(arch)
    prepared = prepare_for_inference(model, "cpu", "bf16", spynet_precision=spynet_precision)
    with torch.inference_mode():
        plain = model(clip)
        fast = prepared(clip)
    assert fast.dtype == torch.float32  # the ×4 tail's residual sum is fp32
    quality = psnr(fast, plain)
    print(f"{arch} bf16 (SPyNet {spynet_precision}): {quality:.1f} dB against fp32")
    assert quality > 50


def test_preparation_keeps_the_original_and_its_parameters():
    model = tiny("basicvsr_pp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_for_inference(model, "cpu", "bf16")
    assert prepared is not model
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert not any(isinstance(m, FastConv2d) for m in model.modules())
    # The tail's sub-pixel convs compute in bf16, NHWC, channels in (i, j, c) order; the
    # parameters stay the original's.
    upconv = prepared.upconv1
    assert isinstance(upconv, FastConv2d) and upconv.subpixel_last and upconv.compute_dtype == torch.bfloat16
    assert upconv.weight.dtype == torch.float32 and upconv.weight.is_contiguous()
    with torch.inference_mode():
        compute_weight, _ = upconv.compute_params()
    assert compute_weight.dtype == torch.bfloat16
    assert compute_weight.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(compute_weight.float(), upconv.weight.to(torch.bfloat16).float())  # reordered
    # The deformable convs are not convs: left as they are (they compute in their input's dtype).
    assert prepared.deform_align["forward_1"].weight.dtype == torch.float32
    # SPyNet: bf16 conv stacks (fp32 through NNPACK where it runs), fp32 normalisation buffers.
    spynet_conv = prepared.spynet.basic_module[0].basic_module[0]
    assert spynet_conv.compute_dtype == (torch.float32 if nnpack.available() else torch.bfloat16)
    assert spynet_conv.nnpack == nnpack.available()
    assert not prepared.upconv1.nnpack
    direct = prepare_for_inference(model, "cpu", "bf16", nnpack=False)
    assert direct.spynet.basic_module[0].basic_module[0].compute_dtype == torch.bfloat16
    assert prepared.spynet.mean.dtype == torch.float32
    keep = prepare_for_inference(model, "cpu", "bf16", spynet_precision="fp32")
    assert keep.spynet.basic_module[0].basic_module[0].compute_dtype == torch.float32
    assert prepared_precision(prepared) == "bf16"


NNPACK_CHOICES = [
    False,
    pytest.param(True, marks=pytest.mark.skipif(not nnpack.available(), reason="NNPACK unavailable")),
]


@pytest.mark.parametrize("use_nnpack", NNPACK_CHOICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_prepared_state_dict_equals_the_originals(precision, use_nnpack):
    """Keys, dtypes and values: preparing changes how the model computes, not what it holds."""
    for arch in ("iconvsr", "basicvsr_pp"):
        model = tiny(arch)
        prepared = prepare_for_inference(model, "cpu", precision, nnpack=use_nnpack)
        fast_convs = [m for m in prepared.modules() if isinstance(m, FastConv2d)]
        assert len(fast_convs) > 10
        with torch.inference_mode():
            for conv in fast_convs:
                conv.compute_params()  # what a forward call derives: now it exists
        original, state = model.state_dict(), prepared.state_dict()
        assert list(state) == list(original)
        for key, value in original.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_fresh_model_loading_a_prepared_state_dict_is_the_original(precision, clip):
    clip = clip[:, :3, :, :32, :40]
    model = tiny("basicvsr")
    prepared = prepare_for_inference(model, "cpu", precision)
    fresh = vsrkit.create_model("basicvsr", mid_channels=16, num_blocks=2).eval()
    fresh.load_state_dict(prepared.state_dict())
    with torch.inference_mode():
        assert torch.equal(fresh(clip), model(clip))


def test_a_prepared_model_follows_new_weights(clip):
    """Loading other weights into a prepared model re-derives its compute copies."""
    clip = clip[:, :3, :, :32, :40]
    prepared = prepare_for_inference(tiny("basicvsr", seed=0), "cpu", "bf16")
    other = tiny("basicvsr", seed=1)
    with torch.inference_mode():
        before = prepared(clip)
    prepared.load_state_dict(other.state_dict())
    with torch.inference_mode():
        after = prepared(clip)
        reference = prepare_for_inference(other, "cpu", "bf16")(clip)
    assert not torch.equal(before, after)
    assert torch.equal(after, reference)


class PlainUpconv(nn.Module):
    """A conv named like the ×4 tail's but used as a plain conv (no pixel shuffle)."""

    def __init__(self) -> None:
        super().__init__()
        self.upconv1 = nn.Conv2d(8, 16, 3, 1, 1)
        self.upconv2 = nn.Conv2d(16, 8, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upconv2(conv_act(self.upconv1, x, "leaky_relu"))


@pytest.mark.parametrize("use_nnpack", NNPACK_CHOICES)
def test_a_plain_conv_named_upconv1_is_left_numerically_unchanged(use_nnpack):
    """Sub-pixel convs are found by their class, not their names: nothing is reordered here."""
    torch.manual_seed(0)
    model = PlainUpconv().eval()
    x = torch.randn(1, 8, 48, 52)
    prepared = prepare_for_inference(model, "cpu", "fp32", nnpack=use_nnpack)
    assert not prepared.upconv1.subpixel_last and not prepared.upconv2.subpixel_last
    with torch.inference_mode():
        diff = (prepared(x) - model(x)).abs().max().item()
    assert diff <= (1e-4 if use_nnpack else 1e-5)


def test_engine_prepares_bf16_weights_instead_of_autocast(clip):
    model = tiny("basicvsr")
    engine = Upscaler(model, device="cpu", precision="bf16")
    assert engine.model is not model
    assert engine.model.forward_trunk.main[0].compute_dtype == torch.bfloat16
    assert not isinstance(model.forward_trunk.main[0], FastConv2d)
    assert not torch.is_autocast_enabled("cpu")
    with engine._autocast():
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("arch", ["basicvsr"])
def test_engine_batched_flows_equal_one_pair_at_a_time(arch, clip):
    frames = [(f.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for f in clip[0]]
    model = tiny(arch)
    one = torch.cat(list(Upscaler(model, device="cpu", flow_batch=1).run_tensors(iter(frames))))
    batched = torch.cat(list(Upscaler(model, device="cpu", flow_batch=3).run_tensors(iter(frames))))
    diff = (one - batched).abs().max().item()
    print(f"{arch}: flow_batch 3 vs 1: max |diff| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("arch", ["iconvsr", "basicvsr_pp"])
def test_models_use_the_fast_deformable_conv_on_the_cpu(arch, clip, monkeypatch):
    """No call reaches torchvision's slow CPU kernel; the native sampler runs where it builds."""
    import torchvision.ops

    def forbidden(*args, **kwargs):
        raise AssertionError("torchvision.ops.deform_conv2d called on the CPU")

    monkeypatch.setattr(torchvision.ops, "deform_conv2d", forbidden)
    calls = []
    lib = native.library()
    if lib is not None:
        real = lib.vsrkit_dcn_im2col

        class Counting:
            def __call__(self, *args):
                calls.append(args)
                return real(*args)

        monkeypatch.setattr(lib, "vsrkit_dcn_im2col", Counting())
    with torch.no_grad():
        out = prepare_for_inference(tiny(arch), "cpu", "fp32")(clip)
    assert torch.isfinite(out).all()
    assert (len(calls) > 0) == (lib is not None)


def test_fast_deformable_conv_bf16_channels_last_is_close_to_fp32():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 12, 14, generator=gen)
    offset = torch.randn(1, 2 * 8 * 9, 12, 14, generator=gen) * 2
    mask = torch.rand(1, 8 * 9, 12, 14, generator=gen)
    weight = torch.randn(16, 32, 3, 3, generator=gen) * 0.1
    bias = torch.randn(16, generator=gen)
    ref = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    x_fast = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w_fast, b_fast = weight.to(torch.bfloat16), bias.to(torch.bfloat16)
    out = deform_conv2d(x_fast, offset, w_fast, b_fast, padding=1, mask=mask)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2


@pytest.mark.parametrize("channels_last", [True, False])
def test_subpixel_channel_reorder_gives_the_same_pixel_shuffle(channels_last):
    """A sub-pixel conv computed in (i, j, c) channel order shuffles to F.pixel_shuffle's result;
    called directly, it still returns the original channel order."""
    gen = torch.Generator().manual_seed(3)
    conv = SubpixelConv2d(8, 4 * 6, 3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))
    x = torch.randn(2, 8, 5, 7, generator=gen)
    with torch.no_grad():
        expected = F.pixel_shuffle(F.leaky_relu(conv(x), 0.1), 2)
        fast = FastConv2d.from_conv(copy.deepcopy(conv), channels_last=channels_last, subpixel_last=True)
        assert fast.subpixel_last == channels_last  # only channels-last convs gain from the order
        out = conv_act_shuffle2(fast, x, "leaky_relu", 0.1)
        direct = fast(x)
    assert torch.equal(conv_act_shuffle2(conv, x, "leaky_relu", 0.1), expected)  # a plain conv: plain ops
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(direct, conv(x), rtol=0, atol=1e-5)


def test_keep_freed_memory_takes_effect_on_glibc():
    import platform

    from vsrkit.accel import keep_freed_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected
    assert keep_freed_memory() is expected  # idempotent
