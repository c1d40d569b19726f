"""vsrkit.ops.deform_conv2d against torchvision.ops.deform_conv2d (the semantics it copies).

Tolerances:

* float32 forward: max|diff| <= 1e-5 * max|reference output|. The CPU path samples through
  grid_sample's normalised coordinates, which adds a few float32 roundings at the scale of 1,
  i.e. about 1e-7 * W pixels of position error; that is of the order of torchvision's own
  float32 rounding and shrinks with the frame size (the test sizes give ~1e-6 relative).
  ``test_float32_error_against_float64`` checks the large-frame case against float64 instead.
* gradients: the same bound per tensor, relative to that gradient's max.
* bfloat16 (and autocast bfloat16): 2e-2 * max|reference| (bf16 has 8 significant bits; the
  measured figure is ~4e-3).

Every test runs twice: with the native C sampler (``vsrkit.ops.native``, used without autograd
when it builds) and with the pure-PyTorch path (``VSRKIT_NATIVE=0``).

Run with ``-s`` to see the max|diff| figures.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

import vsrkit.ops.deform_conv as dc
from vsrkit.ops import native
from vsrkit.ops.deform_conv import deform_conv2d, deform_conv2d_from_logits

FP32_REL = 1e-5
BF16_REL = 2e-2


@pytest.fixture(autouse=True, params=["native", "pytorch"])
def sampler(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "pytorch":
        monkeypatch.setenv("VSRKIT_NATIVE", "0")
    elif native.library() is None:
        pytest.skip(f"native kernel unavailable: {native.unavailable_reason}")
    return request.param


def test_native_kernel_builds_where_there_is_a_compiler(sampler: str) -> None:
    if sampler == "pytorch":
        assert native.library() is None
    elif shutil.which(os.environ.get("CC", "cc")):
        assert native.library() is not None, native.unavailable_reason


def _inputs(
    n: int,
    cin: int,
    cout: int,
    groups: int,
    h: int,
    w: int,
    *,
    kh: int = 3,
    kw: int = 3,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
    offset_scale: float = 3.0,
    weight_groups: int = 1,
    with_mask: bool = True,
    with_bias: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    k = kh * kw

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return {
        "input": rnd(n, cin, h, w),
        "offset": rnd(n, 2 * groups * k, ho, wo) * offset_scale,
        "weight": rnd(cout, cin // weight_groups, kh, kw) / (cin * k / weight_groups) ** 0.5,
        "bias": rnd(cout) if with_bias else None,
        "mask": torch.rand(n, groups * k, ho, wo, generator=gen, dtype=torch.float64).to(dtype)
        if with_mask
        else None,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
    }


def _reference(a: dict) -> torch.Tensor:
    return tv_deform_conv2d(
        a["input"],
        a["offset"],
        a["weight"],
        a["bias"],
        stride=a["stride"],
        padding=a["padding"],
        dilation=a["dilation"],
        mask=a["mask"],
    )


def _ours(a: dict) -> torch.Tensor:
    return deform_conv2d(
        a["input"],
        a["offset"],
        a["weight"],
        a["bias"],
        stride=a["stride"],
        padding=a["padding"],
        dilation=a["dilation"],
        mask=a["mask"],
    )


def _rel_diff(name: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    rel = diff / max(scale, 1e-30)
    print(f"{name}: max|diff| {diff:.3e}, scale {scale:.3g}, relative {rel:.3e}")
    return rel


CASES = {
    # name: (positional shape args n, cin, cout, groups, h, w), keyword overrides
    "basicvsr_pp": ((1, 128, 64, 16, 20, 36), {}),
    "pcd_no_mask": ((1, 64, 64, 8, 24, 20), {"with_mask": False}),
    "pcd_mask_no_bias": ((1, 64, 64, 8, 16, 16), {"with_bias": False}),
    "batch3_nonsquare": ((3, 16, 8, 4, 11, 29), {}),
    "large_offsets_outside": ((2, 16, 8, 2, 12, 15), {"offset_scale": 25.0}),
    "stride2": ((2, 16, 8, 2, 13, 18), {"stride": 2}),
    "dilation2_pad2": ((1, 16, 8, 2, 13, 18), {"dilation": 2, "padding": 2}),
    "kernel3x5_pad0": ((1, 16, 8, 2, 13, 18), {"kw": 5, "padding": 0}),
    "kernel1x1": ((1, 16, 8, 4, 9, 10), {"kh": 1, "kw": 1, "padding": 0}),
    "weight_groups2": ((2, 16, 8, 4, 10, 12), {"weight_groups": 2}),
    "one_group_no_mask_no_bias": ((1, 8, 4, 1, 10, 12), {"with_mask": False, "with_bias": False}),
    "height1": ((1, 8, 4, 2, 1, 12), {}),
    "width1": ((2, 8, 4, 2, 9, 1), {}),
    "one_pixel": ((1, 8, 4, 2, 1, 1), {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_torchvision(name: str) -> None:
    shape, kwargs = CASES[name]
    a = _inputs(*shape, **kwargs)
    with torch.no_grad():
        assert _rel_diff(name, _ours(a), _reference(a)) <= FP32_REL


@pytest.mark.parametrize("group_channels", [4, 8])
def test_sampling_edges_match_torchvision(group_channels: int) -> None:
    """Samples exactly on and just around the image border, and far outside it.

    Eight channels per group take the native kernel's vector path, four its plain loop.
    """
    a = _inputs(1, group_channels, 3, 1, 6, 7, with_bias=False)
    ho, wo = 6, 7
    # Kernel position (1, 1) samples at (y, x) + offset. Choose offsets that put the sample at
    # fixed coordinates: -1, between -1 and 0, 0, the last pixel, between it and the size, the
    # size itself, and beyond.
    targets = torch.tensor([-3.0, -1.0, -0.75, -0.25, 0.0, 2.5, 5.0, 5.5, 6.0, 6.3, 9.0])
    off = torch.zeros(1, 18, ho, wo)
    ys = targets[torch.arange(ho * wo) % len(targets)].view(ho, wo)
    xs = targets[(torch.arange(ho * wo) * 7 + 3) % len(targets)].view(ho, wo)
    grid_y = torch.arange(ho, dtype=torch.float32).view(-1, 1)
    grid_x = torch.arange(wo, dtype=torch.float32).view(1, -1)
    for k in range(9):
        ky, kx = divmod(k, 3)
        off[0, 2 * k] = ys - (grid_y - 1 + ky)
        off[0, 2 * k + 1] = xs - (grid_x - 1 + kx)
    a["offset"] = off
    with torch.no_grad():
        ours, ref = _ours(a), _reference(a)
    assert _rel_diff("edges", ours, ref) <= FP32_REL
    assert ref.abs().max() > 0


@pytest.mark.parametrize("group_channels", [4, 8])
def test_huge_offsets_read_zero(group_channels: int) -> None:
    """Offsets far beyond the image (up to 1e30 px) read zeros, as in torchvision."""
    a = _inputs(1, 2 * group_channels, 4, 2, 10, 12, with_bias=False)
    offset = a["offset"].clone().view(1, 2, 9, 2, 10, 12)  # (n, groups, k, (dy, dx), ho, wo)
    offset[:, :, 0::2, 0] *= 1e9  # even kernel positions: far above/below
    offset[:, :, 1::4, 1] = -1e30  # positions 1 and 5: far left; 3 and 7 stay inside
    a["offset"] = offset.view(1, 36, 10, 12)
    with torch.no_grad():
        out, ref = _ours(a), _reference(a)
    assert torch.isfinite(out).all()
    assert ref.abs().max() > 0
    assert _rel_diff("huge offsets", out, ref) <= FP32_REL


@pytest.mark.parametrize("chunk_bytes", [1, 3000])
def test_row_chunks(monkeypatch: pytest.MonkeyPatch, chunk_bytes: int) -> None:
    """Tiny chunks: one output row per chunk, and several rows with a shorter last chunk."""
    monkeypatch.setattr(dc, "_CHUNK_BYTES", chunk_bytes)
    a = _inputs(2, 16, 8, 4, 13, 10, dtype=torch.float32)
    with torch.no_grad():
        assert _rel_diff(f"chunks {chunk_bytes}", _ours(a), _reference(a)) <= FP32_REL
    a["input"].requires_grad_()
    out = _ours(a)
    assert out.requires_grad
    assert _rel_diff(f"chunks {chunk_bytes} autograd path", out.detach(), _reference(a).detach()) <= FP32_REL


def test_channels_last_tensors() -> None:
    a = _inputs(2, 32, 16, 4, 12, 14)
    ref = _reference(a)
    for key in ("input", "offset", "mask"):
        a[key] = a[key].contiguous(memory_format=torch.channels_last)
    a["weight"] = a["weight"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = _ours(a)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert _rel_diff("channels_last", out, ref) <= FP32_REL
    a["weight"].requires_grad_()
    out = _ours(a)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert _rel_diff("channels_last autograd path", out.detach(), ref) <= FP32_REL


def test_float32_error_against_float64() -> None:
    """On a larger frame, our float32 error (vs float64) is of the order of torchvision's own."""
    a = _inputs(1, 16, 16, 2, 90, 160, offset_scale=3.0)
    a64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    with torch.no_grad():
        exact = _reference(a64)
        err_tv = (_reference(a).double() - exact).abs().max().item()
        err_ours = (_ours(a).double() - exact).abs().max().item()
        ours64 = _ours(a64)
    scale = exact.abs().max().item()
    print(f"vs float64: torchvision fp32 {err_tv:.3e}, vsrkit fp32 {err_ours:.3e}, scale {scale:.3g}")
    assert err_ours <= 4 * err_tv + 1e-6 * scale
    assert ours64.dtype == torch.float64
    assert _rel_diff("float64 vs torchvision float64", ours64, exact) <= 1e-12


def _grads(fn, a: dict, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    leaves = {
        k: a[k].detach().clone().requires_grad_() for k in ("input", "offset", "weight", "bias", "mask")
    }
    out = fn({**a, **leaves})
    out.backward(grad_out)
    return {"output": out.detach(), **{k: v.grad for k, v in leaves.items()}}


@pytest.mark.parametrize("stride", [1, 2])
def test_gradients_match_torchvision(stride: int) -> None:
    a = _inputs(2, 8, 6, 2, 7, 9, stride=stride, offset_scale=2.0)
    grad_out = torch.randn(_reference(a).shape, generator=torch.Generator().manual_seed(1))
    ours, ref = _grads(_ours, a, grad_out), _grads(_reference, a, grad_out)
    for key in ref:
        assert _rel_diff(f"stride {stride} grad {key}", ours[key], ref[key]) <= FP32_REL, key


def test_gradcheck_float64() -> None:
    a = _inputs(1, 4, 2, 2, 4, 5, dtype=torch.float64, offset_scale=1.5, seed=3)
    leaves = tuple(a[k].requires_grad_() for k in ("input", "offset", "weight", "bias", "mask"))

    def fn(x, off, w, b, m):
        return deform_conv2d(x, off, w, b, mask=m)

    # fast_mode checks random projections of the Jacobian: seconds instead of a minute on a
    # loaded 2-core machine; the full per-element comparison is test_gradients_match_torchvision.
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_bfloat16() -> None:
    a = _inputs(1, 128, 64, 16, 20, 36)
    with torch.no_grad():
        ref = _reference(a)
        a16 = {k: v.bfloat16() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        out = _ours(a16)
    assert out.dtype == torch.bfloat16
    assert _rel_diff("bf16 tensors vs fp32 torchvision", out, ref) <= BF16_REL


def test_autocast_bfloat16_forward_and_backward() -> None:
    a = _inputs(1, 64, 64, 8, 16, 20)
    ref = _reference(a).detach()
    leaves = {
        k: a[k].detach().clone().requires_grad_() for k in ("input", "offset", "weight", "bias", "mask")
    }
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = _ours(a)
    assert out.dtype == torch.bfloat16
    assert _rel_diff("autocast bf16 (no grad)", out, ref) <= BF16_REL
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _ours({**a, **leaves})
    assert out.dtype == torch.bfloat16
    assert _rel_diff("autocast bf16 (autograd)", out.detach(), ref) <= BF16_REL
    out.float().square().sum().backward()
    for key, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32, key
        assert torch.isfinite(leaf.grad).all(), key


def test_no_grad_and_autograd_paths_agree(sampler: str) -> None:
    a = _inputs(2, 16, 8, 4, 9, 11)
    with torch.no_grad():
        fast = _ours(a)
    a["offset"].requires_grad_()
    slow = _ours(a)
    assert slow.requires_grad
    if sampler == "pytorch":
        # The same sampling code with and without autograd.
        torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-6)
    else:
        # C samples in pixel coordinates, grid_sample in normalised ones.
        assert _rel_diff("native vs autograd path", fast, slow.detach()) <= FP32_REL


def _from_logits_reference(x, logits, weight, bias, offset_scale, flows):
    """The models' offset and mask computation written out, then torchvision."""
    o1, o2, mask = torch.chunk(logits.float(), 3, dim=1)
    offset = torch.cat((o1, o2), dim=1)
    if offset_scale is not None:
        offset = offset_scale * torch.tanh(offset)
    if flows:
        halves = torch.chunk(offset, len(flows), dim=1)
        offset = torch.cat(
            [h + f.flip(1).repeat(1, h.size(1) // 2, 1, 1) for h, f in zip(halves, flows, strict=True)], dim=1
        )
    return tv_deform_conv2d(
        x.float(), offset, weight.float(), bias.float(), padding=1, mask=torch.sigmoid(mask)
    )


@pytest.mark.parametrize(
    "case",
    ["basicvsr_pp_nhwc", "basicvsr_pp_nchw_batch2", "edvr_one_flow", "edvr_raw", "basicvsr_pp_bf16"],
)
def test_from_logits_matches_the_written_out_composition(case: str) -> None:
    """``deform_conv2d_from_logits`` = offsets (scaled tanh + flows) and sigmoid mask, then DCN."""
    gen = torch.Generator().manual_seed(7)
    n, groups, c = (2, 16, 8) if "batch2" in case else (1, 16 if "basicvsr_pp" in case else 8, 8)
    h, w = 14, 19
    x = torch.randn(n, groups * c, h, w, generator=gen)
    logits = torch.randn(n, 27 * groups, h, w, generator=gen) * 2
    weight = torch.randn(12, groups * c, 3, 3, generator=gen) / (groups * c * 9) ** 0.5
    bias = torch.randn(12, generator=gen)
    scale = 10.0 if "basicvsr_pp" in case else None
    flows: tuple[torch.Tensor, ...] = ()
    if "basicvsr_pp" in case:
        flows = (torch.randn(n, 2, h, w, generator=gen) * 4, torch.randn(n, 2, h, w, generator=gen) * 4)
    elif "one_flow" in case:
        flows = (torch.randn(n, 2, h, w, generator=gen) * 4,)
    ref = _from_logits_reference(x, logits, weight, bias, scale, flows)
    if "nhwc" in case or "bf16" in case:
        x = x.contiguous(memory_format=torch.channels_last)
        logits = logits.contiguous(memory_format=torch.channels_last)
    if "bf16" in case:
        x, logits, weight, bias = (t.bfloat16() for t in (x, logits, weight, bias))
    with torch.no_grad():
        out = deform_conv2d_from_logits(x, logits, weight, bias, offset_scale=scale, flows=flows)
    assert out.dtype == x.dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == ("nhwc" in case or "bf16" in case)
    assert _rel_diff(case, out, ref) <= (BF16_REL if "bf16" in case else FP32_REL)
    # With autograd: the plain composition, same result.
    leaf = logits.detach().float().requires_grad_()
    slow = deform_conv2d_from_logits(
        x.float(), leaf, weight.float(), bias.float(), offset_scale=scale, flows=flows
    )
    slow.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert _rel_diff(case + " autograd", slow.detach(), ref) <= (BF16_REL if "bf16" in case else FP32_REL)


def test_bad_shapes_are_rejected() -> None:
    a = _inputs(1, 8, 4, 2, 6, 6)
    with pytest.raises(ValueError, match="offset"):
        deform_conv2d(a["input"], a["offset"][:, :-1], a["weight"], mask=a["mask"])
    with pytest.raises(ValueError, match="mask"):
        deform_conv2d(a["input"], a["offset"], a["weight"], mask=a["mask"][:, :-1])
    with pytest.raises(ValueError, match="bias"):
        deform_conv2d(a["input"], a["offset"], a["weight"], torch.zeros(3), mask=a["mask"])
    with pytest.raises(ValueError, match="offset groups"):
        # 3 offset groups cannot split 8 input channels.
        deform_conv2d(a["input"], torch.zeros(1, 54, 6, 6), a["weight"])
    with pytest.raises(TypeError):
        deform_conv2d(a["input"].long(), a["offset"], a["weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dispatches_to_torchvision() -> None:
    a = _inputs(1, 16, 8, 2, 12, 15)
    with torch.no_grad():
        ref = _reference(a)
        on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        out = _ours(on_gpu)
    assert out.is_cuda
    assert _rel_diff("cuda", out.cpu(), ref) <= 1e-4


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"])
def test_native_build_failure_falls_back_quietly(
    sampler: str, compiler: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """No compiler, or one that fails: library() is None with a reason, deform_conv2d still works."""
    if sampler == "pytorch":
        pytest.skip("one run is enough")
    if compiler == "false" and not shutil.which("false"):
        pytest.skip("no `false` command")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "unavailable_reason", None)
    monkeypatch.setenv("VSRKIT_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / compiler) if compiler == "no-such-compiler" else compiler)
    assert native.library() is None
    assert compiler in native.unavailable_reason
    a = _inputs(1, 16, 8, 2, 9, 10)
    with torch.no_grad():
        assert _rel_diff("fallback", _ours(a), _reference(a)) <= FP32_REL
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.part*"))


def test_native_kernel_is_cached_by_source_and_compiler(
    sampler: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A fresh cache directory gets one built library, reused by the next load."""
    if sampler == "pytorch":
        pytest.skip("one run is enough")
    if not shutil.which(os.environ.get("CC", "cc")):
        pytest.skip("needs a C compiler")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv("VSRKIT_HOME", str(tmp_path))
    assert native.library() is not None
    built = list((tmp_path / "kernels").glob("vsrkit_native-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_tried", False)
    assert native.library() is not None
    assert built[0].stat().st_mtime_ns == mtime
    assert not list((tmp_path / "kernels").glob("*.part*"))


class LogitsAlignment(torch.nn.Module):
    """BasicVSR++'s alignment in miniature: offsets and mask from logits, plus a flow."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(16, 16, 3, 3, generator=gen) * 0.1)
        self.bias = torch.nn.Parameter(torch.randn(16, generator=gen))

    def forward(self, x: torch.Tensor, logits: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return deform_conv2d_from_logits(x, logits, self.weight, self.bias, offset_scale=5.0, flows=(flow,))


def _alignment_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 12, 14, generator=gen)
    logits = torch.randn(1, 3 * 2 * 9, 12, 14, generator=gen)  # 2 offset groups
    flow = torch.randn(1, 2, 12, 14, generator=gen) * 2
    return x, logits, flow


def test_export_and_compile_see_the_native_op(sampler: str) -> None:
    """torch.export keeps vsrkit::dcn_im2col in the graph (a fake kernel stands in while tracing);
    torch.compile traces through it; both give the eager result."""
    if sampler == "pytorch":
        pytest.skip("the native path only")
    module = LogitsAlignment().eval()
    inputs = _alignment_inputs()
    calls = []
    real = native.library().vsrkit_dcn_im2col
    with torch.no_grad():
        eager = module(*inputs)
        exported = torch.export.export(module, inputs)
        # The kernel runs with autocast off: its call sits in a subgraph of that region.
        modules = exported.graph_module.modules()
        graphs = [str(gm.graph) for gm in modules if isinstance(gm, torch.fx.GraphModule)]
        assert any("vsrkit.dcn_im2col" in graph for graph in graphs), graphs
        assert torch.equal(exported.module()(*inputs), eager)

        def counting_backend(graph_module: torch.fx.GraphModule, example_inputs):
            calls.append(str(graph_module.graph))
            return graph_module

        compiled = torch.compile(module, backend=counting_backend, fullgraph=True)
        assert torch.equal(compiled(*inputs), eager)
    assert any("vsrkit.dcn_im2col" in graph for graph in calls)
    assert native.library().vsrkit_dcn_im2col is real


def test_a_mismatched_argument_layout_is_refused_loudly(
    sampler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ctypes declaration that disagrees with the C struct (two fields swapped) refuses the
    library with a warning and a reason naming the field; deform_conv2d falls back to PyTorch."""
    if sampler == "pytorch":
        pytest.skip("one run is enough")
    fields = list(native.DcnArgs._fields_)
    h, w = fields.index(("H", fields[2][1])), fields.index(("W", fields[3][1]))
    fields[h], fields[w] = fields[w], fields[h]
    swapped = type("DcnArgs", (native.ctypes.Structure,), {"_fields_": fields})
    monkeypatch.setattr(native, "DcnArgs", swapped)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "unavailable_reason", None)
    with pytest.warns(RuntimeWarning, match="field 2 is 'H'"):
        assert native.library() is None
    assert "DcnArgs" in native.unavailable_reason and "'W'" in native.unavailable_reason
    a = _inputs(1, 16, 8, 2, 9, 10)
    with torch.no_grad():
        assert _rel_diff("fallback", _ours(a), _reference(a)) <= FP32_REL


def test_the_argument_layouts_agree(sampler: str) -> None:
    if sampler == "pytorch":
        pytest.skip("one run is enough")
    lib = native.library()
    native.check_layout(lib, "vsrkit_dcn_args", native.DcnArgs)
    native.check_layout(lib, "vsrkit_nnp_args", native.NnpArgs)
