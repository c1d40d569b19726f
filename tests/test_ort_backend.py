"""`vsrkit upscale --backend onnxruntime`: the engine streams, tiles and windows exported step graphs.

The bound is the issue's: 8-bit output within 50 dB PSNR of the PyTorch backend (the graphs differ
from PyTorch by float32 reordering, ~1e-5, which flips a rare rounding). Tiny perturbed models, 8
real REDS frames cropped to 72×88, segments of 3 frames, BasicVSR++ windows of 2 frames (its
window graph has the frame count fixed: the smaller, the faster the export).

Exporting dominates the time (tens of seconds per graph on 2 cores): the file's tests share one
cache folder, so BasicVSR's four graphs are exported once, by the first test that needs them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import vsrkit
from vsrkit.cli import main
from vsrkit.weights import save_vsrkit

FRAMES = 8
CROP = (72, 88)  # LR height, width: above the 64-pixel tile minimum, so --tile 64 makes 4 tiles


@pytest.fixture(scope="module")
def vsrkit_home(tmp_path_factory):
    """A private cache folder (``$VSRKIT_HOME``) for the file's tests."""
    home = tmp_path_factory.mktemp("vsrkit_home")
    before = os.environ.get("VSRKIT_HOME")
    os.environ["VSRKIT_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("VSRKIT_HOME", None)
    else:
        os.environ["VSRKIT_HOME"] = before


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """Tiny models whose every weight is perturbed (zero-initialised offsets would hide the DCNs)."""
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for seed, arch in enumerate(("basicvsr", "basicvsr_pp", "iconvsr")):
        torch.manual_seed(seed)
        extra = {"edvr_channels": 8} if arch == "iconvsr" else {}
        model = vsrkit.create_model(arch, mid_channels=8, num_blocks=1, **extra)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        paths[arch] = folder / f"tiny_{arch}.safetensors"
        save_vsrkit(model, paths[arch])
    return paths


@pytest.fixture(scope="module")
def lr_frames(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lr")
    for f in sorted((shared_data / "reds_lr_000").glob("*.png"))[:FRAMES]:
        frame = np.asarray(Image.open(f).convert("RGB"))[40 : 40 + CROP[0], 100 : 100 + CROP[1]]
        Image.fromarray(np.ascontiguousarray(frame)).save(folder / f.name)
    return folder


@pytest.fixture(scope="module")
def short_clip(lr_frames, tmp_path_factory):
    """The first 3 of those frames: enough to load or export every graph, quicker to run."""
    folder = tmp_path_factory.mktemp("short")
    for f in sorted(lr_frames.glob("*.png"))[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def upscale(frames, out, arch, weights, capsys, *options: str) -> np.ndarray:
    code = main(
        ["upscale", str(frames), str(out), "--model", arch, "--weights", str(weights), "--quiet", *options]
    )
    assert code == 0, capsys.readouterr().err
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def graph_files(home) -> dict[str, tuple[int, int]]:
    """Every cached graph: name → (inode, mtime_ns)."""
    return {
        str(p.relative_to(home)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted((home / "onnx").rglob("*.onnx"))
    }


STREAMED = {
    "basicvsr": ["--segment-frames", "3", "--tile", "0"],
    "basicvsr_pp": ["--window-frames", "2", "--window-overlap", "1", "--tile", "0"],
    # Keyframes 0, 5 and 7 (stride 5, and the last frame): refills in two different segments.
    "iconvsr": ["--segment-frames", "3", "--tile", "0"],
}


@pytest.mark.parametrize("arch", list(STREAMED))
def test_streamed_onnxruntime_output_matches_pytorch(
    arch, lr_frames, tiny_weights, vsrkit_home, tmp_path, capsys
):
    options = STREAMED[arch]
    torch_out = upscale(lr_frames, tmp_path / "pt", arch, tiny_weights[arch], capsys, *options)
    ort_out = upscale(
        lr_frames, tmp_path / "ort", arch, tiny_weights[arch], capsys, "--backend", "onnxruntime", *options
    )
    assert ort_out.shape == torch_out.shape == (FRAMES, 4 * CROP[0], 4 * CROP[1], 3)
    value = psnr(ort_out, torch_out)
    print(f"{arch}: onnxruntime vs PyTorch {value:.1f} dB")
    assert value >= 50
    assert any(name.startswith(f"onnx/{arch}-") for name in graph_files(vsrkit_home))


def test_tiled_run_reuses_the_cached_graphs(short_clip, tiny_weights, vsrkit_home, tmp_path, capsys):
    weights = tiny_weights["basicvsr"]
    tiled = ["--tile", "64", "--tile-overlap", "8", "--segment-frames", "2"]
    # Exports the graphs if no earlier test did.
    upscale(short_clip, tmp_path / "first", "basicvsr", weights, capsys, "--backend", "onnxruntime")
    before = graph_files(vsrkit_home)
    capsys.readouterr()
    ort_out = upscale(
        short_clip, tmp_path / "ort", "basicvsr", weights, capsys, "--backend", "onnxruntime", *tiled
    )
    assert "exporting" not in capsys.readouterr().err
    assert graph_files(vsrkit_home) == before  # nothing exported or rewritten
    torch_out = upscale(short_clip, tmp_path / "pt", "basicvsr", weights, capsys, *tiled)
    value = psnr(ort_out, torch_out)
    print(f"tiled: onnxruntime vs PyTorch {value:.1f} dB")
    assert value >= 50


def test_damaged_cached_graph_is_exported_again(short_clip, tiny_weights, vsrkit_home, tmp_path, capsys):
    weights = tiny_weights["basicvsr"]
    ort = ["--backend", "onnxruntime", "--tile", "0", "--segment-frames", "2"]
    first = upscale(short_clip, tmp_path / "first", "basicvsr", weights, capsys, *ort)
    before = graph_files(vsrkit_home)
    damaged = next(name for name in before if "basicvsr-" in name and "/reconstruct." in name)
    path = vsrkit_home / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    again = upscale(short_clip, tmp_path / "again", "basicvsr", weights, capsys, *ort)
    err = capsys.readouterr().err
    assert "damaged" in err and damaged.split("/")[-1] in err
    after = graph_files(vsrkit_home)
    assert after.keys() == before.keys()
    assert [name for name in after if after[name] != before[name]] == [damaged]
    assert np.array_equal(again, first)


def test_bad_backend_options_are_one_line(lr_frames, tiny_weights, vsrkit_home, tmp_path, capsys):
    cases = [
        (["--backend", "onnxruntime", "--providers", "NoSuchExecutionProvider"], "NoSuchExecutionProvider"),
        (["--providers", "CPUExecutionProvider"], "--providers goes with --backend onnxruntime"),
        (["--backend", "onnxruntime", "--precision", "bf16"], "fp32 only"),
    ]
    for options, message in cases:
        code = main(
            ["upscale", str(lr_frames), str(tmp_path / "out"), "--model", "basicvsr"]
            + ["--weights", str(tiny_weights["basicvsr"]), "--quiet", *options]
        )
        err = capsys.readouterr().err
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vsrkit: error:") and message in lines[0], err
        if "NoSuch" in message:
            assert "CPUExecutionProvider" in lines[0]  # names the available ones
    assert not (tmp_path / "out").exists()
