"""`--scene-cuts`: cuts found on real footage, propagation reset at each, shots joined exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

import vsrkit
from vsrkit.cli import main
from vsrkit.data.degradations import bi_degrade
from vsrkit.data.video import open_frames, open_writer, read_all_frames
from vsrkit.engine import Upscaler
from vsrkit.fsutil import owner_tag
from vsrkit.scenes import _hsv, detect_shots, join_segments, run_shots
from vsrkit.upscale import upscale
from vsrkit.weights import save_vsrkit

SHOT_FRAMES = 6


def lr_frames(path, count, crop=None):
    """The first ``count`` frames of a real clip, cropped to 640×480, MATLAB-bicubic ×1/4."""
    out = []
    with open_frames(path) as source:
        for frame in source:
            frame = frame[: crop[0], : crop[1]] if crop else frame
            out.append(np.ascontiguousarray(bi_degrade(frame)))
            if len(out) == count:
                break
    return out


def make_three_shot_film(videos, path, shot_frames=SHOT_FRAMES):
    """Three real shots (cup, box, street) with cup's timing and AAC audio: cuts at 6 and 12."""
    frames = (
        lr_frames(videos / "cup.mp4", shot_frames)
        + lr_frames(videos / "box.mp4", shot_frames)
        + lr_frames(videos / "vtest.avi", shot_frames, crop=(480, 640))
    )
    with open_frames(videos / "cup.mp4") as source, open_writer(path, source=source, crf=12) as writer:
        for frame in frames:
            writer.write(frame)
    return path


@pytest.fixture(scope="module")
def three_shot_film(shared_data, tmp_path_factory):
    return make_three_shot_film(shared_data / "videos", tmp_path_factory.mktemp("film") / "film.mp4")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_basicvsr.safetensors"
    save_vsrkit(vsrkit.create_model("basicvsr", mid_channels=8, num_blocks=1), path)
    return path


def video_timing(path):
    """Decoded frames' timestamps, and the audio packets' (stream, pts, size)."""
    with av.open(str(path)) as container:
        frames = [f.pts for f in container.decode(container.streams.video[0])]
    with av.open(str(path)) as container:
        audio = [(p.pts, p.size) for p in container.demux(container.streams.audio[0]) if p.size]
    return frames, audio


def test_hsv_uses_opencv_scales():
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [0, 0, 0]]], np.uint8)
    hue, saturation, value = _hsv(colours)
    assert hue[0].tolist() == [0, 60, 120, 0, 0]  # OpenCV's 8-bit hue is degrees / 2
    assert saturation[0].tolist() == [255, 255, 255, 0, 0]
    assert value[0].tolist() == [255, 255, 255, 128, 0]


def test_cuts_found_on_real_shots_and_none_inside_one(three_shot_film, shared_data):
    with open_frames(three_shot_film) as source:
        assert detect_shots(source, min_shot_frames=4) == [(0, 6), (6, 12), (12, 18)]
        # The minimum shot length suppresses cuts closer than it to the previous one.
        assert detect_shots(source, min_shot_frames=8) == [(0, 12), (12, 18)]
    one_shot = lr_frames(shared_data / "videos" / "cup.mp4", 18)
    assert detect_shots(one_shot) == [(0, 18)]


def test_propagation_is_reset_at_each_cut(three_shot_film, tiny_weights):
    model = vsrkit.create_model(checkpoint=tiny_weights)
    frames = list(read_all_frames(three_shot_film))
    engine = Upscaler(model, device="cpu")
    shots = [(0, 6), (6, 12), (12, 18)]
    per_shot = np.stack(list(run_shots(engine, frames, shots)))
    for start, stop in shots:
        alone = np.stack(list(engine.run(frames[start:stop])))
        assert np.array_equal(per_shot[start:stop], alone)
    through = np.stack(list(engine.run(frames)))
    assert not np.array_equal(per_shot[5], through[5])  # the backward branch no longer sees the next shot


def test_upscale_scene_cuts_keeps_frames_timing_and_audio(three_shot_film, tiny_weights, tmp_path, capsys):
    out = tmp_path / "film_x4.mp4"
    # Shot folders of runs on this host: one whose process is gone (killed), one still running.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = owner_tag().split("-")[1]
    stale = tmp_path / f".old.mp4.shots-{dead.pid}-{host}-abc12345"
    live = tmp_path / f".other.mp4.shots-{os.getpid()}-{host}-def45678"
    stale.mkdir()
    (stale / "shot-00000000.mp4").write_bytes(b"")
    live.mkdir()
    argv = ["upscale", str(three_shot_film), str(out), "--weights", str(tiny_weights), "--quiet"]
    assert main([*argv, "--scene-cuts", "--min-shot-frames", "4"]) == 0, capsys.readouterr().err
    # The shot segments are gone, and so is the killed run's folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name])
    src_frames, src_audio = video_timing(three_shot_film)
    out_frames, out_audio = video_timing(out)
    assert out_frames == src_frames and len(out_frames) == 18
    assert out_audio == src_audio

    # Shots upscaled apart (as batch workers do) and joined give the same frames.
    folder = tmp_path / "segments"
    upscale(three_shot_film, folder, weights=tiny_weights, shots=[(6, 12), (12, 18)], progress=False)
    upscale(three_shot_film, folder, weights=tiny_weights, shots=[(0, 6)], progress=False)
    joined = tmp_path / "joined.mp4"
    segments = sorted(folder.iterdir())
    assert [s.name for s in segments] == ["shot-00000000.mp4", "shot-00000006.mp4", "shot-00000012.mp4"]
    assert join_segments(three_shot_film, segments, joined) == 18
    assert np.array_equal(read_all_frames(joined), read_all_frames(out))
    assert video_timing(joined) == video_timing(out)


def test_bad_scene_options_are_one_line_errors(three_shot_film, tiny_weights, tmp_path, capsys):
    out = str(tmp_path / "out.mp4")
    for option, value in (("--scene-threshold", "0"), ("--min-shot-frames", "0")):
        argv = [
            "upscale",
            str(three_shot_film),
            out,
            "--weights",
            str(tiny_weights),
            "--quiet",
            "--scene-cuts",
        ]
        assert main([*argv, option, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vsrkit: error:") and "\n" not in err and option in err
    assert list(tmp_path.iterdir()) == []
