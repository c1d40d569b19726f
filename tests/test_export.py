"""`vsrkit export`: the ONNX file gives vsrkit's PyTorch output at any frame size, in onnxruntime
(ONNX DeformConv) and in OpenVINO (the decomposed deformable convs); bad input is one line.

Tolerance: max |diff| <= 1e-3 on outputs in [0, 1]-ish range (the issue's bound); measured
1e-5 to 5e-5 with the tiny perturbed models, from float32 reordering in the runtimes' kernels.
Two frame sizes per file: one below BasicVSR++'s 64-pixel minimum and a multiple of 4, one above
it and not a multiple of 4, so each model's padding runs both ways in the same graph.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import vsrkit
from vsrkit.cli import main
from vsrkit.errors import VsrkitError
from vsrkit.export import file_sha256
from vsrkit.models import MODELS, model_config
from vsrkit.models.basicvsr_pp import BasicVSRPlusPlus
from vsrkit.ops import deform_conv as dc
from vsrkit.weights import save_vsrkit

SIZES = [(36, 44), (66, 70)]
TOLERANCE = 1e-3


def _arch_of(cls: type) -> str:
    return next(name for name, model_cls in MODELS.items() if model_cls is cls)


def _tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A small model whose weights are all perturbed (zero-initialised offsets would hide the DCNs)."""
    torch.manual_seed(seed)
    extra = {"edvr_channels": 8} if "edvr_channels" in model_config(arch) else {}
    model = vsrkit.create_model(arch, mid_channels=8, num_blocks=1, **extra).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _frames(model: torch.nn.Module) -> int:
    return max(2, getattr(model, "min_frames", 1))


def _count_deform_convs(model: torch.nn.Module, frames: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many deformable convs one eager forward runs (every CPU call goes through one function)."""
    calls = []
    real = dc._deform_conv2d_cpu

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(dc, "_deform_conv2d_cpu", counting)
        with torch.no_grad():
            model(torch.rand(1, frames, 3, 32, 32))
    return len(calls)


def _max_diff_at_sizes(run, model: torch.nn.Module, frames: int) -> list[float]:
    diffs = []
    for seed, (h, w) in enumerate(SIZES):
        lq = torch.rand(1, frames, 3, h, w, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = model(lq).numpy()
        got = run(lq.numpy())
        assert got.shape == expected.shape
        diffs.append(float(np.abs(got - expected).max()))
    return diffs


def _onnxruntime_runner(path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda lq: session.run(["hq"], {"lq": lq})[0]


@pytest.mark.parametrize("arch", list(MODELS))
def test_export_runs_in_onnxruntime_at_two_sizes(arch, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    model = _tiny_model(arch)
    weights = tmp_path / "tiny.safetensors"
    save_vsrkit(model, weights)
    frames = _frames(model)
    out = tmp_path / "model.onnx"

    assert (
        main(["export", "--model", arch, "--weights", str(weights), "--frames", str(frames), str(out)]) == 0
    )
    assert "checked and run in onnxruntime" in capsys.readouterr().out
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left

    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["vsrkit.arch"] == arch
    assert json.loads(meta["vsrkit.config"]) == json.loads(json.dumps(model.config))
    assert meta["vsrkit.weights"] == weights.name
    assert meta["vsrkit.weights_sha256"] == file_sha256(weights)
    deform_nodes = sum(node.op_type == "DeformConv" for node in proto.graph.node)
    assert deform_nodes == _count_deform_convs(model, frames, monkeypatch)

    diffs = _max_diff_at_sizes(_onnxruntime_runner(out), model, frames)
    print(f"{arch}: {deform_nodes} DeformConv nodes, max|diff| at {SIZES}: {diffs}")
    assert max(diffs) <= TOLERANCE


def test_decomposed_export_runs_in_openvino(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ov = pytest.importorskip("openvino")
    from vsrkit.export import export_onnx

    model = _tiny_model(_arch_of(BasicVSRPlusPlus), seed=1)
    out = tmp_path / "decomposed.onnx"
    summary = export_onnx(model, out, frames=2, deform_conv="decomposed")
    assert summary["deform_conv_nodes"] == 0
    assert "GridSample" in {node.op_type for node in onnx.load(str(out)).graph.node}

    compiled = ov.Core().compile_model(str(out), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    diffs = _max_diff_at_sizes(lambda lq: compiled([lq])[0], model, 2)
    print(f"OpenVINO, decomposed: max|diff| at {SIZES}: {diffs}")
    assert max(diffs) <= TOLERANCE


@pytest.mark.slow
def test_official_basicvsr_weights_export(tmp_path, capsys):
    """The default weights of `vsrkit export` (BasicVSR REDS, fetched as `vsrkit upscale` does)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    from vsrkit.hub import get_weights
    from vsrkit.upscale import DEFAULT_WEIGHTS_FOR

    arch = next(iter(MODELS))
    out = tmp_path / "official.onnx"
    assert main(["export", "--model", arch, "--frames", "2", str(out)]) == 0
    model = vsrkit.create_model(arch, checkpoint=DEFAULT_WEIGHTS_FOR[arch])
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["vsrkit.weights"] == DEFAULT_WEIGHTS_FOR[arch]
    assert meta["vsrkit.weights_sha256"] == file_sha256(get_weights(DEFAULT_WEIGHTS_FOR[arch])[0])
    diffs = _max_diff_at_sizes(_onnxruntime_runner(out), model, 2)
    print(f"official {arch} weights: max|diff| at {SIZES}: {diffs}")
    assert max(diffs) <= TOLERANCE


# -- one-line errors ------------------------------------------------------------------------------
@pytest.fixture
def tiny_weights(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_vsrkit(_tiny_model(next(iter(MODELS))), path)
    return path


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vsrkit: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("package", ["onnx", "onnxruntime", "onnxscript"])
def test_missing_onnx_package_is_one_line(package, tiny_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    out = tmp_path / "m.onnx"
    err = _one_line_error(capsys, ["export", "--weights", str(tiny_weights), str(out)])
    assert package in err and "vsrkit[onnx]" in err
    assert not out.exists()


def test_existing_output_is_refused(tiny_weights, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the user's file")
    err = _one_line_error(capsys, ["export", "--weights", str(tiny_weights), str(out)])
    assert "exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"the user's file"


@pytest.mark.parametrize(
    "setting, message",
    [("no_such_option=3", "option no_such_option"), ("mid_channels", "KEY=VALUE"), ("num_blocks=[1", "")],
)
def test_bad_set_is_one_line(setting, message, tiny_weights, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    err = _one_line_error(capsys, ["export", "--weights", str(tiny_weights), "--set", setting, str(out)])
    assert message in err
    assert not out.exists()


def test_leftovers_of_a_killed_export_are_removed(tmp_path):
    from vsrkit.export import export_onnx
    from vsrkit.fsutil import owner_tag

    host = owner_tag().split("-")[1]
    out = tmp_path / "m.onnx"
    out.write_bytes(b"a user's file")
    dead = tmp_path / f".m.partial-{2**22 + 12345}-{host}-0badc0de.onnx"  # above Linux's pid_max default
    dead.write_bytes(b"partial")
    other = tmp_path / ".other.onnx.1.0badc0de.partial"
    other.write_bytes(b"not ours")
    with pytest.raises(VsrkitError, match="exists"):
        export_onnx(vsrkit.create_model("basicvsr", mid_channels=8, num_blocks=1), out)
    assert not dead.exists() and other.exists() and out.read_bytes() == b"a user's file"
