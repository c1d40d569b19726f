"""Streaming video / image-folder I/O (vsrkit.data.video).

Real clips come from the shared data (``shared_data`` fixture); the test clips with audio and subtitles are
made here from real frames of box.mp4 (downscaled to 160x120), since none of the shared videos has subtitles.
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vsrkit.data.video import (
    VideoIOWarning,
    open_frames,
    open_writer,
    read_all_frames,
)
from vsrkit.errors import VsrkitError

SUBTITLES = ["hello", "world"]


# -------------------------------------------------------------------------------- test-only helpers


def make_test_clip(
    path: Path,
    frames: np.ndarray,
    *,
    fps: int = 25,
    with_audio: bool = True,
    with_subtitles: bool = False,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    with_video: bool = True,
) -> Path:
    """Encode ``frames`` (T, H, W, 3) to ``path`` with a 440 Hz AAC sine and, optionally, two subtitle cues.

    ``pts``/``time_base`` give irregular (VFR) frame times; by default frames are ``1/fps`` apart. Subtitles
    are mov_text in mp4/mov and SubRip otherwise, muxed as raw packets at 0.0 s and 0.2 s, 0.15 s long.
    """
    out = av.open(str(path), mode="w")
    count, height, width, _ = frames.shape
    video = None
    if with_video:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if time_base is not None:
            video.codec_context.time_base = time_base
            video.time_base = time_base
    audio = out.add_stream("aac", rate=44100, layout="mono") if with_audio else None
    mov_text = path.suffix in (".mp4", ".mov", ".m4v")
    subs = out.add_mux_stream("mov_text" if mov_text else "subrip") if with_subtitles else None
    if subs is not None:
        subs.time_base = Fraction(1, 1000)
    if video is not None:
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = pts[i] if pts is not None else i
            frame.time_base = time_base if pts is not None else Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    if audio is not None:
        total = int(44100 * count / fps)
        wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(total) / 44100)).astype(np.float32)
        for start in range(0, total, 1024):
            frame = av.AudioFrame.from_ndarray(wave[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 44100
            frame.pts = start
            frame.time_base = Fraction(1, 44100)
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    if subs is not None:
        for k, text in enumerate(SUBTITLES):
            data = text.encode()
            if mov_text:
                data = len(data).to_bytes(2, "big") + data
            packet = av.Packet(data)
            packet.stream = subs
            packet.pts = packet.dts = 200 * k
            packet.duration = 150
            packet.time_base = Fraction(1, 1000)
            out.mux(packet)
    out.close()
    return path


def video_times(path: Path) -> list[Fraction]:
    """Presentation times (seconds, exact) of the decoded video frames, decoding the whole file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.pts * stream.time_base for frame in container.decode(stream)]


def audio_span(path: Path) -> tuple[int, float, float]:
    """(decoded samples, start s, end s) of the first audio stream, decoding it fully."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples, start, end = 0, None, 0.0
        for frame in container.decode(stream):
            begin = float(frame.pts * stream.time_base)
            start = begin if start is None else start
            samples += frame.samples
            end = begin + frame.samples / frame.sample_rate
        return samples, float(start or 0.0), end


def subtitle_texts(path: Path) -> list[str]:
    """Non-empty subtitle packet payloads of the first subtitle stream (mov_text length prefix dropped)."""
    with av.open(str(path)) as container:
        stream = container.streams.subtitles[0]
        texts = []
        for packet in container.demux(stream):
            data = bytes(packet)
            if stream.codec_context.codec.canonical_name == "mov_text":
                data = data[2:]
            if data:
                texts.append(data.decode())
        return texts


def stream_kinds(path: Path) -> list[tuple[str, str]]:
    with av.open(str(path)) as container:
        return [(s.type, s.codec_context.codec.canonical_name) for s in container.streams]


def interleave_gap(path: Path) -> float:
    """Largest time jump (s) between neighbouring packets in file order: small when interleaved."""
    with av.open(str(path)) as container:
        times = [
            float(packet.dts * packet.time_base)
            for packet in container.demux()
            if packet.size and packet.dts is not None
        ]
    return float(np.abs(np.diff(times)).max())


def copy_through(source_path: Path, out_path: Path, limit: int | None = None, **writer_options) -> int:
    """Read ``source_path`` and write its frames to ``out_path`` as an upscaler would."""
    written = 0
    with open_frames(source_path) as source, open_writer(out_path, source=source, **writer_options) as writer:
        for frame in source:
            writer.write(frame)
            written += 1
            if limit is not None and written >= limit:
                break
    return written


def leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".partial-" in name or ".old-" in name)


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small_frames(shared_data: Path) -> np.ndarray:
    """The first 12 frames of box.mp4, downscaled to 160x120."""
    frames = []
    with av.open(str(shared_data / "videos" / "box.mp4")) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24", width=160, height=120))
            if len(frames) == 12:
                break
    return np.stack(frames)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, small_frames: np.ndarray) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    vfr_pts = [0, 40, 100, 110, 200, 260, 270, 400, 410, 420, 500, 620]
    return {
        "mp4": make_test_clip(folder / "av_subs.mp4", small_frames, with_subtitles=True),
        "mkv": make_test_clip(folder / "av_subs.mkv", small_frames, with_subtitles=True),
        "vfr": make_test_clip(
            folder / "vfr.mp4", small_frames, with_audio=False, pts=vfr_pts, time_base=Fraction(1, 1000)
        ),
        "audio_only": make_test_clip(folder / "audio_only.mp4", small_frames, with_video=False),
    }


# ------------------------------------------------------------------------------------------ reading

# name: (width, height, fps, frames the file holds). box.mp4's last packet is cut by its edit list
# (README: 456); tree.avi holds 68 distinct frames on a 15 fps grid of 444 slots (README counts the slots).
REAL_CLIPS = {
    "box.mp4": (640, 480, Fraction(30000, 1001), 455),
    "cup.mp4": (640, 480, Fraction(26777, 1000), 217),
    "bikes.mp4": (640, 272, Fraction(25), 250),
    "bigbuckbunny.mp4": (1280, 720, Fraction(25), 132),
    "tree.avi": (320, 240, Fraction(1000000, 66667), 68),
    "vtest.avi": (768, 576, Fraction(10), 795),
}


@pytest.mark.parametrize("name", sorted(REAL_CLIPS))
def test_real_clip_prefix(shared_data: Path, name: str) -> None:
    width, height, fps, count = REAL_CLIPS[name]
    with open_frames(shared_data / "videos" / name) as source:
        assert source.is_video
        assert (source.width, source.height, source.fps, source.num_frames) == (width, height, fps, count)
        assert source.timestamps is not None and len(source.timestamps) == count
        assert (np.diff(source.timestamps) > 0).all()
        frames = read_all_frames(source.path, max_frames=5)
    assert frames.shape == (5, height, width, 3) and frames.dtype == np.uint8
    assert frames.std() > 5  # real picture content, not a blank decode


def test_full_decode_matches_count(shared_data: Path) -> None:
    with open_frames(shared_data / "videos" / "tree.avi") as source:
        pairs = list(source.frames_with_pts())
        assert len(pairs) == source.num_frames == 68
        assert [p for _, p in pairs] == source.timestamps.tolist()
        assert pairs[-1][1] == 443  # the last frame sits in slot 443 of 444


def test_box_timestamps_are_in_display_order(shared_data: Path) -> None:
    """box.mp4's decoded frames carry decode-order pts; the source reports sorted packet timestamps."""
    with open_frames(shared_data / "videos" / "box.mp4") as source:
        assert source.time_base == Fraction(1, 1_000_000)
        steps = np.diff(source.timestamps[:30])
        assert steps.min() >= 33_000 and steps.max() <= 34_000


def test_iteration_streams(shared_data: Path) -> None:
    """Decoding many frames while keeping none allocates about one frame at a time, not the whole clip."""
    frame_bytes = 640 * 272 * 3
    with open_frames(shared_data / "videos" / "bikes.mp4") as source:
        tracemalloc.start()
        try:
            for count, frame in enumerate(source, 1):
                assert frame.shape == (272, 640, 3)
                if count == 80:
                    break
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8 * frame_bytes


def test_second_pass_restarts(clips: dict[str, Path]) -> None:
    with open_frames(clips["mp4"]) as source:
        first = next(iter(source))
        again = list(source)
    assert len(again) == 12
    np.testing.assert_array_equal(first, again[0])


def test_image_folder_in_name_order(shared_data: Path) -> None:
    folder = shared_data / "reds_lr_000"
    with open_frames(folder) as source:
        assert not source.is_video
        assert (source.width, source.height, source.num_frames, source.fps) == (320, 180, 21, None)
        assert source.timestamps is None
        frames = list(source)
    assert len(frames) == 21
    for index in (0, 9, 20):
        expected = np.asarray(Image.open(folder / f"{index:08d}.png").convert("RGB"))
        np.testing.assert_array_equal(frames[index], expected)


def test_image_folder_natural_order(tmp_path: Path) -> None:
    for number in (10, 2, 1):
        Image.fromarray(np.full((8, 8, 3), number, np.uint8)).save(tmp_path / f"f{number}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    frames = read_all_frames(tmp_path)
    assert frames[:, 0, 0, 0].tolist() == [1, 2, 10]


def test_image_folder_problems(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VsrkitError, match=f"no images .* in folder {empty}$"):
        open_frames(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(mixed / "b.png")
    with pytest.raises(VsrkitError, match="images differ in size.*b.png is 10x8"):
        open_frames(mixed)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(VsrkitError, match=f"cannot read image {broken / 'a.png'}"):
        open_frames(broken)


# --------------------------------------------------------------------------------------- bad inputs


def test_missing_input(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VsrkitError, match=f"input not found: {missing}$"):
        open_frames(missing)


def test_text_file_named_mp4(tmp_path: Path) -> None:
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video\n" * 20)
    with pytest.raises(VsrkitError, match=f"cannot read {fake} as a video"):
        open_frames(fake)


def test_no_video_stream(clips: dict[str, Path]) -> None:
    with pytest.raises(VsrkitError, match=f"no video stream in {clips['audio_only']}$"):
        open_frames(clips["audio_only"])


def test_zero_frame_video(tmp_path: Path) -> None:
    path = tmp_path / "empty.avi"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    with pytest.raises(VsrkitError, match=f"no video frames in {path}$"):
        open_frames(path)


def truncated_copy(source: Path, folder: Path, size: int) -> Path:
    path = folder / f"cut{size}_{source.name}"
    with open(source, "rb") as handle:
        path.write_bytes(handle.read(size))
    return path


def test_truncated_mp4_index_first(shared_data: Path, tmp_path: Path) -> None:
    """cup.mp4 has its index first: cut at half, the index lists 217 frames and 94 are left."""
    original = shared_data / "videos" / "cup.mp4"
    cut = truncated_copy(original, tmp_path, original.stat().st_size // 2)
    with pytest.raises(VsrkitError, match=f"{cut} is truncated or corrupt: its index lists 217"):
        open_frames(cut)
    with pytest.warns(VideoIOWarning, match="truncated"):
        source = open_frames(cut, allow_corrupt=True)
    with source:
        frames = sum(1 for _ in source)
    assert 0 < frames < 217


def test_truncated_mp4_index_last(shared_data: Path, tmp_path: Path) -> None:
    """bikes.mp4 has its index at the end: cut at half, nothing can be read."""
    original = shared_data / "videos" / "bikes.mp4"
    cut = truncated_copy(original, tmp_path, original.stat().st_size // 2)
    with pytest.raises(VsrkitError, match=f"cannot read {cut} as a video"):
        open_frames(cut, allow_corrupt=True)


@pytest.mark.parametrize("name", ["cup.mp4", "bikes.mp4"])
def test_truncated_to_100_bytes(shared_data: Path, tmp_path: Path, name: str) -> None:
    cut = truncated_copy(shared_data / "videos" / name, tmp_path, 100)
    with pytest.raises(VsrkitError, match=str(cut)):
        open_frames(cut)


def test_truncated_last_packet(shared_data: Path, tmp_path: Path) -> None:
    """vtest.avi cut at half: the AVI index is gone, so only the headers hint at the cut, and the damage
    shows up in the last, partial frame."""
    original = shared_data / "videos" / "vtest.avi"
    cut = truncated_copy(original, tmp_path, original.stat().st_size // 2)
    with pytest.warns(VideoIOWarning, match="may be truncated: its headers say the video lasts 79.5 s"):
        source = open_frames(cut)
    with source, pytest.raises(VsrkitError, match=f"{cut} is corrupt: frame \\d+ is damaged"):
        for _ in source:
            pass


def test_corrupt_bytes(clips: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(clips["vfr"].read_bytes())
    rng = np.random.default_rng(0)
    start = len(data) // 2
    for offset in rng.integers(start, start + len(data) // 4, size=20):
        data[offset] ^= 0xFF
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    with pytest.raises(VsrkitError, match=f"{damaged} is corrupt"):
        with open_frames(damaged) as source:
            for _ in source:
                pass
    with pytest.warns(VideoIOWarning, match="damaged|undecodable|decoded"):
        with open_frames(damaged, allow_corrupt=True) as source:
            frames = [frame for frame in source]
    assert len(frames) == 12  # concealed frames are kept, with a warning


# --------------------------------------------------------------------------------------- round trip


def test_roundtrip_mp4_audio_and_subtitles(clips: dict[str, Path], tmp_path: Path) -> None:
    src = clips["mp4"]
    out = tmp_path / "out.mp4"
    assert copy_through(src, out) == 12
    assert stream_kinds(out) == [("video", "h264"), ("audio", "aac"), ("subtitle", "mov_text")]
    with open_frames(src) as source, open_frames(out) as result:
        assert result.num_frames == 12
        assert result.fps == source.fps == 25
        assert (result.width, result.height) == (160, 120)
        in_times = [t * source.time_base for t in source.timestamps]
        out_times = [t * result.time_base for t in result.timestamps]
        assert in_times == out_times
        assert np.abs(read_all_frames(src).astype(int) - read_all_frames(out)).mean() < 4
    assert video_times(out) == video_times(src)  # decodes the whole output
    assert audio_span(out) == pytest.approx(audio_span(src), abs=1e-3)
    assert subtitle_texts(out) == SUBTITLES


def test_roundtrip_mkv_audio_and_subtitles(clips: dict[str, Path], tmp_path: Path) -> None:
    src = clips["mkv"]
    out = tmp_path / "out.mkv"
    copy_through(src, out)
    assert stream_kinds(out) == [("video", "h264"), ("audio", "aac"), ("subtitle", "subrip")]
    # Matroska stores milliseconds; the source was written with the same rounding.
    assert video_times(out) == video_times(src)
    samples, start, end = audio_span(out)
    ref_samples, ref_start, ref_end = audio_span(src)
    assert samples == ref_samples and start == pytest.approx(ref_start, abs=2e-3)
    assert subtitle_texts(out) == SUBTITLES


def test_subtitles_that_do_not_fit_are_left_out(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.warns(VideoIOWarning, match="subtitle stream #2 \\(subrip\\) cannot go into a .mp4 file"):
        copy_through(clips["mkv"], out)
    assert stream_kinds(out) == [("video", "h264"), ("audio", "aac")]
    assert len(video_times(out)) == 12


def test_audio_reencoded_when_container_refuses_it(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.webm"
    with pytest.warns(VideoIOWarning) as record:
        copy_through(clips["mp4"], out)
    messages = sorted(str(w.message) for w in record)
    assert "audio stream #1 (aac) re-encoded to libopus" in messages[0]
    assert "subtitle stream #2 (mov_text) cannot go into a .webm file" in messages[1]
    assert stream_kinds(out) == [("video", "vp9"), ("audio", "opus")]
    _, start, end = audio_span(out)
    _, ref_start, ref_end = audio_span(clips["mp4"])
    assert end - start == pytest.approx(ref_end - ref_start, abs=0.03)
    assert len(video_times(out)) == 12


def test_real_audio_copied(shared_data: Path, tmp_path: Path) -> None:
    """box.mp4 has MP3 audio starting at 67 ms; writing 20 frames keeps it in place and cuts it after them."""
    out = tmp_path / "box20.mkv"
    copy_through(shared_data / "videos" / "box.mp4", out, limit=20)
    assert stream_kinds(out) == [("video", "h264"), ("audio", "mp3")]
    times = video_times(out)
    assert len(times) == 20 and float(times[1]) == pytest.approx(0.034)
    _, start, end = audio_span(out)
    assert start == pytest.approx(0.067, abs=1e-3)
    assert 0.667 - 0.03 <= end <= 0.667 + 0.03  # frame 20 starts at 0.667 s; one MP3 frame is 26 ms
    assert interleave_gap(out) < 0.1


def test_reencoded_audio_keeps_its_start(shared_data: Path, tmp_path: Path) -> None:
    """Re-encoding box.mp4's MP3 (starting at 67 ms) to Opus for WebM keeps it in sync with the video."""
    out = tmp_path / "box.webm"
    with (
        open_frames(shared_data / "videos" / "box.mp4") as source,
        pytest.warns(VideoIOWarning, match="opus"),
    ):
        with open_writer(out, source=source) as writer:
            for index, frame in enumerate(source):
                writer.write(np.ascontiguousarray(frame[::4, ::4]))
                if index == 19:
                    break
    _, start, end = audio_span(out)
    assert start == pytest.approx(0.067, abs=2e-3)
    assert 0.667 - 0.03 <= end <= 0.667 + 0.03


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_vfr_timestamps_kept(clips: dict[str, Path], tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"out{suffix}"
    copy_through(clips["vfr"], out)
    expected = [Fraction(t, 1000) for t in (0, 40, 100, 110, 200, 260, 270, 400, 410, 420, 500, 620)]
    assert video_times(clips["vfr"]) == expected
    assert video_times(out) == expected


def test_constant_rate_when_asked(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    copy_through(clips["vfr"], out, fps=Fraction(30000, 1001))
    assert video_times(out) == [Fraction(1001 * i, 30000) for i in range(12)]


def test_folder_to_video_default_rate(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "reds.mp4"
    copy_through(shared_data / "reds_lr_000", out)
    with open_frames(out) as result:
        assert (result.fps, result.num_frames, result.width, result.height) == (25, 21, 320, 180)
    assert video_times(out) == [Fraction(i, 25) for i in range(21)]


def test_png_folder_output(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "frames"
    copy_through(clips["mp4"], out)
    assert sorted(os.listdir(out)) == [f"{i:08d}.png" for i in range(12)]
    assert leftovers(tmp_path) == []
    np.testing.assert_array_equal(read_all_frames(out), read_all_frames(clips["mp4"]))


def test_odd_size_is_padded(small_frames: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "odd.mp4"
    odd = np.ascontiguousarray(small_frames[:3, :119, :159])
    with pytest.warns(VideoIOWarning, match="odd; padding to 160x120"):
        with open_writer(out, fps=25) as writer:
            for frame in odd:
                writer.write(frame)
    decoded = read_all_frames(out)
    assert decoded.shape == (3, 120, 160, 3)
    assert np.abs(decoded[:, :119, :159].astype(int) - odd).mean() < 4


def test_writer_rejects_bad_frames(tmp_path: Path) -> None:
    with open_writer(tmp_path / "out", fps=25) as writer:
        writer.write(np.zeros((8, 8, 3), np.uint8))
        with pytest.raises(ValueError):
            writer.write(np.zeros((8, 8, 3), np.float32))
        with pytest.raises(ValueError):
            writer.write(np.zeros((8, 10, 3), np.uint8))


# ---------------------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("name", ["out.mp4", "out_frames"])
def test_exception_leaves_nothing(clips: dict[str, Path], tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    with open_frames(clips["mp4"]) as source, pytest.raises(RuntimeError, match="boom"):
        with open_writer(out, source=source) as writer:
            for index, frame in enumerate(source):
                writer.write(frame)
                if index == 5:
                    raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == []


def test_no_frames_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(VsrkitError, match=f"no frames were written to {out}$"):
        with open_writer(out, fps=25):
            pass
    assert os.listdir(tmp_path) == []


def test_temp_file_sits_beside_output(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with open_writer(out, fps=25) as writer:
        assert leftovers(tmp_path) and leftovers(tmp_path)[0].startswith(".out.partial-")
        assert leftovers(tmp_path)[0].endswith(".mp4")
        writer.write(np.zeros((16, 16, 3), np.uint8))
        assert not out.exists()
    assert out.exists() and leftovers(tmp_path) == []
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_existing_output_refused_then_overwritten(small_frames: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    out.write_bytes(b"precious")
    with pytest.raises(VsrkitError, match=f"output {out} exists; pass --overwrite"):
        open_writer(out, fps=25)
    assert out.read_bytes() == b"precious" and leftovers(tmp_path) == []
    with open_writer(out, fps=25, overwrite=True) as writer:
        for frame in small_frames[:3]:
            writer.write(frame)
    assert len(video_times(out)) == 3


def test_existing_frame_folder(small_frames: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "frames"
    out.mkdir()
    for index in range(5):
        (out / f"{index:08d}.png").write_bytes(b"old")
    with pytest.raises(VsrkitError, match="exists; pass --overwrite"):
        open_writer(out)
    with open_writer(out, overwrite=True) as writer:
        for frame in small_frames[:2]:
            writer.write(frame)
    assert sorted(os.listdir(out)) == ["00000000.png", "00000001.png"]
    assert leftovers(tmp_path) == []
    (out / "notes.txt").write_text("mine")
    with pytest.raises(VsrkitError, match="holds files other than frames"):
        open_writer(out, overwrite=True)
    assert (out / "notes.txt").exists()


def test_unwritable_destinations(tmp_path: Path) -> None:
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    # Root ignores permission bits, so use places that fail for root too.
    with pytest.raises(VsrkitError, match=f"{regular} is not a folder"):
        open_writer(regular / "out.mp4", fps=25)
    with pytest.raises(VsrkitError, match="cannot write to /proc"):
        open_writer("/proc/vsrkit_out.mp4", fps=25)
    with pytest.raises(VsrkitError, match=f"output folder {tmp_path / 'missing'} does not exist"):
        open_writer(tmp_path / "missing" / "out.mp4", fps=25)
    with pytest.raises(VsrkitError, match="single image"):
        open_writer(tmp_path / "out.png")


def test_output_same_as_input(clips: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "same.mp4"
    shutil.copy(clips["mp4"], src)
    with open_frames(src) as source, pytest.raises(VsrkitError, match="is the input"):
        open_writer(src, source=source, overwrite=True)
    assert src.read_bytes() == clips["mp4"].read_bytes()


def test_codec_container_mismatch(tmp_path: Path) -> None:
    with pytest.raises(VsrkitError, match="cannot hold libx264"):
        open_writer(tmp_path / "out.webm", fps=25, codec="libx264")
    assert os.listdir(tmp_path) == []
