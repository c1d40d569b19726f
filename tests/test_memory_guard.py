"""Memory: the estimate against measured peaks, automatic tiles, refusals, and tiled peaks that
do not grow with the frame size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import vsrkit
from vsrkit.cli import main
from vsrkit.engine import Upscaler
from vsrkit.errors import VsrkitError
from vsrkit.memory import MEMORY_LIMIT_ENV
from vsrkit.weights import save_vsrkit

# Run in a fresh process, so that the peak is this run's own: RSS before the run, then the
# high-water mark (VmHWM) after it, and the engine's estimate for the same run.
CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    import vsrkit
    from vsrkit.engine import Upscaler
    from vsrkit.memory import current_rss, peak_rss, peak_rss_reset

    arch, size, frames, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    extra = {"edvr_channels": 8} if arch == "iconvsr" else {}
    model = vsrkit.create_model(arch, mid_channels=8, num_blocks=1, **extra).eval()
    rng = np.random.default_rng(0)
    lr = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(frames)]
    engine = Upscaler(model, device="cpu", tile=None if tile == "auto" else int(tile))
    plan = engine.plan(size, size, frames, notice=False)
    peak_rss_reset()
    base = current_rss()
    hr_bytes = 0
    for out in engine.run(iter(lr)):
        hr_bytes = out.nbytes
    print(json.dumps({"peak": peak_rss() - base, "estimate": plan.estimate, "tile": plan.tile,
                      "group": plan.group, "tiles": plan.tiles, "hr_frame_bytes": hr_bytes}))
    """
)


def run_child(arch: str, size: int, frames: int, tile: str = "auto", limit_mb: float | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop(MEMORY_LIMIT_ENV, None)
    if limit_mb is not None:
        env[MEMORY_LIMIT_ENV] = str(limit_mb)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, arch, str(size), str(frames), tile],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"edvr_channels": 8} if arch == "iconvsr" else {}
    return vsrkit.create_model(arch, mid_channels=8, num_blocks=1, **extra).eval()


def clip(size: tuple[int, int], frames: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(frames)]


@pytest.mark.parametrize("arch", ["basicvsr", "iconvsr"])
def test_estimate_covers_the_measured_peak_without_wild_excess(arch):
    for size in (64, 160):
        r = run_child(arch, size, 6, tile="0")
        ratio = r["estimate"] / r["peak"]
        print(f"{arch} {size}²: measured {r['peak'] / 2**20:.0f} MB, estimate {r['estimate'] / 2**20:.0f} MB")
        assert 1.0 <= ratio <= 3.0, (size, r)


def test_auto_tiles_a_frame_that_does_not_fit_and_equals_explicit_tiles(monkeypatch, capsys):
    model = tiny("basicvsr")
    frames = clip((100, 150))
    probe = Upscaler(model, device="cpu", segment_frames=3)
    whole = probe.estimate(100, 150, 100, 150, 1, len(frames))
    one_tile = probe.estimate(100, 150, 64, 64, 1, len(frames))
    assert one_tile < whole
    # Room for one 64-px tile and a little: the whole frame and larger tiles do not fit.
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str((one_tile + (whole - one_tile) // 8) / 2**20))
    auto = Upscaler(model, device="cpu", segment_frames=3)
    plan = auto.plan(100, 150, len(frames))
    assert plan.tile is not None and plan.tile < 150
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "tiles" in notice[0] and "available" in notice[0]
    got = torch.cat(list(auto.run_tensors(iter(frames))))
    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    explicit = Upscaler(model, device="cpu", segment_frames=3, tile=plan.tile)
    assert not explicit.plan(100, 150, len(frames)).spooled  # all tiles in lockstep here
    want = torch.cat(list(explicit.run_tensors(iter(frames))))
    assert got.shape == want.shape == (len(frames), 3, 400, 600)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["iconvsr", "basicvsr_pp"])
def test_spooled_tile_groups_equal_lockstep_tiles(arch, monkeypatch):
    model = tiny(arch)
    frames = clip((72, 136), frames=5)  # IconVSR needs 2p + 1 = 5
    options = dict(device="cpu", tile=64, tile_overlap=8, segment_frames=2, window_frames=3, window_overlap=1)
    want = torch.cat(list(Upscaler(model, **options).run_tensors(iter(frames))))
    probe = Upscaler(model, **options)
    one = probe.estimate(72, 136, 64, 64, 1, len(frames))
    two = probe.estimate(72, 136, 64, 64, 2, len(frames))
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str((one + (two - one) // 2) / 2**20))
    engine = Upscaler(model, **options)
    plan = engine.plan(72, 136, len(frames))
    assert plan.group == 1 < plan.tiles
    got = torch.cat(list(engine.run_tensors(iter(frames))))
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def png_input(tmp_path_factory):
    import av  # noqa: F401 - the image folder reader's dependency

    from vsrkit.data.video import open_writer

    folder = tmp_path_factory.mktemp("frames") / "in"
    with open_writer(folder, fps=25) as writer:
        for frame in clip((96, 96), frames=3):
            writer.write(frame)
    weights = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_vsrkit(tiny("basicvsr"), weights)
    return folder, weights


def cli(args: list[str], limit_mb: float | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(MEMORY_LIMIT_ENV, None)
    if limit_mb is not None:
        env[MEMORY_LIMIT_ENV] = str(limit_mb)
    return subprocess.run(
        [sys.executable, "-m", "vsrkit", "upscale", *args, "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_refuses_in_one_line_when_nothing_fits(png_input, tmp_path):
    folder, weights = png_input
    done = cli([str(folder), str(tmp_path / "out"), "--weights", str(weights), "--device", "cpu"], 50)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("vsrkit: error:"), done.stderr
    assert "need about" in lines[0] and "50 MB available" in lines[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_tile_0_refuses_a_frame_that_fits_only_in_tiles(png_input, tmp_path):
    folder, weights = png_input
    engine = Upscaler(tiny("basicvsr"), device="cpu")
    limit = (engine.estimate(96, 96, 64, 64, 1, 3) + engine.estimate(96, 96, 96, 96, 1, 3)) / 2 / 2**20
    args = [str(folder), str(tmp_path / "out"), "--weights", str(weights), "--device", "cpu"]
    done = cli([*args, "--tile", "0"], limit)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "without tiles" in done.stderr and "Traceback" not in done.stderr
    done = cli(args, limit)  # the default tiles automatically
    assert done.returncode == 0, done.stderr
    assert "tiles" in done.stderr and len(list((tmp_path / "out").iterdir())) == 3


@pytest.mark.parametrize(
    "options, message",
    [
        (["--tile", "-5"], "--tile must be 0 (off) or at least 64"),
        (["--tile", "16"], "--tile must be 0 (off) or at least 64"),
        (["--tile-overlap", "-8"], "--tile-overlap must be a whole number ≥ 0"),
        (["--tile", "64", "--tile-overlap", "32"], "less than half the tile"),
    ],
)
def test_bad_tile_options_get_one_line(png_input, tmp_path, capsys, options, message):
    folder, weights = png_input
    code = main(["upscale", str(folder), str(tmp_path / "out"), "--weights", str(weights), *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_engine_rejects_a_non_integer_tile():
    with pytest.raises(VsrkitError, match="whole number"):
        Upscaler(tiny("basicvsr"), device="cpu", tile=64.5)


def test_tiled_peak_does_not_grow_with_the_frame_size():
    """Same memory limit, LR frames of 96² and 384² (16× the pixels), 64-px tiles.

    The HR frame itself (blend, result, 8-bit copy) is 16× larger at 384² and unavoidable, so
    it is taken out: what is left (model, tile groups, spool buffers) must not grow.
    """
    small = run_child("basicvsr", 96, 2, tile="64", limit_mb=600)
    large = run_child("basicvsr", 384, 2, tile="64", limit_mb=600)
    assert large["group"] < large["tiles"]  # the large frame ran in groups through the spool
    # Four fp32 HR frames per uint8 HR frame's worth: the blend sum, weights, result, 8-bit.
    engine_small = small["peak"] - 4 * 4 * small["hr_frame_bytes"]
    engine_large = large["peak"] - 4 * 4 * large["hr_frame_bytes"]
    print(
        f"peak 96²: {small['peak'] / 2**20:.0f} MB, 384²: {large['peak'] / 2**20:.0f} MB; "
        f"without the HR frame: {engine_small / 2**20:.0f} / {engine_large / 2**20:.0f} MB"
    )
    assert engine_large <= 1.2 * engine_small + 32 * 2**20
    assert large["peak"] <= 600 * 2**20
