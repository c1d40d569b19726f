"""`vsrkit upscale` end to end on real footage, and every bad input as a one-line error."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

import vsrkit
from vsrkit.cli import main
from vsrkit.data.degradations import bi_degrade
from vsrkit.data.video import open_frames, open_writer
from vsrkit.weights import save_vsrkit


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for arch in ("basicvsr", "iconvsr", "basicvsr_pp"):
        extra = {"edvr_channels": 8} if arch == "iconvsr" else {}
        model = vsrkit.create_model(arch, mid_channels=8, num_blocks=1, **extra)
        paths[arch] = folder / f"tiny_{arch}.safetensors"
        save_vsrkit(model, paths[arch])
    return paths


@pytest.fixture(scope="module")
def lr_clip(shared_data, tmp_path_factory):
    """The first 12 frames of OpenCV's real cup.mp4, MATLAB-bicubic ×1/4, with its AAC audio."""
    out = tmp_path_factory.mktemp("clips") / "cup_lr.mp4"
    with open_frames(shared_data / "videos" / "cup.mp4") as source:
        with open_writer(out, source=source, crf=12) as writer:
            for i, frame in enumerate(source):
                if i == 12:
                    break
                writer.write(np.ascontiguousarray(bi_degrade(frame)))
    return out


def probe(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = sum(1 for _ in c.decode(v))
        return {
            "size": (v.codec_context.width, v.codec_context.height),
            "frames": frames,
            "rate": v.average_rate,
            "audio": [s.codec_context.name for s in c.streams.audio],
        }


@pytest.mark.parametrize("arch", ["basicvsr", "iconvsr", "basicvsr_pp"])
def test_upscale_real_clip_keeps_frames_rate_and_audio(arch, lr_clip, tiny_weights, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    code = main(
        ["upscale", str(lr_clip), str(out), "--model", arch, "--weights", str(tiny_weights[arch]), "--quiet"]
    )
    assert code == 0, capsys.readouterr().err
    src, dst = probe(lr_clip), probe(out)
    print(f"{arch}: {src} -> {dst}")
    assert dst["size"] == (4 * src["size"][0], 4 * src["size"][1])
    assert dst["frames"] == src["frames"] == 12
    assert Fraction(dst["rate"]) == Fraction(src["rate"])
    assert dst["audio"] == ["aac"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_upscale_to_png_folder_and_from_image_folder(shared_data, tiny_weights, tmp_path, capsys):
    src = tmp_path / "frames"
    src.mkdir()
    for f in sorted((shared_data / "reds_lr_000").glob("*.png"))[:3]:
        (src / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out_frames"
    assert main(["upscale", str(src), str(out), "--weights", str(tiny_weights["basicvsr"]), "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 3
    from PIL import Image

    assert Image.open(out / names[0]).size == (1280, 720)


def test_console_command_runs_in_a_subprocess(lr_clip, tiny_weights, tmp_path):
    out = tmp_path / "x4.mkv"
    cmd = [
        sys.executable,
        "-m",
        "vsrkit",
        "upscale",
        str(lr_clip),
        str(out),
        "--weights",
        str(tiny_weights["basicvsr"]),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and out.is_file()
    assert "upscaling" in done.stderr  # the progress bar


def _expect_user_error(argv, capsys, needle, folder):
    before = sorted(p.name for p in folder.iterdir())
    code = main(argv)
    err = capsys.readouterr().err.strip()
    print(err)
    assert code == 2
    assert err.startswith("vsrkit: error:") and "\n" not in err and "Traceback" not in err
    assert needle in err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing left behind


def test_bad_inputs_are_one_line_errors(lr_clip, tiny_weights, tmp_path, capsys, shared_data):
    w = ["--weights", str(tiny_weights["basicvsr"]), "--quiet"]
    out = str(tmp_path / "out.mp4")

    _expect_user_error(["upscale", str(tmp_path / "missing.mp4"), out, *w], capsys, "not found", tmp_path)

    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    _expect_user_error(["upscale", str(text), out, *w], capsys, "notes.mp4", tmp_path)

    truncated = tmp_path / "truncated.mp4"
    data = (shared_data / "videos" / "cup.mp4").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _expect_user_error(["upscale", str(truncated), out, *w], capsys, "truncated.mp4", tmp_path)

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    _expect_user_error(["upscale", str(empty), out, *w], capsys, "empty_folder", tmp_path)

    audio_only = tmp_path / "audio_only.mp4"
    with av.open(str(audio_only), "w") as c:
        stream = c.add_stream("aac", rate=44100)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 44100
        c.mux(stream.encode(frame))
        c.mux(stream.encode())
    _expect_user_error(["upscale", str(audio_only), out, *w], capsys, "audio_only.mp4", tmp_path)

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _expect_user_error(["upscale", str(lr_clip), str(blocker / "out.mp4"), *w], capsys, "out.mp4", tmp_path)

    existing = tmp_path / "existing.mp4"
    existing.write_bytes(b"precious")
    _expect_user_error(["upscale", str(lr_clip), str(existing), *w], capsys, "--overwrite", tmp_path)
    assert existing.read_bytes() == b"precious"

    _expect_user_error(
        ["upscale", str(lr_clip), out, "--weights", "no_such_weights", "--quiet"],
        capsys,
        "no_such_weights",
        tmp_path,
    )
    _expect_user_error(
        [
            "upscale",
            str(lr_clip),
            out,
            "--model",
            "iconvsr",
            "--weights",
            str(tiny_weights["basicvsr"]),
            "--quiet",
        ],
        capsys,
        "basicvsr",
        tmp_path,
    )

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x04not a checkpoint")
    _expect_user_error(
        ["upscale", str(lr_clip), out, "--weights", str(corrupt), "--quiet"], capsys, "corrupt.pth", tmp_path
    )

    tiny_frames = tmp_path / "tiny_frames"
    tiny_frames.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (7, 5)).save(tiny_frames / f"{i}.png")
    _expect_user_error(["upscale", str(tiny_frames), out, *w], capsys, "too small", tmp_path)


def test_offline_default_weights_error_names_url_and_path(lr_clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VSRKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VSRKIT_OFFLINE", "1")
    monkeypatch.delenv("VSRKIT_WHEELHOUSE", raising=False)
    code = main(["upscale", str(lr_clip), str(tmp_path / "o.mp4"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "BasicVSR_REDS4" in err and str(tmp_path / "home") in err
