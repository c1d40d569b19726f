"""Regenerate examples/sample.mp4: 2 s of OpenCV's real cup.mp4 at 160×120, with its audio.

Run from the repository root with ../shared beside it: ``python examples/make_sample.py``.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vsrkit.data.degradations import bi_degrade

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "cup.mp4"
TARGET = Path(__file__).resolve().parent / "sample.mp4"
SECONDS = 2.0


def main() -> None:
    with av.open(str(SOURCE)) as src, av.open(str(TARGET), "w") as dst:
        vin = src.streams.video[0]
        ain = src.streams.audio[0]
        vout = dst.add_stream("libx264", rate=vin.average_rate)
        vout.width, vout.height, vout.pix_fmt = 160, 120, "yuv420p"
        vout.options = {"crf": "16"}
        aout = dst.add_stream("aac", rate=ain.rate)
        aout.layout = ain.layout.name
        for frame in src.decode(vin):
            if frame.time > SECONDS:
                break
            # The sample is made the way the papers make LR input: MATLAB bicubic ×1/4.
            lr = bi_degrade(frame.to_ndarray(format="rgb24"), 4)
            out = av.VideoFrame.from_ndarray(np.ascontiguousarray(lr), format="rgb24")
            out.pts = None
            dst.mux(vout.encode(out))
        dst.mux(vout.encode())
        src.seek(0)
        resampler = av.AudioResampler(format="fltp", layout=ain.layout.name, rate=ain.rate)
        for frame in src.decode(ain):
            if frame.time is not None and frame.time > SECONDS:
                break
            for f in resampler.resample(frame):
                f.pts = None
                dst.mux(aout.encode(f))
        dst.mux(aout.encode())
    print(f"wrote {TARGET} ({TARGET.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
