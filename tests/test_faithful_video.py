"""A user's video comes out faithful: colours (tags, matrix, range), bit depth, rotation, stream choice, HDR.

Inputs are made here with PyAV (flat colour patches, a 10-bit ramp, 16-bit gray PNGs, a rotated clip, a
file with two video streams, a PQ clip with mastering metadata) plus real clips from the shared data.
Colours are judged by an oracle written here: the output's YUV planes turned into RGB with numpy, using
the matrix and range its tags give (as a player that honours tags does), not with vsrkit's reader.

Where colour must survive a model, the model is a tiny BasicVSR whose last conv is zero: its output is
the ×4 bilinear upscale of the input, so flat patches and smooth ramps come out as they went in.
"""

from __future__ import annotations

import struct

import av
import numpy as np
import pytest
import torch
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image

import vsrkit
from vsrkit.cli import main
from vsrkit.data.video import open_frames, open_writer
from vsrkit.engine import upscale_frames
from vsrkit.weights import save_vsrkit

# (Kr, Kb) of each matrix tag (FFmpeg's AVColorSpace codes): BT.709, BT.470BG, SMPTE 170M, BT.2020.
KR_KB = {1: (0.2126, 0.0722), 5: (0.299, 0.114), 6: (0.299, 0.114), 9: (0.2627, 0.0593)}
PATCHES = [
    (200, 30, 30),
    (30, 180, 60),
    (40, 60, 200),
    (128, 128, 128),
    (230, 200, 50),
    (20, 20, 20),
    (90, 200, 210),
    (240, 240, 240),
]
MASTER_DISPLAY = "G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,50)"


@pytest.fixture(scope="module")
def bilinear_weights(tmp_path_factory):
    """A tiny BasicVSR with a zero last conv: it outputs the ×4 bilinear upscale of its input."""
    torch.manual_seed(0)
    model = vsrkit.create_model("basicvsr", mid_channels=8, num_blocks=1)
    with torch.no_grad():
        model.conv_last.weight.zero_()
        model.conv_last.bias.zero_()
    path = tmp_path_factory.mktemp("weights") / "bilinear.safetensors"
    save_vsrkit(model, path)
    return path


def patch_frame(width: int = 192, height: int = 180) -> np.ndarray:
    """Eight flat colour patches, four across and two down."""
    frame = np.zeros((height, width, 3), np.uint8)
    pw, ph = width // 4, height // 2
    for n, colour in enumerate(PATCHES):
        frame[(n // 4) * ph : (n // 4 + 1) * ph, (n % 4) * pw : (n % 4 + 1) * pw] = colour
    return frame


def patch_means(rgb: np.ndarray) -> np.ndarray:
    """Mean colour of the middle half of each patch (away from the 4:2:0 chroma edges)."""
    h, w = rgb.shape[:2]
    pw, ph = w // 4, h // 2
    means = []
    for n in range(len(PATCHES)):
        top, left = (n // 4) * ph + ph // 4, (n % 4) * pw + pw // 4
        means.append(rgb[top : top + ph // 2, left : left + pw // 2].reshape(-1, 3).mean(0))
    return np.array(means)


def make_clip(
    path,
    frames,
    *,
    pix_fmt="yuv420p",
    matrix=Colorspace.ITU601,
    tags=None,
    codec="libx264",
    options=None,
    rotation=None,
):
    """Encode RGB frames (uint8 or uint16) with ``matrix`` in limited range; ``tags`` (matrix, primaries,
    transfer, range codes) label the stream, None leaves it untagged."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        stream.options = {"qp": "0"} if options is None else options
        if tags is not None:
            cc = stream.codec_context
            cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range = tags
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, rgb in enumerate(frames):
            fmt = "rgb48le" if rgb.dtype == np.uint16 else "rgb24"
            frame = av.VideoFrame.from_ndarray(rgb, format=fmt).reformat(
                format=pix_fmt, src_color_range=ColorRange.JPEG, dst_colorspace=matrix, dst_color_range="MPEG"
            )
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def plane(frame, index: int) -> np.ndarray:
    p = frame.planes[index]
    dtype = np.uint16 if frame.format.components[0].bits > 8 else np.uint8
    return np.frombuffer(bytes(p), dtype).reshape(p.height, -1)[:, : p.width].astype(np.float64)


def stream_info(path, stream: int = 0) -> dict:
    with av.open(str(path)) as container:
        video = container.streams.video[stream]
        cc = video.codec_context
        frame = next(container.decode(video))
        side = {sd.type.name: bytes(sd) for sd in frame.side_data}
        return {
            "tags": (cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range),
            "pix_fmt": frame.format.name,
            "size": (frame.width, frame.height),
            "rotation": frame.rotation,
            "side_data": side,
        }


def displayed(path, index: int = 0) -> np.ndarray:
    """Frame ``index`` as a player honouring the tags shows it: float RGB on the 0..255 scale.

    Untagged streams are read as players guess (BT.601 below 720 lines, BT.709 from 720 up, limited range).
    """
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        cc = video.codec_context
        frame = next(f for n, f in enumerate(container.decode(video)) if n == index)
        assert frame.format.name.startswith("yuv420p"), frame.format.name
        bits = frame.format.components[0].bits
        matrix = frame.colorspace if frame.colorspace in KR_KB else cc.colorspace
        if matrix not in KR_KB:
            matrix = 1 if frame.height >= 720 else 6
        full = (frame.color_range or cc.color_range) == 2
        y = plane(frame, 0)
        u, v = (np.repeat(np.repeat(plane(frame, i), 2, 0), 2, 1)[: y.shape[0], : y.shape[1]] for i in (1, 2))
    s = 2 ** (bits - 8)
    if full:
        top = 2**bits - 1
        luma, cb, cr = y / top, (u - 128 * s) / top, (v - 128 * s) / top
    else:
        luma, cb, cr = (y - 16 * s) / (219 * s), (u - 128 * s) / (224 * s), (v - 128 * s) / (224 * s)
    kr, kb = KR_KB[matrix]
    r = luma + 2 * (1 - kr) * cr
    b = luma + 2 * (1 - kb) * cb
    g = (luma - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.stack([r, g, b], -1), 0, 1) * 255


def upscale(args, capsys):
    code = main(["upscale", *map(str, args), "--quiet"])
    err = capsys.readouterr().err
    return code, err


# ------------------------------------------------------------------------------------------ colour


def test_tagged_bt709_clip_keeps_its_tags_and_colours(bilinear_weights, tmp_path, capsys):
    clip = tmp_path / "bt709.mp4"
    make_clip(clip, [patch_frame()] * 2, matrix=Colorspace.ITU709, tags=(1, 1, 1, 1))
    out = tmp_path / "out.mp4"
    code, err = upscale([clip, out, "--weights", bilinear_weights], capsys)
    assert code == 0, err
    info = stream_info(out)
    assert info["size"] == (768, 720)
    assert info["tags"] == (1, 1, 1, 1)  # BT.709 matrix, primaries, transfer; limited range
    error = np.abs(patch_means(displayed(out)) - np.array(PATCHES)).max()
    print(f"BT.709 clip: largest patch error {error:.2f} levels")
    assert error < 3


def test_untagged_sd_clip_comes_out_tagged_with_the_same_colours(bilinear_weights, tmp_path, capsys):
    clip = tmp_path / "sd.mp4"
    # Untagged, 180 lines: players assume BT.601.
    make_clip(clip, [patch_frame()] * 2, matrix=Colorspace.ITU601, tags=None)
    assert stream_info(clip)["tags"] == (2, 2, 2, 0)
    out = tmp_path / "out.mp4"
    code, err = upscale([clip, out, "--weights", bilinear_weights], capsys)
    assert code == 0, err
    info = stream_info(out)
    assert info["size"] == (768, 720)  # tall enough that an untagged output would be read as BT.709
    matrix, primaries, transfer, colour_range = info["tags"]
    assert matrix in (1, 5, 6) and primaries != 2 and transfer != 2 and colour_range in (1, 2), info["tags"]
    error = np.abs(patch_means(displayed(out)) - np.array(PATCHES)).max()
    print(f"untagged SD clip: output tags {info['tags']}, largest patch error {error:.2f} levels")
    assert error < 3


@pytest.mark.parametrize("name", ["box.mp4", "bigbuckbunny.mp4"])
def test_real_untagged_clips_display_the_same_after_a_round_trip(name, shared_data, tmp_path):
    """Reader → writer without a model: SD (BT.601 assumed) and 720p (BT.709 assumed) real footage."""
    clip = shared_data / "videos" / name
    out = tmp_path / "out.mp4"
    with open_frames(clip) as source:
        assert source.colour is not None and not source.colour.tagged
        with open_writer(out, fps=25, crf=10) as writer:
            writer.write(next(iter(source)))
    info = stream_info(out)
    assert info["tags"][0] in (1, 5, 6) and info["tags"][3] in (1, 2)
    before, after = displayed(clip), displayed(out)
    # A wrong matrix or range shifts colours one way; re-encoding noise averages out.
    shift = (after - before).mean(axis=(0, 1))
    print(f"{name}: output tags {info['tags']}, mean RGB shift {shift.round(2)}")
    assert np.abs(shift).max() < 1.0


# ------------------------------------------------------------------------------------------ depth


def ramp_frames(count: int = 3) -> list[np.ndarray]:
    """A smooth horizontal 16-bit gray ramp spanning about 40 8-bit levels (160 10-bit ones)."""
    width, height = 192, 32
    ramp = np.linspace(0.35, 0.51, width) * 65535
    frame = np.repeat(np.repeat(ramp[None, :, None], height, 0), 3, 2).round().astype(np.uint16)
    return [frame] * count


def test_10bit_clip_comes_out_10bit_with_its_levels(bilinear_weights, tmp_path, capsys):
    clip = tmp_path / "ramp10.mkv"
    make_clip(clip, ramp_frames(2), pix_fmt="yuv420p10le", matrix=Colorspace.ITU709, tags=(1, 1, 1, 1))
    with av.open(str(clip)) as container:
        source_levels = len(np.unique(plane(next(container.decode(video=0)), 0)))
    out = tmp_path / "out.mkv"
    code, err = upscale([clip, out, "--weights", bilinear_weights, "--crf", "4"], capsys)
    assert code == 0, err
    info = stream_info(out)
    assert info["pix_fmt"] == "yuv420p10le" and info["tags"] == (1, 1, 1, 1)
    with av.open(str(out)) as container:
        luma = plane(next(container.decode(video=0)), 0)
    levels = len(np.unique(luma[32:96, 16:-16]))
    print(f"10-bit ramp: {source_levels} luma levels in, {levels} out")
    assert levels > 100  # 8 bits would keep about 40

    eight = tmp_path / "eight.mp4"
    code, err = upscale([clip, eight, "--weights", bilinear_weights, "--pix-fmt", "yuv420p"], capsys)
    assert code == 0, err
    assert stream_info(eight)["pix_fmt"] == "yuv420p"


def test_8bit_clip_stays_8bit(bilinear_weights, tmp_path, capsys):
    clip = tmp_path / "eight.mp4"
    make_clip(clip, [patch_frame(64, 48)] * 2)
    out = tmp_path / "out.mkv"
    code, err = upscale([clip, out, "--weights", bilinear_weights], capsys)
    assert code == 0, err
    assert stream_info(out)["pix_fmt"] == "yuv420p"


def test_16bit_gray_pngs_come_out_16bit_gray_with_their_mean(bilinear_weights, tmp_path, capsys):
    folder = tmp_path / "gray16"
    folder.mkdir()
    rng = np.random.default_rng(0)
    base = np.linspace(60, 144, 64)[None, :] * 257 + rng.normal(0, 500, (48, 64))  # mean 102 (8-bit scale)
    for i in range(3):
        Image.fromarray(np.clip(base + 300 * i, 0, 65535).astype(np.uint16)).save(folder / f"{i:03d}.png")
    with Image.open(sorted(folder.iterdir())[1]) as image:
        expected = np.asarray(image, np.float64).mean()
    out = tmp_path / "out"
    code, err = upscale([folder, out, "--weights", bilinear_weights], capsys)
    assert code == 0, err
    pngs = sorted(out.iterdir())
    assert len(pngs) == 3
    with Image.open(pngs[1]) as image:
        assert image.mode.startswith("I;16") and image.size == (256, 192)
        mean = np.asarray(image, np.float64).mean()
    assert pngs[1].read_bytes()[24:26] == bytes([16, 0])  # IHDR: 16 bits, gray
    print(f"16-bit gray PNGs: input mean {expected / 257:.2f}, output mean {mean / 257:.2f} (8-bit scale)")
    assert abs(mean - expected) / 257 < 1.0

    eight = tmp_path / "eight"
    code, err = upscale([folder, eight, "--weights", bilinear_weights, "--pix-fmt", "rgb24"], capsys)
    assert code == 0, err
    with Image.open(sorted(eight.iterdir())[1]) as image:
        assert image.mode == "RGB"
        assert abs(np.asarray(image, np.float64).mean() - mean / 257) < 1.0


def test_bad_pix_fmt_is_one_line(bilinear_weights, tmp_path, capsys):
    clip = tmp_path / "in.mp4"
    make_clip(clip, [patch_frame(64, 48)] * 2)
    out = tmp_path / "out.mp4"
    code, err = upscale([clip, out, "--weights", bilinear_weights, "--pix-fmt", "rgb99"], capsys)
    assert code == 2 and err.count("\n") == 1 and "rgb99" in err, err


def test_engine_takes_uint16_frames_and_gives_uint16_back():
    torch.manual_seed(0)
    model = vsrkit.create_model("basicvsr", mid_channels=8, num_blocks=1)
    rng = np.random.default_rng(0)
    frames8 = [rng.integers(0, 256, (16, 20, 3), dtype=np.uint8) for _ in range(3)]
    out8 = list(upscale_frames(iter(frames8), model, device="cpu"))
    out16 = list(upscale_frames(iter([f.astype(np.uint16) * 257 for f in frames8]), model, device="cpu"))
    assert all(o.dtype == np.uint16 and o.shape == (64, 80, 3) for o in out16)
    assert all(o.dtype == np.uint8 for o in out8)
    # The same float input: uint16 output rounded to 8 bits is the uint8 output (up to rounding).
    diff = max(np.abs(a.astype(np.int32) - np.rint(b / 257)).max() for a, b in zip(out8, out16, strict=True))
    assert diff <= 1


# ------------------------------------------------------------------------------------------ rotation


@pytest.mark.parametrize("rotation", [90, -90])
def test_rotated_clip_comes_out_upright(rotation, bilinear_weights, tmp_path, capsys):
    stored = np.full((48, 64, 3), 20, np.uint8)
    stored[:16, :24] = (220, 220, 220)  # a bright block at the stored frame's top left
    clip = tmp_path / "rotated.mp4"
    make_clip(clip, [stored] * 2, rotation=rotation)
    source_info = stream_info(clip)
    assert source_info["rotation"] == rotation
    # PyAV: `rotation` is the angle by which the display turns the stored frame counter-clockwise.
    expected = np.rot90(stored, rotation // 90)
    out = tmp_path / "out.mp4"
    code, err = upscale([clip, out, "--weights", bilinear_weights], capsys)
    assert code == 0, err
    info = stream_info(out)
    assert info["rotation"] == 0 and "DISPLAYMATRIX" not in info["side_data"]
    assert info["size"] == (4 * 48, 4 * 64)
    shown = displayed(out).reshape(64, 4, 48, 4, 3).mean(axis=(1, 3))
    bright = shown.mean(-1) > 120
    agreement = (bright == (expected.mean(-1) > 120)).mean()
    print(f"rotation {rotation}: output {info['size']}, {agreement:.1%} of pixels agree with the display")
    assert agreement > 0.97


# ------------------------------------------------------------------------------------------ streams


def make_two_stream_mkv(path):
    with av.open(str(path), "w") as container:
        specs = [((48, 64), (200, 30, 30)), ((32, 40), (30, 30, 200))]
        streams = []
        for (h, w), _ in specs:
            stream = container.add_stream("libx264", rate=25)
            stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
            streams.append(stream)
        for i in range(3):
            for stream, ((h, w), colour) in zip(streams, specs, strict=True):
                frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), colour, np.uint8), format="rgb24")
                frame = frame.reformat(
                    format="yuv420p", dst_colorspace=Colorspace.ITU601, dst_color_range="MPEG"
                )
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
        for stream in streams:
            for packet in stream.encode(None):
                container.mux(packet)


def test_two_video_streams_one_named_and_another_chosen(bilinear_weights, tmp_path, capsys):
    clip = tmp_path / "two.mkv"
    make_two_stream_mkv(clip)
    out = tmp_path / "first.mkv"
    code, err = upscale([clip, out, "--weights", bilinear_weights], capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "video streams" in line]
    print(lines)
    assert len(lines) == 1 and "upscaling stream 0" in lines[0] and "--stream" in lines[0]
    assert stream_info(out)["size"] == (256, 192)
    assert displayed(out)[96, 128].round().tolist() == pytest.approx([200, 30, 30], abs=4)

    second = tmp_path / "second.mkv"
    code, err = upscale([clip, second, "--weights", bilinear_weights, "--stream", "1"], capsys)
    assert code == 0, err
    assert "upscaling stream 1" in err
    assert stream_info(second)["size"] == (160, 128)
    assert displayed(second)[64, 80].round().tolist() == pytest.approx([30, 30, 200], abs=4)

    third = tmp_path / "third.mkv"
    code, err = upscale([clip, third, "--weights", bilinear_weights, "--stream", "2"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vsrkit: error: no video stream 2"), err

    with open_frames(clip, stream=1) as source:
        assert (source.width, source.height, source.stream) == (40, 32, 1)


# ------------------------------------------------------------------------------------------ HDR


def mastering(side_data: dict) -> tuple[tuple[int, ...], tuple[int, int]]:
    md = struct.unpack("<22i", side_data["MASTERING_DISPLAY_METADATA"][:88])
    cll = struct.unpack("<2I", side_data["CONTENT_LIGHT_LEVEL"][:8])
    # Each rational as a float: R, G, B, white point (x, y), min and max luminance.
    return tuple(round(md[i] / md[i + 1], 5) for i in range(0, 20, 2)), cll


@pytest.mark.parametrize("codec", [None, "libx265"])
def test_pq_clip_keeps_tags_depth_and_mastering_metadata(codec, bilinear_weights, tmp_path, capsys):
    clip = tmp_path / "pq.mkv"
    make_clip(
        clip,
        ramp_frames(2),
        codec="libx265",
        pix_fmt="yuv420p10le",
        matrix=Colorspace.BT2020,
        tags=(9, 9, 16, 1),  # BT.2020 non-constant luminance, BT.2020 primaries, PQ, limited range
        options={"x265-params": f"log-level=error:master-display={MASTER_DISPLAY}:max-cll=1000,400"},
    )
    source = stream_info(clip)
    assert "MASTERING_DISPLAY_METADATA" in source["side_data"]
    out = tmp_path / "out.mkv"
    extra = ["--codec", codec] if codec else []
    code, err = upscale([clip, out, "--weights", bilinear_weights, *extra], capsys)
    assert code == 0, err
    info = stream_info(out)
    assert info["tags"] == (9, 9, 16, 1)
    assert info["pix_fmt"] == "yuv420p10le"
    assert mastering(info["side_data"]) == mastering(source["side_data"])
    print(f"PQ ({codec or 'default codec'}): tags {info['tags']}, metadata {mastering(info['side_data'])}")
