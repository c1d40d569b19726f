"""The NNPACK convolution path (fp32 CPU Winograd/FFT) against exact convolutions.

Tolerance: 1e-4 of the output's scale (``vsrkit.ops.nnpack.SELF_TEST_TOLERANCE``). Winograd
F(6×6, 3×3) in fp32 is measured at 1e-6 to 1e-5 relative here, FFT (7×7) at ~1e-7, against
float64 convolutions; a wrong band, halo or epilogue is off by O(1). Whole prepared models
(tiny configs) are judged by their largest deviation from the plain fp32 model on [0, 1]
outputs (≤ 1e-4, i.e. far below one 8-bit level).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from test_fast_paths import ARCHS, tiny
from vsrkit.accel import prepare_for_inference
from vsrkit.engine import Upscaler
from vsrkit.errors import VsrkitError
from vsrkit.ops import nnpack
from vsrkit.ops.fast_conv import FastConv2d

pytestmark = pytest.mark.skipif(not nnpack.available(), reason=f"{nnpack.unavailable_reason}")


def through_nnpack(module: nn.Module) -> bool:
    return isinstance(module, FastConv2d) and module.nnpack


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize(
    ("n", "cin", "cout", "h", "w", "k"),
    [
        (1, 64, 64, 90, 80, 3),  # one image: bands of rows with a halo
        (2, 16, 32, 40, 36, 3),  # an even batch: one image per thread
        (3, 8, 24, 70, 31, 3),  # an odd batch: bands again
        (1, 8, 32, 96, 64, 7),  # SPyNet's 7×7 (FFT), bands with a 3-row halo
        (4, 32, 16, 24, 40, 7),
        (1, 12, 5, 7, 9, 3),  # too few rows for bands: one thread
        (1, 4, 4, 1, 1, 3),  # a single pixel
        (2, 16, 2, 6, 10, 7),  # SPyNet's coarsest level
    ],
)
@pytest.mark.parametrize("epilogue", ["none", "relu", "leaky_relu", "residual"])
def test_conv2d_equals_the_exact_convolution(n, cin, cout, h, w, k, epilogue):
    gen = torch.Generator().manual_seed(n * 1000 + h)
    x = torch.randn(n, cin, h, w, generator=gen)
    weight = torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
    bias = torch.randn(cout, generator=gen)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=k // 2)
    kwargs: dict = {}
    if epilogue == "residual":
        kwargs["residual"] = torch.randn(n, cout, h, w, generator=gen)
        exact = exact + kwargs["residual"].double()
    elif epilogue == "relu":
        kwargs["act"] = "relu"
        exact = exact.relu()
    elif epilogue == "leaky_relu":
        kwargs["act"], kwargs["slope"] = "leaky_relu", 0.1
        exact = F.leaky_relu(exact, 0.1)
    out = nnpack.conv2d(x, weight, bias, **kwargs)
    assert out.shape == exact.shape and out.dtype == torch.float32 and out.is_contiguous()
    err = relative_error(out, exact)
    print(f"{n}x{cin}->{cout} {h}x{w} k{k} {epilogue}: relative error {err:.1e}")
    assert err <= nnpack.SELF_TEST_TOLERANCE


def test_a_conv_built_in_inference_mode_runs():
    with torch.inference_mode():
        # Inference tensors: no version counter to tell whether the compute copy is current.
        conv = FastConv2d.from_conv(nn.Conv2d(8, 8, 3, 1, 1), nnpack=True)
        x = torch.randn(1, 8, 64, 40)
        out = conv(x)
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert relative_error(out, exact) <= nnpack.SELF_TEST_TOLERANCE


@pytest.mark.parametrize(("n", "h", "w"), [(1, 90, 160), (2, 40, 64), (3, 50, 41), (1, 6, 9)])
def test_conv2d_pixel_shuffle_equals_conv_then_shuffle(n, h, w):
    """The tail's sub-pixel convs: the x2 shuffle written as the result is stored."""
    gen = torch.Generator().manual_seed(h)
    x = torch.randn(n, 16, h, w, generator=gen)
    weight = torch.randn(64, 16, 3, 3, generator=gen) / 12
    bias = torch.randn(64, generator=gen)
    out = nnpack.conv2d(x, weight, bias, act="leaky_relu", slope=0.1, pixel_shuffle=True)
    conv = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    exact = F.pixel_shuffle(F.leaky_relu(conv, 0.1), 2)
    assert out.shape == exact.shape == (n, 16, 2 * h, 2 * w)
    assert relative_error(out, exact) <= nnpack.SELF_TEST_TOLERANCE
    with pytest.raises(ValueError, match="pixel_shuffle"):
        nnpack.conv2d(x, weight[:6], bias[:6], pixel_shuffle=True)
    with pytest.raises(ValueError, match="pixel_shuffle"):
        nnpack.conv2d(x, weight, bias, residual=torch.zeros(n, 64, h, w), pixel_shuffle=True)


def test_conv2d_takes_channels_last_input_and_no_bias():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 33, 47, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 16, 3, 3, generator=gen) * 0.1
    out = nnpack.conv2d(x, weight)
    assert relative_error(out, F.conv2d(x.double(), weight.double(), padding=1)) <= nnpack.SELF_TEST_TOLERANCE


def test_conv2d_rejects_what_it_does_not_compute():
    with pytest.raises(ValueError, match="act"):
        nnpack.conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3), act="gelu")
    with pytest.raises(ValueError, match="unsupported shapes"):
        nnpack.conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match="residual"):
        nnpack.conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3), residual=torch.randn(1, 4, 8, 7))


def test_supports_only_stride_one_same_padding():
    assert nnpack.supports(nn.Conv2d(8, 8, 3, 1, 1))
    assert nnpack.supports(nn.Conv2d(8, 2, 7, 1, 3))
    assert not nnpack.supports(nn.Conv2d(8, 8, 3, 2, 1))  # EDVR's stride-2 pyramid convs
    assert not nnpack.supports(nn.Conv2d(8, 8, 1))  # 1×1 fusions: oneDNN
    assert not nnpack.supports(nn.Conv2d(8, 8, 3, 1, 0))
    assert not nnpack.supports(nn.Conv2d(8, 8, 3, 1, 1, groups=2))
    assert not nnpack.supports(nn.Conv2d(8, 8, 3, 1, 1, padding_mode="reflect"))


def test_nnpack_module_is_a_plain_conv_under_autograd():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, 1, 1)
    plain = nn.Conv2d(4, 6, 3, 1, 1)
    plain.load_state_dict(conv.state_dict())
    conv = FastConv2d.from_conv(conv, nnpack=True)
    x = torch.randn(1, 4, 9, 9, requires_grad=True)
    out = conv(x)
    assert torch.equal(out, plain(x))  # the direct kernel, bit for bit
    out.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        assert relative_error(conv(x), plain(x).double()) <= nnpack.SELF_TEST_TOLERANCE


@pytest.mark.parametrize("arch", ARCHS)
def test_prepared_fp32_model_runs_its_convs_through_nnpack(arch):
    model = tiny(arch)
    gen = torch.Generator().manual_seed(1)
    base = F.interpolate(torch.rand(1, 3, 20, 24, generator=gen), size=(72, 88))
    clip = torch.stack([base[..., i : i + 64, 2 * i : 2 * i + 80] for i in range(5)], dim=1)
    prepared = prepare_for_inference(model, "cpu", "fp32")
    direct = prepare_for_inference(model, "cpu", "fp32", nnpack=False)
    marked = [name for name, m in prepared.named_modules() if through_nnpack(m)]
    supported = [name for name, m in model.named_modules() if nnpack.supports(m)]
    assert marked == supported and len(marked) > 10
    assert not any(through_nnpack(m) for m in direct.modules())
    assert prepared.state_dict().keys() == model.state_dict().keys()
    bf16_upconv = prepare_for_inference(model, "cpu", "bf16").upconv1  # bf16: oneDNN
    assert bf16_upconv.compute_dtype == torch.bfloat16 and not bf16_upconv.nnpack
    with torch.inference_mode():
        plain = model(clip)
        fast = prepared(clip)
    diff = (fast - plain).abs().max().item()
    print(f"{arch}: NNPACK-prepared fp32 vs plain: max |diff| {diff:.2e}")
    assert diff <= 1e-4


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("VSRKIT_NNPACK", "0")
    assert not nnpack.available()
    prepared = prepare_for_inference(tiny("basicvsr"), "cpu", "fp32")
    assert not any(through_nnpack(m) for m in prepared.modules())
    with pytest.raises(RuntimeError):
        prepare_for_inference(tiny("basicvsr"), "cpu", "fp32", nnpack=True)


def test_engine_option_chooses_the_path(monkeypatch):
    model = tiny("basicvsr")
    uses = lambda engine: any(through_nnpack(m) for m in engine.model.modules())  # noqa: E731
    assert uses(Upscaler(model, device="cpu"))
    assert not uses(Upscaler(model, device="cpu", nnpack=False))
    monkeypatch.setenv("VSRKIT_NNPACK", "0")
    assert not uses(Upscaler(model, device="cpu"))
    with pytest.raises(VsrkitError, match="VSRKIT_NNPACK"):
        Upscaler(model, device="cpu", nnpack=True)


@pytest.mark.parametrize("threads", [1, 3])
def test_conv2d_with_other_thread_counts(threads):
    """One thread (no bands) and an odd team (three bands, a batch of 2 that does not split)."""
    gen = torch.Generator().manual_seed(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 2):
            x = torch.randn(n, 16, 97, 41, generator=gen)
            weight = torch.randn(24, 16, 3, 3, generator=gen) / 12
            residual = torch.randn(n, 24, 97, 41, generator=gen)
            out = nnpack.conv2d(x, weight, residual=residual)
            exact = F.conv2d(x.double(), weight.double(), padding=1) + residual.double()
            assert relative_error(out, exact) <= nnpack.SELF_TEST_TOLERANCE
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux only")
def test_pytorchs_library_is_found_among_the_loaded_ones():
    """The fallback where torch/lib has no libtorch_cpu (other packagings): the mapped files."""
    assert any(p.name.startswith("libtorch_cpu") for p in nnpack._loaded_libraries("libtorch"))


class NNPACKConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nnpack.conv2d(x, self.conv.weight, self.conv.bias, act="leaky_relu", slope=0.1)


def test_export_and_compile_see_the_nnpack_op():
    """torch.export keeps vsrkit::nnpack_conv2d in the graph (its fake kernel gives the shape);
    torch.compile traces it in one graph; both compute what the eager op does."""
    torch.manual_seed(0)
    module = NNPACKConv().eval()
    x = torch.randn(1, 8, 64, 48)
    with torch.no_grad():
        eager = module(x)
        exported = torch.export.export(module, (x,))
        targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
        assert "vsrkit.nnpack_conv2d.default" in targets, targets
        assert torch.equal(exported.module()(x), eager)
        compiled = torch.compile(nnpack.nnpack_conv2d_op, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x, module.conv.weight, module.conv.bias, 2, 0.1, None, False), eager)
