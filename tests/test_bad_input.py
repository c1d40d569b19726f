"""Every bad input is one line on stderr, exit status 2, no traceback (issue 13).

Option values, config keys and values, devices, checkpoint metadata and pickles, a missing
safetensors module: each through ``vsrkit.cli.main`` as a user would type it, and the option
values also through the Python API, which must refuse them with the same words.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vsrkit
from vsrkit.checks import POSITIVE_INT, arg
from vsrkit.cli import main
from vsrkit.engine import EngineOptions, resolve_device
from vsrkit.errors import VsrkitError
from vsrkit.upscale import upscale
from vsrkit.weights import save_vsrkit

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command; it must fail with status 2 and exactly one line on stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's errors exit from parse_args
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert "error:" in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return vsrkit.create_model(next(iter(vsrkit.MODELS)), mid_channels=8, num_blocks=1)


@pytest.fixture(scope="module")
def tiny_weights(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_vsrkit(tiny_model, path)
    return path


def _vsrkit_file(model: torch.nn.Module, path: Path, arch: str, config: str) -> Path:
    """A vsrkit safetensors file with hand-written metadata (what a damaged or hostile file holds)."""
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "vsrkit-1", "arch": arch, "config": config})
    return path


# ------------------------------------------------------------------------------ upscale options
# Each is refused before the input is read, so the input need not exist.
@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--crf", "99"], "crf for libx264 must be an integer from 0 to 51, got 99"),
        (["--crf", "-1"], "argument --crf: must be an integer ≥ 0, got '-1'"),
        (["--crf", "high"], "argument --crf: must be an integer ≥ 0, got 'high'"),
        (["--state-disk-mb", "nan"], "argument --state-disk-mb: must be a finite number ≥ 0, got 'nan'"),
        (["--state-disk-mb", "inf"], "argument --state-disk-mb: must be a finite number ≥ 0, got 'inf'"),
        (["--state-disk-mb", "-5"], "argument --state-disk-mb: must be a finite number ≥ 0, got '-5'"),
        (["--segment-frames", "0"], "argument --segment-frames: must be an integer ≥ 1, got '0'"),
        (["--window-frames", "1"], "argument --window-frames: must be an integer ≥ 2, got '1'"),
        (["--window-overlap", "-8"], "argument --window-overlap: must be an integer ≥ 0, got '-8'"),
        (
            ["--window-frames", "8", "--window-overlap", "8"],
            "window_overlap must be smaller than window_frames",
        ),
        (["--device", "foo"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'foo'"),
        (["--precision", "fp64"], "argument --precision: invalid choice: 'fp64'"),
        (["--model", "srgan"], "argument --model: invalid choice: 'srgan'"),
    ],
)
def test_upscale_option_values(options, needle, tmp_path, capsys) -> None:
    out = tmp_path / "out.mp4"
    line = one_line_error(["upscale", str(tmp_path / "in.mp4"), str(out), "--quiet", *options], capsys)
    assert needle in line
    assert list(tmp_path.iterdir()) == []


def test_crf_range_follows_the_codec(tmp_path, capsys) -> None:
    # 60 is beyond x264's scale but within VP9's: for .webm it passes, and the missing input is next.
    line = one_line_error(
        ["upscale", str(tmp_path / "in.mp4"), str(tmp_path / "o.webm"), "--crf", "60"], capsys
    )
    assert "must be an integer" not in line and "not found" in line
    line = one_line_error(
        ["upscale", str(tmp_path / "in.mp4"), str(tmp_path / "o.webm"), "--crf", "64"], capsys
    )
    assert "crf for libvpx-vp9 must be an integer from 0 to 63, got 64" in line
    line = one_line_error(
        ["upscale", str(tmp_path / "in.mp4"), str(tmp_path / "o.mkv"), "--codec", "libx265", "--crf", "52"],
        capsys,
    )
    assert "crf for libx265 must be an integer from 0 to 51, got 52" in line


def test_absent_gpu_is_one_line(tmp_path, capsys) -> None:
    line = one_line_error(
        ["upscale", str(tmp_path / "in.mp4"), str(tmp_path / "o.mp4"), "--device", "cuda:7"], capsys
    )
    assert "device cuda:7 was asked for" in line
    if torch.cuda.is_available() and torch.cuda.device_count() <= 7:
        assert f"this machine has {torch.cuda.device_count()} CUDA GPU(s)" in line
    else:
        assert "no CUDA GPU is available" in line


def test_api_refuses_the_same_values(tmp_path) -> None:
    out = tmp_path / "out.mp4"
    cases = [
        ({"crf": 99}, "crf for libx264 must be an integer from 0 to 51, got 99"),
        ({"state_disk_mb": math.nan}, "state_disk_mb must be a finite number ≥ 0, got nan"),
        ({"segment_frames": 0}, "segment_frames must be an integer ≥ 1, got 0"),
        ({"segment_frames": 2.5}, "segment_frames must be an integer ≥ 1, got 2.5"),
        ({"window_overlap": -8}, "window_overlap must be an integer ≥ 0, got -8"),
        ({"device": "foo"}, "device must be auto, cpu, cuda or cuda:N, got 'foo'"),
        ({"precision": "fp64"}, "precision must be one of fp32, bf16, fp16, got 'fp64'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(VsrkitError) as info:
            upscale(tmp_path / "in.mp4", out, **kwargs)
        assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(VsrkitError, match="state_disk_mb must be a finite number ≥ 0, got inf"):
        EngineOptions(state_disk_mb=math.inf)
    with pytest.raises(VsrkitError, match="flow_batch must be an integer ≥ 1, got 0"):
        EngineOptions(flow_batch=0)
    with pytest.raises(VsrkitError, match="got 'foo'"):
        resolve_device("foo")
    assert not out.exists()


def test_argparse_type_and_api_share_the_words() -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError) as info:
        arg(POSITIVE_INT)("0")
    with pytest.raises(VsrkitError) as api:
        POSITIVE_INT(0, "k")
    assert str(info.value) == "must be an integer ≥ 1, got '0'"
    assert str(api.value) == "k must be an integer ≥ 1, got 0"
    assert POSITIVE_INT("3", "k") == 3
    with pytest.raises(VsrkitError):
        POSITIVE_INT(True, "k")  # a boolean is not a count


# ------------------------------------------------------------------------------ eval options
@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--crop-border", "-1"], "argument --crop-border: must be an integer ≥ 0, got '-1'"),
        (["--max-frames", "0"], "argument --max-frames: must be an integer ≥ 1, got '0'"),
        (["--device", "gpu"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["--space", "yuv"], "argument --space: must be one of y, rgb, got 'yuv'"),
        (["--set", "mid_chanels=16"], "option mid_chanels (did you mean mid_channels?)"),
        (["--set", "mid_channels=0"], "option mid_channels must be an integer from 1 to 1024, got 0"),
        (["--set", "alignment=magic"], "option alignment must be one of feature, image, none"),
    ],
)
def test_eval_option_values(options, needle, tiny_model, tiny_weights, tmp_path, capsys) -> None:
    argv = ["eval", "--model", tiny_model.arch, "--weights", str(tiny_weights), "--dataset", "vid4"]
    line = one_line_error([*argv, "--root", str(tmp_path), "--no-progress", *options], capsys)
    assert needle in line


# ------------------------------------------------------------------------------ train configs
def test_every_shipped_config_loads() -> None:
    from vsrkit.train import load_config

    paths = sorted(CONFIGS.glob("*.yaml"))
    assert paths
    for path in paths:
        load_config(path)


def test_typo_in_a_nested_config_key_is_refused(tmp_path, capsys) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text(f"base: {CONFIGS / 'tiny_cpu.yaml'}\ntrain:\n  iteration: 5\n")
    work = tmp_path / "work"
    line = one_line_error(["train", str(config), "--work-dir", str(work)], capsys)
    assert f"config {config}: unknown key train.iteration (did you mean train.iterations?)" in line
    assert not work.exists()  # refused before anything was made

    config.write_text(f"base: {CONFIGS / 'tiny_cpu.yaml'}\nmodel:\n  mid_chanels: 8\n")
    line = one_line_error(["train", str(config), "--work-dir", str(work)], capsys)
    assert "option model.mid_chanels (did you mean model.mid_channels?)" in line

    config.write_text("trian: {iterations: 5}\n")
    line = one_line_error(["train", str(config), "--work-dir", str(work)], capsys)
    assert "unknown key trian (did you mean train?)" in line

    config.write_text("data: {flip: {horizontal: true}}\n")
    line = one_line_error(["train", str(config), "--work-dir", str(work)], capsys)
    assert "data.flip must be true or false" in line


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            "train.iteration=5",
            "--set train.iteration=5: unknown key train.iteration (did you mean train.iterations?)",
        ),
        ("optim.lr=-0.001", "--set: optim.lr must be a finite number > 0, got -0.001"),
        ("optim.lr=.nan", "--set: optim.lr must be a finite number > 0, got nan"),
        ("train.iterations=0", "--set: train.iterations must be an integer ≥ 1, got 0"),
        ("data.batch_size=two", "--set: data.batch_size must be an integer ≥ 1, got 'two'"),
        ("train.ema_decay=1.5", "--set: train.ema_decay must be a finite number from 0 to 1, got 1.5"),
        ("optim.betas=[0.9]", "--set: optim.betas must be a list of 2 items"),
        ("optim.betas=[0.9, 1.5]", "--set: optim.betas[1] must be a finite number ≥ 0 and < 1, got 1.5"),
        ("optim.lr_mult.spynet=-1", "--set: optim.lr_mult.spynet must be a finite number ≥ 0, got -1"),
        ("model.mid_channels=1000000000", "--set: model.mid_channels must be an integer from 1 to 1024"),
        ("data.layout=redz", "--set: data.layout must be one of videos, "),
        ("train.device=tpu", "--set: train.device must be one of auto, cpu, cuda, got 'tpu'"),
    ],
)
def test_train_values(override, needle, tmp_path, capsys) -> None:
    work = tmp_path / "work"
    argv = ["train", str(CONFIGS / "tiny_cpu.yaml"), "--work-dir", str(work), "--set", override]
    assert needle in one_line_error(argv, capsys)
    assert not work.exists()


def test_numbers_yaml_reads_as_text_are_taken() -> None:
    from vsrkit.train import load_config

    cfg = load_config(CONFIGS / "tiny_cpu.yaml", ["optim.lr=1e-4", "train.iterations=3e2"])
    assert cfg["optim"]["lr"] == 1e-4 and cfg["train"]["iterations"] == 300


# ------------------------------------------------------------------------------ checkpoints
_RANGE = "must be an integer from 1 to 1024"


@pytest.mark.parametrize(
    ("config", "arch", "needle"),
    [
        ({"mid_channels": 10**9, "num_blocks": 1}, None, f"config.mid_channels {_RANGE}, got 1000000000"),
        ({"mid_channels": -8, "num_blocks": 1}, None, f"config.mid_channels {_RANGE}, got -8"),
        ({"mid_channels": "wide", "num_blocks": 1}, None, f"config.mid_channels {_RANGE}, got 'wide'"),
        ({"mid_chanels": 8}, None, "option config.mid_chanels (did you mean config.mid_channels?)"),
        ({"mid_channels": 8, "alignment": 3}, None, "config.alignment must be one of feature, image, none"),
        ("{not json", None, "metadata config is not a JSON object of options"),
        ("[8, 1]", None, "metadata config is not a JSON object of options"),
        ({"mid_channels": 8}, "srgan", "metadata arch is 'srgan', not one of"),
    ],
)
def test_checkpoint_metadata(config, arch, needle, tiny_model, tmp_path, capsys) -> None:
    text = config if isinstance(config, str) else json.dumps(config)
    bad = _vsrkit_file(tiny_model, tmp_path / "bad.safetensors", arch or tiny_model.arch, text)
    line = one_line_error(["convert", str(bad), str(tmp_path / "out.safetensors")], capsys)
    assert str(bad) in line and needle in line


def test_forged_tensor_shapes_are_checked_before_building(tiny_model, tmp_path, capsys) -> None:
    # A stride-0 tensor claims a million channels in a few bytes; the model built from the
    # inferred config would need terabytes.
    state = dict(tiny_model.state_dict())
    key = "forward_trunk.main.0.weight"
    state[key] = torch.zeros(1).expand(10**6, 10**6 + 3, 3, 3)
    forged = tmp_path / "forged.pth"
    torch.save({"params": state}, forged)
    line = one_line_error(["convert", str(forged), str(tmp_path / "out.safetensors")], capsys)
    assert str(forged) in line and "mid_channels must be an integer from 1 to 1024, got 1000000" in line


class _RunsCode:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hostile_pickle_is_called_unsafe_not_corrupt(tiny_model, tmp_path, capsys) -> None:
    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({"params": tiny_model.state_dict(), "extra": _RunsCode(marker)}, hostile)
    line = one_line_error(["convert", str(hostile), str(tmp_path / "out.safetensors")], capsys)
    assert "contains pickled objects that safe loading refuses (weights_only=True)" in line
    assert "corrupt" not in line and str(hostile) in line
    assert not marker.exists()

    # The same through the API, which every command's --weights goes through.
    with pytest.raises(VsrkitError, match=r"safe loading refuses \(weights_only=True\)"):
        vsrkit.create_model(tiny_model.arch, checkpoint=hostile)
    assert not marker.exists()


def test_hostile_training_checkpoint_on_resume(tmp_path, capsys) -> None:
    marker = tmp_path / "code_ran"
    latest = tmp_path / "work" / "checkpoints" / "latest.pth"
    latest.parent.mkdir(parents=True)
    torch.save({"format": "vsrkit-train-1", "extra": _RunsCode(marker)}, latest)
    argv = ["train", str(CONFIGS / "tiny_cpu.yaml"), "--work-dir", str(tmp_path / "work"), "--resume"]
    line = one_line_error(argv, capsys)
    assert str(latest) in line and "safe loading refuses (weights_only=True)" in line
    assert not marker.exists()


def test_truncated_checkpoint_is_still_called_corrupt(tiny_model, tmp_path, capsys) -> None:
    good = tmp_path / "good.pth"
    torch.save({"params": tiny_model.state_dict()}, good)
    data = good.read_bytes()
    for name, content in [("truncated.pth", data[: len(data) // 2]), ("noise.pth", os.urandom(4096))]:
        broken = tmp_path / name
        broken.write_bytes(content)
        line = one_line_error(["convert", str(broken), str(tmp_path / "out.safetensors")], capsys)
        assert "corrupt or truncated" in line and "safe loading" not in line and name in line


def test_missing_safetensors_says_what_to_install(
    tiny_model, tiny_weights, tmp_path, capsys, monkeypatch
) -> None:
    basicsr = tmp_path / "tiny.pth"
    torch.save({"params": tiny_model.state_dict()}, basicsr)
    # None in sys.modules makes `import safetensors` fail as if it were not installed.
    for name in [m for m in sys.modules if m == "safetensors" or m.startswith("safetensors.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    out = tmp_path / "out.safetensors"
    line = one_line_error(["convert", str(basicsr), str(out)], capsys)
    assert "needs the safetensors package" in line and "pip install safetensors" in line
    assert not out.exists()
    line = one_line_error(["convert", str(tiny_weights), str(tmp_path / "again.safetensors")], capsys)
    assert "pip install safetensors" in line and str(tiny_weights) in line


def test_other_commands(tmp_path, capsys) -> None:
    assert "argument --arch: invalid choice" in one_line_error(["weights", "--arch", "srgan"], capsys)
    assert "argument --arch: invalid choice" in one_line_error(["convert", "a", "b", "--arch", "x"], capsys)
    assert "no_such_weights" in one_line_error(["weights", "no_such_weights"], capsys)
    assert "invalid choice: 'upscal'" in one_line_error(["upscal"], capsys)
