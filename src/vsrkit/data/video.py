"""Streaming frame I/O for videos and image folders.

Reading
-------
:func:`open_frames` opens a video file (anything FFmpeg reads, through PyAV) or a folder of
images and returns a :class:`FrameSource`: an iterable of RGB arrays of shape ``(H, W, 3)``, decoded one at
a time, so memory does not grow with the length of the video. Frames are ``uint8``; with
``native_depth=True``, inputs deeper than 8 bits (10-/12-bit video, 16-bit PNGs) give ``uint16`` frames with
full scale 65535.

Colour. YUV is turned into RGB with the stream's own matrix and range. Untagged video is read as players
read it: BT.601 below 720 lines, BT.709 from 720 up, limited range (:class:`VideoColour`). Frames are turned
upright as the stream's display matrix says (the transposes and flips FFmpeg's autorotation applies), so
they look as a player shows them. A file with several video streams: a warning names the one read (the first
that is not cover art); ``stream=N`` picks another.

Timestamps. When a video is opened, its video packets are demuxed once without decoding (fast, no frame data
kept) to count them and to collect their presentation timestamps. Sorted, these are the timestamps of the
decoded frames in display order; they are kept as one ``int64`` per frame in :attr:`FrameSource.timestamps`,
in units of :attr:`FrameSource.time_base`. Using the packets rather than the decoded frames' own ``pts``
matters for files whose muxer wrote decode-order timestamps (``box.mp4`` in the shared data is one: its
B-frames come out of the decoder with shuffled ``pts``). Packets flagged "discard" (cut by an edit list) are
left out, as the decoder drops them too.

Damaged input (the policy). With ``allow_corrupt=False`` (the default) every sign of damage is a
:class:`~vsrkit.errors.VsrkitError` that names the file, so that no output is ever made from silently broken
frames:

* found at open time, before any decoding: an index (mp4/mov/avi/mkv) that points past the end of the file, or
  fewer packets than the index lists (a truncated download);
* found while decoding: a packet that the decoder rejects, or a frame that the decoder marks as corrupt
  (damage it concealed by guessing pixels).

With ``allow_corrupt=True`` the readable part is used: undecodable packets are skipped, concealed frames are
kept, and one :class:`VideoIOWarning` per problem says how many frames are missing or damaged. A file whose
video stream is much shorter than its header claims (an AVI cut without its index) cannot be told apart from
a legitimately odd file, so that only gives a warning in both modes. A file that yields no frame at all is
always an error.

Writing
-------
:func:`open_writer` returns a :class:`VideoWriter` (a context manager). Output paths ending
in one of :data:`VIDEO_EXTENSIONS` are encoded as video; any other path is a folder of PNG files
``00000000.png``, ``00000001.png``, ... Everything is written to a hidden temporary file or folder in the
output's own directory (``.NAME.partial-PID-HOST-XXXXXXXX.EXT``, named after the writing process; see
:mod:`vsrkit.fsutil`). Only when the ``with`` block ends without an exception is it moved to the output
path, with :func:`vsrkit.fsutil.put_in_place`, which never replaces anything; on an exception (including
the ``KeyboardInterrupt`` that the CLI raises for Ctrl-C, SIGTERM and SIGHUP) it is deleted and nothing is
left behind. Temporary outputs of killed processes (``kill -9``) in the output's directory are removed by
the next writer there once their process is gone.

Nothing the writer did not create is replaced or removed without ``overwrite=True``: an existing output is
refused when the writer opens, and an output that appears while it runs (a file, a folder, even empty;
another run finishing first) makes :meth:`VideoWriter.close` fail with a :class:`~vsrkit.errors.VsrkitError`
(the result is discarded). With ``overwrite=True`` a file is replaced, but a folder only if it holds nothing
but ``NNNNNNNN.png`` files (checked again when it is replaced), and never by a video. A full disk while
writing is one :class:`~vsrkit.errors.VsrkitError` naming the output, and the temporary output is removed.

Timing: with a video ``source`` and ``fps=None``, frame *i* gets the source's timestamp *i* in the source's
time base (variable frame rate is preserved, and audio stays in sync); otherwise frames get a constant rate:
``fps``, or the source's rate, or :data:`DEFAULT_FPS` for image folders.

Other streams of a video source: audio and subtitle streams are copied packet by packet (no re-encoding)
when the output container accepts their codec, interleaved with the video as it is written. Audio that the
container does not accept is re-encoded (AAC; Opus for WebM) with a warning. Subtitles that the container
does not accept (e.g. SubRip into mp4, mov_text into mkv) are skipped with a warning; data and attachment
streams are not copied. When fewer frames are written than the source has, the copied streams are cut at the
end of the last written frame.

Frame size: encoders for chroma-subsampled pixel formats (``yuv420p``, the default) need even sizes; odd
widths or heights are padded by repeating the last column/row, with a warning.

Colour and depth of the output: RGB is encoded with the source's matrix and range (BT.709 for image
folders), and the stream is tagged with matrix, primaries, transfer and range, the source's own or the ones
players would have guessed for it, so that it displays as the source did. HDR mastering-display and
content-light-level metadata of the source's first frame are written through x264/x265 (other encoders: a
warning). The default pixel format follows the source's frames: ``yuv420p`` for 8-bit, ``yuv420p10le`` (12
where the encoder can) for ``uint16`` frames; PNG folders are ``rgb24``/``rgb48`` (``gray``/``gray16`` when
the source images are gray). Frames are written upright, with no rotation tag.

Not handled: sample aspect ratio; display matrices that rotate by other than a multiple of 90° (a warning,
frames as stored); 16-bit images other than PNG (read at 8 bits); colour tags of PNG files (sRGB assumed).
"""

from __future__ import annotations

import array
import math
import os
import re
import shutil
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import av.error
import numpy as np
from av.sidedata.sidedata import Type as SideDataType
from av.video.reformatter import ColorRange, Colorspace, Interpolation

from vsrkit.checks import check_crf
from vsrkit.errors import VsrkitError
from vsrkit.fsutil import (
    deferred_signals,
    disk_full_error,
    is_disk_full,
    make_temp_dir,
    make_temp_file,
    put_in_place,
    remove_dead_leftovers,
    remove_folder_holding_only,
)

__all__ = [
    "DEFAULT_FPS",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "FrameSource",
    "VideoColour",
    "VideoIOWarning",
    "VideoWriter",
    "open_frames",
    "open_writer",
    "read_all_frames",
]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_FPS = Fraction(25)
"""Frame rate of a video written from an image folder without ``fps`` (FFmpeg's default for images)."""

_PNG_NAME = re.compile(r"\d{8}\.png")
_CRF_CODECS = {"libx264", "libx265", "libvpx-vp9", "libvpx", "libaom-av1", "libsvtav1"}


class VideoIOWarning(UserWarning):
    """A problem that does not stop reading or writing (damaged frames skipped, a stream left out...)."""


def _warn(message: str) -> None:
    warnings.warn(message, VideoIOWarning, stacklevel=3)


def _av_reason(exc: BaseException) -> str:
    """A short one-line reason from a PyAV/OS exception."""
    strerror = getattr(exc, "strerror", None)
    text = strerror if strerror else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _to_fraction(value: object, what: str) -> Fraction:
    try:
        fraction = Fraction(str(value)) if isinstance(value, float) else Fraction(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise VsrkitError(f"invalid {what}: {value!r}") from exc
    if isinstance(value, float):
        fraction = fraction.limit_denominator(1_000_000)
    if fraction <= 0:
        raise VsrkitError(f"invalid {what}: {value!r} (must be positive)")
    return fraction


# ------------------------------------------------------------------------------------------ colour

# FFmpeg's codes (libavutil/pixfmt.h) for the tags a stream carries.
_SPC_RGB, _SPC_BT709, _SPC_SMPTE170M, _SPC_BT2020_NCL = 0, 1, 6, 9
_PRI_BT709, _PRI_BT470BG, _PRI_SMPTE170M, _PRI_BT2020 = 1, 5, 6, 9
_TRC_BT709 = 1
_RANGE_MPEG, _RANGE_JPEG = 1, 2
_UNKNOWN = (0, 2, 3)  # reserved, unspecified, reserved: for primaries and transfer alike
# swscale's YUV↔RGB matrix for each matrix tag it can convert.
_SWS_MATRIX = {
    _SPC_BT709: Colorspace.ITU709,
    4: Colorspace.FCC,
    5: Colorspace.ITU601,  # BT.470BG (625-line BT.601)
    _SPC_SMPTE170M: Colorspace.ITU601,
    7: Colorspace.SMPTE240M,
    _SPC_BT2020_NCL: Colorspace.BT2020,
    10: Colorspace.BT2020,
}


@dataclass(frozen=True)
class VideoColour:
    """How a video's samples map to colours: FFmpeg's codes for the tags, filled in where the input has none.

    Untagged input is read as players read it: the BT.601 matrix below 720 lines, BT.709 from 720 up,
    limited range (full for ``yuvj`` formats), BT.709 transfer, and the primaries that go with the matrix
    (EBU for 576 lines, SMPTE 170M for other SD sizes). The output is tagged with all four, so that no
    player has to guess. ``tagged`` says whether the input gave its matrix.

    ``mastering_display`` (in x265's ``master-display`` syntax) and ``content_light`` (MaxCLL, MaxFALL)
    are the HDR metadata of the input's first frame, or None.
    """

    matrix: int
    primaries: int
    transfer: int
    full_range: bool
    tagged: bool
    mastering_display: str | None = None
    content_light: tuple[int, int] | None = None

    @staticmethod
    def resolve(
        matrix: int, primaries: int, transfer: int, colour_range: int, height: int, pix_fmt: str = ""
    ) -> VideoColour:
        tagged = matrix in _SWS_MATRIX
        if not tagged:
            matrix = _SPC_SMPTE170M if height < 720 else _SPC_BT709
        if primaries in _UNKNOWN:
            if matrix == _SPC_BT709:
                primaries = _PRI_BT709
            elif matrix in (_SPC_BT2020_NCL, 10):
                primaries = _PRI_BT2020
            else:
                primaries = _PRI_BT470BG if height == 576 else _PRI_SMPTE170M
        if transfer in _UNKNOWN:
            transfer = _TRC_BT709
        if colour_range in (_RANGE_MPEG, _RANGE_JPEG):
            full = colour_range == _RANGE_JPEG
        else:
            full = pix_fmt.startswith("yuvj")
        return VideoColour(matrix, primaries, transfer, full, tagged)

    @property
    def sws_matrix(self) -> Colorspace:
        return _SWS_MATRIX.get(self.matrix, Colorspace.ITU709)

    @property
    def sws_range(self) -> ColorRange:
        return ColorRange.JPEG if self.full_range else ColorRange.MPEG


def _mastering_display(data: bytes) -> str | None:
    """AVMasteringDisplayMetadata (R, G, B, white point, min and max luminance) → x265's syntax."""
    if len(data) < 88:
        return None
    v = struct.unpack("<22i", data[:88])
    if not (v[20] and v[21]) or any(d == 0 for d in v[1:20:2]):
        return None

    def chroma(i: int) -> str:  # x and y of a point, in units of 0.00002
        return f"{round(v[i] / v[i + 1] * 50000)},{round(v[i + 2] / v[i + 3] * 50000)}"

    max_lum, min_lum = round(v[18] / v[19] * 10000), round(v[16] / v[17] * 10000)
    return f"G({chroma(4)})B({chroma(8)})R({chroma(0)})WP({chroma(12)})L({max_lum},{min_lum})"


# swscale's default YUV↔RGB path rounds coarsely and reuses each chroma sample for two pixels: flat
# colours came back up to 3 levels off. Exact rounding and full chroma interpolation: within 1.
_TO_RGB = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
_FROM_RGB = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INP

# ------------------------------------------------------------------------------------------ orientation

# numpy versions of FFmpeg's transpose/flip filters, which its autorotation inserts.
_ORIENT_OPS = {
    "clock": lambda a: np.rot90(a, -1),
    "cclock": lambda a: np.rot90(a, 1),
    "cclock_flip": lambda a: a.transpose(1, 0, 2),
    "clock_flip": lambda a: np.rot90(a, -1)[::-1],
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
}


def _display_ops(matrix: tuple[int, ...]) -> tuple[list[str], float]:
    """The filters that show a frame as its display matrix says (as FFmpeg's autorotation picks them).

    Returns the operations and the counter-clockwise angle; None for the operations when the angle is
    not a multiple of 90°.
    """
    s0, s1 = math.hypot(matrix[0], matrix[3]), math.hypot(matrix[1], matrix[4])
    if s0 == 0 or s1 == 0:
        return [], 0.0
    angle = -math.degrees(math.atan2(matrix[1] / s1, matrix[0] / s0))  # av_display_rotation_get
    theta = -round(angle)  # clockwise
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        ops = ["cclock_flip"] if matrix[3] > 0 else ["clock"]
    elif abs(theta - 180) < 1:
        ops = (["hflip"] if matrix[0] < 0 else []) + (["vflip"] if matrix[4] < 0 else [])
    elif abs(theta - 270) < 1:
        ops = ["clock_flip"] if matrix[3] < 0 else ["cclock"]
    elif abs(theta) < 1 or abs(theta - 360) < 1:
        ops = ["vflip"] if matrix[4] < 0 else []
    else:
        return None, angle  # type: ignore[return-value]
    return ops, angle


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) of a PNG file, None for other files."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _read_png16(path: Path) -> np.ndarray:
    """A 16-bit PNG (gray or colour) as uint16 RGB; PIL would cut colour ones to 8 bits."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.to_ndarray(format="rgb48le")


# ------------------------------------------------------------------------------------------ reading


class FrameSource:
    """Frames of a video file or an image folder, decoded one at a time.

    Iterate it (possibly several times: each pass starts from the first frame) to get arrays of shape
    ``(height, width, 3)`` in RGB order, of :attr:`dtype`: ``uint8``, or with ``native_depth=True`` and an
    input deeper than 8 bits, ``uint16`` with full scale 65535. Use it as a context manager, or call
    :meth:`close`, to stop unfinished passes.

    Video frames are converted to RGB with the input's matrix and range (:attr:`colour`), and turned upright
    as the stream's display matrix says (:attr:`rotation`), so they look as a player shows them.

    Attributes:
        path: the input path.
        is_video: True for a video file, False for an image folder.
        width, height: frame size in pixels, as displayed (after rotation).
        bit_depth: bits per channel of the input (8, 10, 12, 16).
        dtype: ``np.uint8`` or ``np.uint16``, the frames' array type.
        is_gray: the folder's first image is grayscale (always False for videos).
        colour: the video's :class:`VideoColour`; None for image folders (sRGB).
        rotation: counter-clockwise degrees by which the stored frames are turned for display (0 if none).
        stream: which video stream is read (0 for the first), None for folders.
        fps: frame rate as a :class:`~fractions.Fraction` (the stream's guessed rate); None for image folders.
        num_frames: number of frames: the number of video packets for videos (exact for intact files unless
            the codec drops some), the number of images for folders.
        time_base: unit of :attr:`timestamps` (Fraction of a second); None for folders.
        timestamps: presentation timestamp of each frame in display order (``int64`` array in ``time_base``
            units), or None for folders and for videos whose packets carry no timestamps.
        image_paths: the images of a folder, in natural name order; None for videos.
        allow_corrupt: the damage policy this source was opened with (see the module documentation).
    """

    path: Path
    is_video: bool
    width: int
    height: int
    fps: Fraction | None
    num_frames: int | None
    time_base: Fraction | None
    timestamps: np.ndarray | None
    image_paths: list[Path] | None
    allow_corrupt: bool
    bit_depth: int
    dtype: type
    is_gray: bool
    colour: VideoColour | None
    rotation: float
    stream: int | None

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        allow_corrupt: bool = False,
        stream: int | None = None,
        native_depth: bool = False,
    ) -> None:
        self.path = Path(path)
        self.allow_corrupt = allow_corrupt
        self.stream = stream
        self.native_depth = native_depth
        self.bit_depth = 8
        self.is_gray = False
        self.colour = None
        self.rotation = 0.0
        self._orient_ops: list[str] = []
        self.fps = None
        self.num_frames = None
        self.time_base = None
        self.timestamps = None
        self.image_paths = None
        self._stream_index = 0
        self._stored_size = (0, 0)  # (width, height) of the decoded frames before rotation
        self._passes: list[Iterator[tuple[np.ndarray, int | None]]] = []
        if not self.path.exists():
            raise VsrkitError(f"input not found: {self.path}")
        if self.path.is_dir():
            self.is_video = False
            self._probe_folder()
        else:
            self.is_video = True
            self._probe_video()
        self.dtype = np.uint16 if native_depth and self.bit_depth > 8 else np.uint8

    # -- probing

    def _probe_folder(self) -> None:
        from PIL import Image

        try:
            names = [
                entry.name
                for entry in os.scandir(self.path)
                if entry.is_file()
                and not entry.name.startswith(".")
                and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            ]
        except OSError as exc:
            raise VsrkitError(f"cannot list folder {self.path}: {_av_reason(exc)}") from exc
        if not names:
            exts = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
            raise VsrkitError(f"no images ({exts}) in folder {self.path}")
        self.image_paths = [self.path / name for name in sorted(names, key=_natural_key)]
        size = None
        for number, image_path in enumerate(self.image_paths):
            try:
                with Image.open(image_path) as image:
                    this = image.size
                    if number == 0:
                        self.is_gray = image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")
                        header = _png_header(image_path)
                        self.bit_depth = 16 if header is not None and header[0] == 16 else 8
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise VsrkitError(f"cannot read image {image_path}: {_av_reason(exc)}") from exc
            if size is None:
                size = this
            elif this != size:
                raise VsrkitError(
                    f"images differ in size in folder {self.path}: {self.image_paths[0].name} is "
                    f"{size[0]}x{size[1]}, {image_path.name} is {this[0]}x{this[1]}"
                )
        assert size is not None
        self.width, self.height = size
        self.num_frames = len(self.image_paths)

    def _open_container(self) -> av.container.InputContainer:
        try:
            return av.open(str(self.path), mode="r")
        except av.error.FFmpegError as exc:
            raise VsrkitError(f"cannot read {self.path} as a video: {_av_reason(exc)}") from exc
        except OSError as exc:
            raise VsrkitError(f"cannot open {self.path}: {_av_reason(exc)}") from exc

    def _probe_video(self) -> None:
        container = self._open_container()
        try:
            if not container.streams.video:
                if not container.streams:
                    raise VsrkitError(f"no streams in {self.path} (not a video, or truncated)")
                raise VsrkitError(f"no video stream in {self.path}")
            stream = self._choose_stream(list(container.streams.video))
            self._stream_index = stream.index
            codec = stream.codec_context
            self.width, self.height = int(codec.width), int(codec.height)
            if self.width <= 0 or self.height <= 0:
                raise VsrkitError(f"video stream of {self.path} has no frame size (unsupported or damaged)")
            self._stored_size = (self.width, self.height)
            rate = stream.guessed_rate or stream.average_rate or stream.base_rate
            self.fps = Fraction(rate) if rate else None
            self.time_base = Fraction(stream.time_base) if stream.time_base else None
            self._scan_packets(container, stream)
        finally:
            container.close()
        self._probe_first_frame()

    def _choose_stream(self, videos: list[av.VideoStream]) -> av.VideoStream:
        """The video stream asked for (by its rank among the video streams), else the first picture one."""
        count = len(videos)
        if self.stream is not None:
            if not 0 <= self.stream < count:
                have = "1 video stream (0)" if count == 1 else f"{count} video streams (0 to {count - 1})"
                raise VsrkitError(f"no video stream {self.stream} in {self.path}: it has {have}")
            chosen = self.stream
        else:
            # Cover art is stored as a one-picture video stream; it is not the video.
            pictures = [
                n for n, v in enumerate(videos) if not v.disposition & av.stream.Disposition.attached_pic
            ]
            chosen = pictures[0] if pictures else 0
        self.stream = chosen
        if count > 1:
            described = ", ".join(
                f"{n}: {v.codec_context.name} {v.codec_context.width}x{v.codec_context.height}"
                for n, v in enumerate(videos)
            )
            _warn(
                f"{self.path} has {count} video streams ({described}); upscaling stream {chosen} "
                "(choose another with --stream N)"
            )
        return videos[chosen]

    def _probe_first_frame(self) -> None:
        """Colour tags, depth, HDR metadata and display matrix, from the stream and its first frame."""
        container = self._open_container()
        try:
            stream = container.streams[self._stream_index]
            codec = stream.codec_context
            pix_fmt = codec.format.name if codec.format is not None else ""
            tags = (codec.colorspace, codec.color_primaries, codec.color_trc, codec.color_range)
            frame = None
            try:
                for packet in container.demux(stream):
                    frames = packet.decode()
                    if frames:
                        frame = frames[0]
                        break
            except av.error.FFmpegError:
                pass  # damage is reported when the frames are read
        finally:
            container.close()
        mastering = light = None
        if frame is not None:
            pix_fmt = frame.format.name
            # A frame's own tags win: some containers carry none and leave them to the bitstream.
            own = (frame.colorspace, frame.color_primaries, frame.color_trc, frame.color_range)
            unspecified = (2, 2, 2, 0)
            tags = tuple(o if o != u else t for o, u, t in zip(own, unspecified, tags, strict=True))
            for side in frame.side_data:
                if side.type == SideDataType.MASTERING_DISPLAY_METADATA:
                    mastering = _mastering_display(bytes(side))
                elif side.type == SideDataType.CONTENT_LIGHT_LEVEL and len(bytes(side)) >= 8:
                    light = struct.unpack("<2I", bytes(side)[:8])
                elif side.type == SideDataType.DISPLAYMATRIX and len(bytes(side)) >= 36:
                    self._set_orientation(struct.unpack("<9i", bytes(side)[:36]))
        colour = VideoColour.resolve(*tags, height=self._stored_size[1], pix_fmt=pix_fmt)
        self.colour = replace(colour, mastering_display=mastering, content_light=light)
        if pix_fmt:
            try:
                self.bit_depth = max(c.bits for c in av.VideoFormat(pix_fmt).components)
            except (ValueError, av.error.FFmpegError):
                pass

    def _set_orientation(self, matrix: tuple[int, ...]) -> None:
        ops, angle = _display_ops(matrix)
        if ops is None:
            _warn(f"{self.path}: the video is to be shown rotated by {angle:.0f}°; frames are used as stored")
            return
        self._orient_ops = ops
        self.rotation = angle
        if any("clock" in op for op in ops):
            self.width, self.height = self._stored_size[1], self._stored_size[0]

    def _scan_packets(self, container: av.container.InputContainer, stream: av.VideoStream) -> None:
        """Demux (no decoding) the video packets: count them, collect timestamps, look for truncation."""
        file_size = self.path.stat().st_size
        index = stream.index_entries
        past_end = sum(1 for entry in index if entry.pos + entry.size > file_size) if len(index) else 0
        pts_list = array.array("q")  # 8 bytes a frame
        have_all_pts = True
        packets = 0
        last_pts = None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                packets += 1
                if packet.is_discard:
                    continue
                if packet.pts is None:
                    have_all_pts = False
                else:
                    pts_list.append(packet.pts)
                    last_pts = packet.pts if last_pts is None else max(last_pts, packet.pts)
        except av.error.FFmpegError as exc:
            if not self.allow_corrupt:
                raise VsrkitError(
                    f"{self.path} is truncated or corrupt: reading failed after {packets} video packets "
                    f"({_av_reason(exc)})"
                ) from exc
            _warn(f"{self.path}: reading stopped after {packets} video packets ({_av_reason(exc)})")
        if packets == 0:
            raise VsrkitError(f"no video frames in {self.path}")
        if len(index) and (past_end or packets < len(index)):
            readable = min(packets, len(index) - past_end)
            message = (
                f"{self.path} is truncated or corrupt: its index lists {len(index)} video frames, "
                f"only about {readable} are in the file"
            )
            if not self.allow_corrupt:
                raise VsrkitError(message)
            _warn(message + "; using the readable part")
        elif last_pts is not None and self.time_base is not None:
            # No usable index: compare with what the headers claim (a hint only, hence a warning).
            claimed = float(stream.duration * self.time_base) if stream.duration else 0.0
            if stream.frames and stream.average_rate:
                claimed = max(claimed, float(stream.frames / stream.average_rate))
            found = float((last_pts - (stream.start_time or 0)) * self.time_base)
            if found < 0.9 * claimed and claimed - found > 1.0:
                _warn(
                    f"{self.path} may be truncated: its headers say the video lasts {claimed:.1f} s, "
                    f"its frames end at {found:.1f} s"
                )
        self.num_frames = len(pts_list) if have_all_pts else packets
        if have_all_pts and pts_list:
            self.timestamps = np.sort(np.frombuffer(pts_list, dtype=np.int64))
            if len(np.unique(self.timestamps)) != len(self.timestamps):
                self.timestamps = None  # duplicated timestamps: the writer falls back to a constant rate

    # -- iteration

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame, _ in self.frames_with_pts():
            yield frame

    def frames_with_pts(self) -> Iterator[tuple[np.ndarray, int | None]]:
        """Yield ``(frame, pts)`` pairs; ``pts`` is :meth:`pts_of` of the frame's index (None for folders)."""
        generator = self._iter_video() if self.is_video else self._iter_folder()
        self._passes = [g for g in self._passes if g.gi_frame is not None]  # type: ignore[attr-defined]
        self._passes.append(generator)
        return generator

    def pts_of(self, index: int) -> int | None:
        """Timestamp of frame ``index`` in :attr:`time_base` units; extrapolated past the known frames.

        None for image folders and for videos without usable timestamps.
        """
        ts = self.timestamps
        if ts is None or len(ts) == 0:
            return None
        if index < len(ts):
            return int(ts[index])
        if len(ts) >= 2:
            step = int(ts[-1] - ts[-2])
        elif self.fps and self.time_base:
            step = max(1, round(1 / (self.fps * self.time_base)))
        else:
            step = 1
        return int(ts[-1]) + (index - len(ts) + 1) * max(step, 1)

    def _iter_folder(self) -> Iterator[tuple[np.ndarray, int | None]]:
        from PIL import Image

        assert self.image_paths is not None
        for image_path in self.image_paths:
            try:
                header = _png_header(image_path)
                if header is not None and header[0] == 16:
                    array = _read_png16(image_path)
                    if self.dtype == np.uint8:
                        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
                else:
                    with Image.open(image_path) as image:
                        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
                    if self.dtype == np.uint16:
                        array = array.astype(np.uint16) * 257
            except (OSError, ValueError, Image.DecompressionBombError, av.error.FFmpegError) as exc:
                raise VsrkitError(f"cannot read image {image_path}: {_av_reason(exc)}") from exc
            if array.shape != (self.height, self.width, 3):
                raise VsrkitError(f"image {image_path} changed size while reading")
            yield array, None

    def _iter_video(self) -> Iterator[tuple[np.ndarray, int | None]]:
        container = self._open_container()
        produced = 0
        skipped_packets = 0
        concealed = 0
        size_warned = False
        rgb_format = "rgb48le" if self.dtype == np.uint16 else "rgb24"
        colour = self.colour
        assert colour is not None
        try:
            stream = container.streams[self._stream_index]
            stream.thread_type = "AUTO"
            packets = container.demux(stream)
            while True:
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except av.error.FFmpegError as exc:
                    if not self.allow_corrupt:
                        raise VsrkitError(
                            f"{self.path} is truncated or corrupt: reading failed after frame {produced} "
                            f"({_av_reason(exc)})"
                        ) from exc
                    _warn(f"{self.path}: reading stopped after frame {produced} ({_av_reason(exc)})")
                    break
                try:
                    frames = packet.decode()
                except av.error.EOFError:
                    break
                except av.error.FFmpegError as exc:
                    if not self.allow_corrupt:
                        raise VsrkitError(
                            f"{self.path} is corrupt: the decoder rejected the data after frame {produced} "
                            f"({_av_reason(exc)})"
                        ) from exc
                    skipped_packets += 1
                    continue
                for frame in frames:
                    if frame.is_corrupt:
                        if not self.allow_corrupt:
                            raise VsrkitError(f"{self.path} is corrupt: frame {produced} is damaged")
                        concealed += 1
                    width, height = self._stored_size
                    if (frame.width, frame.height) != (width, height) and not size_warned:
                        size_warned = True
                        _warn(
                            f"{self.path}: frame size changes to {frame.width}x{frame.height} at frame "
                            f"{produced}; scaling to {width}x{height}"
                        )
                    array = frame.to_ndarray(
                        format=rgb_format,
                        width=width,
                        height=height,
                        src_colorspace=colour.sws_matrix,
                        src_color_range=colour.sws_range,
                        dst_color_range=ColorRange.JPEG,
                        interpolation=_TO_RGB,
                    )
                    for op in self._orient_ops:
                        array = _ORIENT_OPS[op](array)
                    if self._orient_ops:
                        array = np.ascontiguousarray(array)
                    yield array, self.pts_of(produced)
                    produced += 1
        finally:
            container.close()
        expected = self.num_frames
        if produced and expected and produced < expected and not skipped_packets:
            _warn(f"{self.path}: decoded {produced} frames, the file has {expected} video packets")
        if skipped_packets:
            _warn(f"{self.path}: skipped {skipped_packets} undecodable video packets (damaged file)")
        if concealed:
            _warn(f"{self.path}: {concealed} frames are damaged; the decoder concealed the errors")
        if produced == 0:
            raise VsrkitError(f"no decodable video frames in {self.path}")

    # -- lifetime

    def close(self) -> None:
        """Stop any unfinished pass over the frames (closes its decoder)."""
        passes, self._passes = self._passes, []
        for generator in passes:
            generator.close()  # type: ignore[attr-defined]

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "video" if self.is_video else "folder"
        return (
            f"FrameSource({str(self.path)!r}, {kind}, {self.width}x{self.height}, fps={self.fps}, "
            f"num_frames={self.num_frames})"
        )


def open_frames(
    path: str | os.PathLike[str],
    *,
    allow_corrupt: bool = False,
    stream: int | None = None,
    native_depth: bool = False,
) -> FrameSource:
    """Open a video file or an image folder for streaming reading (see :class:`FrameSource`).

    ``stream`` picks a video stream by its rank among the file's video streams (default: the first that is
    not cover art; a warning names it when there are several). ``native_depth`` gives ``uint16`` frames for
    inputs deeper than 8 bits instead of rounding them to ``uint8``.

    Raises :class:`~vsrkit.errors.VsrkitError` for a missing path, a file FFmpeg cannot read, a file without
    video stream or without frames, an empty folder, images of different sizes, and (unless
    ``allow_corrupt``) a truncated or corrupt file. Errors found while decoding are raised from the iteration.
    """
    return FrameSource(path, allow_corrupt=allow_corrupt, stream=stream, native_depth=native_depth)


def read_all_frames(path: str | os.PathLike[str], max_frames: int | None = None) -> np.ndarray:
    """Read the first ``max_frames`` frames (all when None) into one ``(T, H, W, 3)`` uint8 array.

    For short clips in tests and evaluation: unlike :func:`open_frames`, this holds every frame in memory.
    """
    frames: list[np.ndarray] = []
    if max_frames is not None and max_frames <= 0:
        raise ValueError("max_frames must be positive")
    with open_frames(path) as source:
        iterator = iter(source)
        try:
            for frame in iterator:
                frames.append(frame)
                if max_frames is not None and len(frames) >= max_frames:
                    break
        finally:
            iterator.close()  # type: ignore[attr-defined]
        return np.stack(frames)


# ------------------------------------------------------------------------------------------ writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class VideoWriter:
    """Write frames to a video file or a PNG folder, atomically (see the module documentation).

    Create it with :func:`open_writer`. :meth:`write` takes ``uint8`` RGB arrays of shape ``(H, W, 3)``, all
    of the same size. Leaving the ``with`` block normally (or :meth:`close`) publishes the output; an
    exception (or :meth:`abort`) deletes everything written.

    Attributes: ``path`` (the final output), ``is_video``, ``frames_written``, ``fps`` (Fraction, for videos).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        source: FrameSource | None = None,
        fps: float | Fraction | None = None,
        codec: str | None = None,
        crf: int | None = 18,
        pix_fmt: str | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.source = source
        self.crf = crf
        self.overwrite = overwrite
        self.frames_written = 0
        self._finished = False
        self._tmp: Path | None = None
        self._container: av.container.OutputContainer | None = None
        self._video: av.VideoStream | None = None
        self._aux: _AuxCopier | None = None
        self._size: tuple[int, int] | None = None  # (height, width) of the frames given to write()
        self._pad = (0, 0)

        suffix = self.path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            raise VsrkitError(
                f"output {self.path} looks like a single image; give a video file "
                f"({', '.join(VIDEO_EXTENSIONS)}) or a folder name for PNG frames"
            )
        self.is_video = suffix in VIDEO_EXTENSIONS

        # Timing: the source's timestamps when no other rate is asked for, else a constant rate.
        self._use_source_pts = (
            fps is None and source is not None and source.is_video and source.timestamps is not None
        )
        if self._use_source_pts and suffix == ".avi":
            # AVI has one frame duration for the whole stream: it cannot keep a source's timestamps.
            assert source is not None and source.timestamps is not None
            self._use_source_pts = False
            steps = np.diff(source.timestamps)
            if len(steps) and (steps != steps[0]).any():
                _warn(f"{self.path}: AVI cannot store variable frame timing; writing a constant frame rate")
        if fps is not None:
            self.fps = _to_fraction(fps, "frame rate")
        elif source is not None and source.fps:
            self.fps = Fraction(source.fps)
        else:
            self.fps = DEFAULT_FPS

        if self.is_video:
            self.codec = self._choose_codec(codec)
            self.crf = check_crf(crf, self.codec)
            self.pix_fmt = self._video_pix_fmt(pix_fmt)
        else:
            self.codec = None
            self.pix_fmt = self._png_pix_fmt(pix_fmt)
        self.colour = self._output_colour()

        self._check_destination()
        self._make_temp()

    # -- checks before any work

    def _choose_codec(self, codec: str | None) -> str:
        try:
            probe = av.open(os.devnull, mode="w", format=_format_for(self.path))
        except (av.error.FFmpegError, ValueError) as exc:
            raise VsrkitError(
                f"cannot write {self.path}: no FFmpeg muxer for it ({_av_reason(exc)})"
            ) from exc
        try:
            supported = probe.supported_codecs
        finally:
            probe.close()
        if codec is None:
            codec = "libx264" if "h264" in supported else "libvpx-vp9"
        if codec not in av.codecs_available:
            raise VsrkitError(
                f"video encoder {codec!r} is not available in this FFmpeg build (output {self.path})"
            )
        try:
            canonical = av.Codec(codec, "w").canonical_name
        except (av.error.FFmpegError, ValueError) as exc:
            raise VsrkitError(f"video encoder {codec!r} is not available (output {self.path})") from exc
        if canonical not in supported and codec not in supported:
            raise VsrkitError(f"the {self.path.suffix} container cannot hold {codec} video: {self.path}")
        return codec

    def _deep_source(self) -> bool:
        return self.source is not None and self.source.dtype == np.uint16

    def _video_pix_fmt(self, pix_fmt: str | None) -> str:
        assert self.codec is not None
        formats = [f.name for f in (av.Codec(self.codec, "w").video_formats or ())]
        if pix_fmt is not None:
            if formats and pix_fmt not in formats:
                raise VsrkitError(
                    f"{self.codec} cannot encode pixel format {pix_fmt!r} (it can: {', '.join(formats)})"
                )
            return pix_fmt
        bits = self.source.bit_depth if self._deep_source() else 8  # type: ignore[union-attr]
        chosen, chosen_bits = "yuv420p", 8
        for depth in (10, 12):
            name = f"yuv420p{depth}le"
            if depth <= bits and name in formats:
                chosen, chosen_bits = name, depth
        if chosen_bits < bits and self.source is not None and self.source.is_video:
            _warn(
                f"{self.path}: {self.codec} cannot encode {bits}-bit video here; writing {chosen_bits}-bit "
                "(--codec and --pix-fmt choose another; libx265 encodes up to 12 bits)"
            )
        return chosen

    def _png_pix_fmt(self, pix_fmt: str | None) -> str:
        if pix_fmt is None:
            gray = self.source is not None and self.source.is_gray
            deep = self._deep_source()
            return ("gray16be" if deep else "gray") if gray else ("rgb48be" if deep else "rgb24")
        name = _PNG_FORMATS.get(pix_fmt)
        if name is None:
            raise VsrkitError(
                f"PNG frames can be written as rgb24, rgb48, gray or gray16, not {pix_fmt!r} "
                f"(output {self.path})"
            )
        return name

    def _output_colour(self) -> VideoColour:
        """The tags to write: the input video's (filled in as players guess), else BT.709 for images."""
        if self.source is not None and self.source.colour is not None:
            colour = self.source.colour
        else:
            colour = VideoColour(_SPC_BT709, _PRI_BT709, _TRC_BT709, False, False)
        if self.is_video and av.VideoFormat(self.pix_fmt).is_rgb:
            colour = replace(colour, matrix=_SPC_RGB, full_range=True)
        return colour

    def _check_destination(self) -> None:
        path = self.path
        parent = path.parent
        if self.source is not None and path.exists():
            try:
                if path.samefile(self.source.path):
                    raise VsrkitError(f"output {path} is the input; choose another output path")
            except OSError:
                pass
        if path.exists() or path.is_symlink():
            if not self.overwrite:
                raise VsrkitError(f"output {path} exists; pass --overwrite to replace it")
            if path.is_dir() and not path.is_symlink():
                if self.is_video:
                    raise VsrkitError(f"output {path} is an existing folder; cannot replace it with a video")
                self._refuse_foreign_files(path)
        if not parent.exists():
            raise VsrkitError(f"output folder {parent} does not exist (for {path})")
        if not parent.is_dir():
            raise VsrkitError(f"cannot write {path}: {parent} is not a folder")

    def _make_temp(self) -> None:
        folder = self.path.parent
        base = self.path.stem if self.is_video else self.path.name
        try:
            # Temporary outputs of runs killed here earlier (kill -9, power cut): their owner is gone.
            remove_dead_leftovers(folder)
            if self.is_video:
                self._tmp = make_temp_file(folder, base, suffix=self.path.suffix)
            else:
                self._tmp = make_temp_dir(folder, base)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(exc, self.path) from None
            raise VsrkitError(f"cannot write to {folder} (for {self.path}): {_av_reason(exc)}") from exc

    # -- writing

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB frame of shape ``(H, W, 3)``: ``uint8``, or ``uint16`` with full scale 65535."""
        if self._finished:
            raise RuntimeError("write() on a closed VideoWriter")
        if (
            not isinstance(frame, np.ndarray)
            or frame.dtype not in (np.uint8, np.uint16)
            or frame.ndim != 3
            or frame.shape[2] != 3
        ):
            raise ValueError(
                f"frames must be uint8 or uint16 arrays of shape (H, W, 3); got "
                f"{getattr(frame, 'dtype', type(frame))} {getattr(frame, 'shape', '')}"
            )
        if self._size is None:
            self._size = (frame.shape[0], frame.shape[1])
        elif frame.shape[:2] != self._size:
            raise ValueError(f"frame {self.frames_written} is {frame.shape[:2]}, earlier frames {self._size}")
        try:
            if self.is_video:
                self._write_video(frame)
            else:
                self._write_png(frame)
        except av.error.FFmpegError as exc:
            raise VsrkitError(f"writing {self.path} failed: {_av_reason(exc)}") from exc
        except OSError as exc:
            raise VsrkitError(f"writing {self.path} failed: {_av_reason(exc)}") from exc
        self.frames_written += 1

    def _write_png(self, frame: np.ndarray) -> None:
        from PIL import Image

        assert self._tmp is not None
        target = self._tmp / f"{self.frames_written:08d}.png"
        deep = self.pix_fmt in ("rgb48be", "gray16be")
        if deep and frame.dtype == np.uint8:
            frame = frame.astype(np.uint16) * 257
        elif not deep and frame.dtype == np.uint16:
            frame = ((frame.astype(np.uint32) + 128) // 257).astype(np.uint8)
        if self.pix_fmt.startswith("gray"):
            # The luma weights PIL's convert("L") uses; a gray input's channels are equal anyway.
            luma = np.rint(frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
            frame = np.clip(luma, 0, np.iinfo(frame.dtype).max).astype(frame.dtype)
        if deep:
            _write_png16(frame, target)
        else:
            Image.fromarray(frame, mode="L" if frame.ndim == 2 else "RGB").save(target, compress_level=4)

    def _start_video(self, height: int, width: int) -> None:
        assert self._tmp is not None and self.codec is not None
        options = {}
        if self.path.suffix.lower() in (".mp4", ".mov", ".m4v"):
            options["movflags"] = "+faststart"
        self._container = av.open(str(self._tmp), mode="w", format=_format_for(self.path), options=options)
        subsampled = any(tag in self.pix_fmt for tag in ("420", "422", "411", "410")) or self.pix_fmt in (
            "nv12",
            "nv21",
            "nv16",
        )
        if subsampled and (height % 2 or width % 2):
            self._pad = (height % 2, width % 2)
            _warn(
                f"{self.path}: frame size {width}x{height} is odd; padding to "
                f"{width + self._pad[1]}x{height + self._pad[0]} for {self.pix_fmt} (repeating the edge)"
            )
        stream = self._container.add_stream(self.codec, rate=self.fps)
        stream.width = width + self._pad[1]
        stream.height = height + self._pad[0]
        stream.pix_fmt = self.pix_fmt
        options = {}
        if self.crf is not None and self.codec in _CRF_CODECS:
            options["crf"] = str(self.crf)
            if self.codec in ("libvpx-vp9", "libvpx"):
                options["b"] = "0"
        colour = self.colour
        stream.codec_context.colorspace = colour.matrix
        stream.codec_context.color_primaries = colour.primaries
        stream.codec_context.color_trc = colour.transfer
        stream.codec_context.color_range = _RANGE_JPEG if colour.full_range else _RANGE_MPEG
        hdr = _hdr_params(self.codec, colour)
        if hdr is not None:
            options.update(hdr)
        elif colour.mastering_display or colour.content_light:
            _warn(f"{self.path}: {self.codec} cannot carry the input's HDR mastering and light metadata")
        stream.options = options
        if self.path.suffix.lower() == ".avi":
            # AVI stores no presentation timestamps: with B-frames, readers get frames in a shuffled timing.
            stream.codec_context.max_b_frames = 0
        if self._use_source_pts:
            assert self.source is not None and self.source.time_base is not None
            stream.codec_context.time_base = self.source.time_base
            stream.time_base = self.source.time_base
        else:
            stream.codec_context.time_base = 1 / self.fps
            stream.time_base = 1 / self.fps
        self._video = stream
        if self.source is not None and self.source.is_video:
            self._aux = _AuxCopier(self.source.path, self._container, self.path)

    def _write_video(self, frame: np.ndarray) -> None:
        if self._container is None:
            self._start_video(frame.shape[0], frame.shape[1])
        assert self._container is not None and self._video is not None
        if self._pad != (0, 0):
            frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        rgb = av.VideoFrame.from_ndarray(
            np.ascontiguousarray(frame), format="rgb48le" if frame.dtype == np.uint16 else "rgb24"
        )
        video_frame = rgb.reformat(
            format=self.pix_fmt,
            src_color_range=ColorRange.JPEG,
            dst_colorspace=self.colour.sws_matrix,
            dst_color_range=self.colour.sws_range,
            interpolation=_FROM_RGB,
        )
        if self._use_source_pts:
            assert self.source is not None
            video_frame.pts = self.source.pts_of(self.frames_written)
            video_frame.time_base = self.source.time_base
            seconds = video_frame.pts * self.source.time_base
        else:
            video_frame.pts = self.frames_written
            video_frame.time_base = 1 / self.fps
            seconds = self.frames_written / self.fps
        for packet in self._video.encode(video_frame):
            self._mux_video(packet)
        if self._aux is not None:
            self._aux.copy_until(seconds)

    def _mux_video(self, packet: av.Packet) -> None:
        assert self._container is not None
        if packet.dts is not None and packet.pts is not None and packet.dts > packet.pts:
            # libx265 on clips shorter than its B-frame delay returns decode times from uninitialised
            # memory (seen with 2 frames); a decode time after the presentation time is never valid.
            packet.dts = packet.pts
        self._container.mux(packet)

    # -- finishing

    def close(self) -> None:
        """Finish writing and publish the output at ``path`` (see the module documentation). Idempotent."""
        if self._finished:
            return
        try:
            if self.frames_written == 0:
                raise VsrkitError(f"no frames were written to {self.path}")
            if self.is_video:
                self._finish_video()
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._finished = True

    def _finish_video(self) -> None:
        assert self._container is not None and self._video is not None
        try:
            for packet in self._video.encode(None):
                self._mux_video(packet)
            if self._aux is not None:
                source = self.source
                assert source is not None
                if source.num_frames is not None and self.frames_written >= source.num_frames:
                    end = None  # everything: streams may run a little past the video
                elif self._use_source_pts:
                    assert source.time_base is not None
                    last = source.pts_of(self.frames_written - 1)
                    following = source.pts_of(self.frames_written)
                    end = following * source.time_base if following is not None else None
                    if end is None and last is not None:
                        end = last * source.time_base + 1 / self.fps
                else:
                    end = Fraction(self.frames_written) / self.fps
                self._aux.finish(end)
                self._aux = None
            self._container.close()
            self._container = None
        except av.error.FFmpegError as exc:
            raise VsrkitError(f"writing {self.path} failed: {_av_reason(exc)}") from exc
        except OSError as exc:
            raise VsrkitError(f"writing {self.path} failed: {_av_reason(exc)}") from exc

    def _publish(self) -> None:
        assert self._tmp is not None
        tmp, path = self._tmp, self.path
        mode = (0o666 if self.is_video else 0o777) & ~_umask()
        try:
            os.chmod(tmp, mode)
            # No signal between the renames: a run stopped here must leave either the old or the new output.
            with deferred_signals():
                try:
                    put_in_place(tmp, path)  # never replaces: what is there now appeared during the run
                except FileExistsError:
                    if not self.overwrite:
                        raise VsrkitError(
                            f"output {path} appeared during the run; pass --overwrite to replace it "
                            "(this run's result is discarded)"
                        ) from None
                    self._replace_existing(tmp, path)
                self._tmp = None
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(exc, path) from None
            raise VsrkitError(
                f"cannot move the finished output into place at {path}: {_av_reason(exc)}"
            ) from exc

    def _replace_existing(self, tmp: Path, path: Path) -> None:
        """``overwrite=True``: replace what is at ``path`` now, within the rules of _check_destination."""
        if not path.is_dir() or path.is_symlink():
            if self.is_video:
                os.replace(tmp, path)
            else:
                os.unlink(path)  # a file or link where the folder goes
                put_in_place(tmp, path)
            return
        if self.is_video:
            raise VsrkitError(f"output {path} is a folder (it appeared during the run); cannot replace it")
        self._refuse_foreign_files(path)
        # Moved aside, checked again (a file may have been added since), then removed file by file.
        old = make_temp_dir(path.parent, path.name, kind="old")
        os.replace(path, old)  # replaces only the empty folder made just above
        try:
            self._refuse_foreign_files(old, shown=path)
        except VsrkitError:
            try:
                put_in_place(old, path)
            except FileExistsError:
                raise VsrkitError(
                    f"output folder {path} changed during the run; its content is now in {old}"
                ) from None
            raise
        try:
            put_in_place(tmp, path)
        except FileExistsError:
            raise VsrkitError(
                f"output {path} appeared again while it was being replaced; the earlier frames are in {old}"
            ) from None
        remove_folder_holding_only(old, _PNG_NAME)

    @staticmethod
    def _refuse_foreign_files(folder: Path, shown: Path | None = None) -> None:
        """Refuse to replace ``folder`` (named ``shown`` in the message) unless it holds PNG frames only."""
        others = [e.name for e in os.scandir(folder) if not (e.is_file() and _PNG_NAME.fullmatch(e.name))]
        if others:
            raise VsrkitError(
                f"output folder {shown or folder} holds files other than frames (e.g. {others[0]}); "
                "refusing to replace it"
            )

    def abort(self) -> None:
        """Discard everything written; ``path`` is left as it was. Idempotent."""
        self._finished = True
        for closer in (self._aux, self._container):
            if closer is not None:
                try:
                    closer.close()
                except Exception:  # noqa: BLE001 - cleanup must go on
                    pass
        self._aux = None
        self._container = None
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                try:
                    tmp.unlink()
                except FileNotFoundError:
                    pass

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            try:
                self.abort()
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                pass


_PNG_FORMATS = {
    "rgb24": "rgb24",
    "rgb48": "rgb48be",
    "rgb48be": "rgb48be",
    "rgb48le": "rgb48be",
    "gray": "gray",
    "gray8": "gray",
    "gray16": "gray16be",
    "gray16be": "gray16be",
    "gray16le": "gray16be",
}


def _write_png16(frame: np.ndarray, path: Path) -> None:
    """A uint16 (H, W, 3) RGB or (H, W) gray array as a 16-bit PNG (PIL writes only 8-bit colour)."""
    gray = frame.ndim == 2
    picture = av.VideoFrame.from_ndarray(
        np.ascontiguousarray(frame), format="gray16le" if gray else "rgb48le"
    ).reformat(format="gray16be" if gray else "rgb48be")
    encoder = av.CodecContext.create("png", "w")
    encoder.width, encoder.height = frame.shape[1], frame.shape[0]
    encoder.pix_fmt = picture.format.name
    packets = list(encoder.encode(picture)) + list(encoder.encode(None))
    with open(path, "wb") as f:
        for packet in packets:
            f.write(bytes(packet))


def _hdr_params(codec: str, colour: VideoColour) -> dict[str, str] | None:
    """Encoder options that write the HDR mastering-display and light-level SEI (x264 and x265 only)."""
    if not (colour.mastering_display or colour.content_light):
        return None
    light = colour.content_light
    if codec == "libx265":
        parts = [f"master-display={colour.mastering_display}"] if colour.mastering_display else []
        parts += [f"max-cll={light[0]},{light[1]}"] if light else []
        return {"x265-params": ":".join(parts)}
    if codec == "libx264":
        parts = [f"mastering-display={colour.mastering_display}"] if colour.mastering_display else []
        parts += [f"cll={light[0]},{light[1]}"] if light else []
        return {"x264-params": ":".join(parts)}
    return None


def _format_for(path: Path) -> str | None:
    return {
        ".mkv": "matroska",
        ".webm": "webm",
        ".mov": "mov",
        ".m4v": "ipod",
        ".mp4": "mp4",
        ".avi": "avi",
    }.get(path.suffix.lower())


class _AuxCopier:
    """Copies the audio and subtitle streams of a source video into an output container, in time order."""

    def __init__(self, source_path: Path, output: av.container.OutputContainer, out_path: Path) -> None:
        self._input = av.open(str(source_path), mode="r")
        self._map: dict[int, av.stream.Stream] = {}
        self._encoders: dict[int, av.AudioStream] = {}
        supported = output.supported_codecs
        for stream in self._input.streams:
            if stream.type not in ("audio", "subtitle"):
                continue
            name = stream.codec_context.codec.canonical_name
            if name in supported:
                self._map[stream.index] = output.add_stream_from_template(stream)
                continue
            if stream.type == "subtitle":
                _warn(
                    f"{out_path}: subtitle stream #{stream.index} ({name}) cannot go into a "
                    f"{out_path.suffix} file; left out"
                )
                continue
            target = "aac" if "aac" in supported else "libopus" if "opus" in supported else None
            if target is None or target not in av.codecs_available:
                _warn(
                    f"{out_path}: audio stream #{stream.index} ({name}) cannot go into a "
                    f"{out_path.suffix} file; left out"
                )
                continue
            rate = 48000 if target == "libopus" else stream.codec_context.sample_rate
            layout = stream.codec_context.layout.name if stream.codec_context.layout else "stereo"
            encoder = output.add_stream(target, rate=rate, layout=layout)
            encoder.time_base = Fraction(1, rate)
            self._encoders[stream.index] = encoder
            self._map[stream.index] = encoder
            _warn(
                f"{out_path}: audio stream #{stream.index} ({name}) re-encoded to {target} for this container"
            )
        self._output = output
        self._streams = [self._input.streams[i] for i in self._map]
        self._packets = self._input.demux(*self._streams) if self._streams else iter(())
        self._pending: av.Packet | None = None

    @staticmethod
    def _time(packet: av.Packet) -> Fraction | None:
        ts = packet.dts if packet.dts is not None else packet.pts
        if ts is None or packet.time_base is None:
            return None
        return ts * packet.time_base

    def _next(self) -> av.Packet | None:
        if self._pending is not None:
            packet, self._pending = self._pending, None
            return packet
        return next(self._packets, None)

    def copy_until(self, seconds: Fraction | None) -> None:
        """Mux the source packets that start before ``seconds`` (all of them when None)."""
        while True:
            packet = self._next()
            if packet is None:
                return
            if packet.size == 0:
                continue
            when = self._time(packet)
            if seconds is not None and when is not None and when >= seconds:
                self._pending = packet
                return
            self._emit(packet)

    def _emit(self, packet: av.Packet) -> None:
        index = packet.stream_index
        encoder = self._encoders.get(index)
        if encoder is None:
            packet.stream = self._map[index]
            self._output.mux(packet)
            return
        for frame in packet.decode():
            for out_packet in encoder.encode(frame):
                self._output.mux(out_packet)

    def finish(self, end: Fraction | None) -> None:
        self.copy_until(end)
        for index, encoder in self._encoders.items():
            for frame in self._input.streams[index].codec_context.decode(None):
                for out_packet in encoder.encode(frame):
                    self._output.mux(out_packet)
            for out_packet in encoder.encode(None):
                self._output.mux(out_packet)
        self.close()

    def close(self) -> None:
        self._input.close()


def open_writer(
    path: str | os.PathLike[str],
    *,
    source: FrameSource | None = None,
    fps: float | Fraction | None = None,
    codec: str | None = None,
    crf: int | None = 18,
    pix_fmt: str | None = None,
    overwrite: bool = False,
) -> VideoWriter:
    """Open an atomic writer for a video file or a PNG folder (see :class:`VideoWriter`).

    Args:
        path: output path; a video if it ends in one of :data:`VIDEO_EXTENSIONS`, else a folder of PNGs.
        source: the :class:`FrameSource` being processed: its timestamps, frame rate, audio and subtitles are
            reused.
        fps: constant output frame rate; None keeps the source's timing.
        codec: video encoder; None picks libx264 (libvpx-vp9 for WebM). ``crf`` applies to x264/x265/VPx/AV1.
        pix_fmt: output pixel format. None: the source's depth, 8-bit ``yuv420p`` for 8-bit input and
            ``yuv420p10le`` (12 where the encoder can) for deeper input read with ``native_depth``; for PNG
            folders ``rgb24``/``rgb48`` or ``gray``/``gray16`` (gray input) likewise.
        overwrite: replace an existing output (a folder only if it holds nothing but PNG frames).

    Raises :class:`~vsrkit.errors.VsrkitError` at once if the output exists (without ``overwrite``), if its
    folder is missing or not writable, or if the container cannot hold the codec; at the end if an output
    appeared at ``path`` meanwhile (without ``overwrite``).
    """
    return VideoWriter(
        path, source=source, fps=fps, codec=codec, crf=crf, pix_fmt=pix_fmt, overwrite=overwrite
    )
