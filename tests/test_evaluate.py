"""The papers' evaluation protocol: vsrkit.evaluate and ``vsrkit eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vsrkit import create_model
from vsrkit.cli import main
from vsrkit.data.degradations import degrade, imresize
from vsrkit.data.video import read_all_frames
from vsrkit.errors import VsrkitError
from vsrkit.evaluate import default_space, default_weights, evaluate, format_table
from vsrkit.hub import get_entry
from vsrkit.metrics import psnr, ssim, to_uint8
from vsrkit.weights import save_vsrkit

REQUIRED = {"model", "dataset", "clips", "mean"}
EXTRA = {"weights", "degradation", "space", "split", "crop_border", "max_frames", "full_protocol"}


def save(frames, folder: Path, names=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:08d}.png" for i in range(len(frames))]
    for frame, name in zip(frames, names, strict=True):
        Image.fromarray(np.asarray(frame)).save(folder / name)


@pytest.fixture(scope="module")
def hr(shared_data: Path) -> np.ndarray:
    """7 real frames (TOFlow baseball) cropped to 64x96 GT: (7, 64, 96, 3) uint8."""
    frames = []
    for i in range(1, 8):
        with Image.open(shared_data / "toflow_hr_baseball" / f"{i:02d}.png") as im:
            frames.append(np.asarray(im.convert("RGB"))[320:384, 620:716])
    return np.stack(frames)


@pytest.fixture(scope="module")
def vid4(tmp_path_factory, hr: np.ndarray) -> Path:
    """A Vid4-layout root: two clips of 2 and 4 frames, with BIx4 LR."""
    root = tmp_path_factory.mktemp("Vid4")
    for name, frames in (("calendar", hr[:2]), ("walk", hr[3:7])):
        save(frames, root / "GT" / name)
        save([degrade(f, "bi") for f in frames], root / "BIx4" / name)
    return root


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("basicvsr", mid_channels=8, num_blocks=1)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_vsrkit(model, path)
    return path


def by_hand(pairs_per_clip: dict[str, list[tuple[np.ndarray, np.ndarray]]], space: str = "y"):
    """Per-frame PSNR/SSIM → per-clip means → mean over clips, written out plainly."""
    clips = {}
    for name, pairs in pairs_per_clip.items():
        ps = [psnr(p, g, space=space) for p, g in pairs]
        ss = [ssim(p, g, space=space) for p, g in pairs]
        clips[name] = (sum(ps) / len(ps), sum(ss) / len(ss), len(pairs))
    mean_p = sum(c[0] for c in clips.values()) / len(clips)
    mean_s = sum(c[1] for c in clips.values()) / len(clips)
    return clips, mean_p, mean_s


# --------------------------------------------------------------------------- protocol


def test_bicubic_baseline_is_matlab_imresize_of_the_lr(vid4: Path):
    result = evaluate("bicubic", dataset="vid4", root=vid4, progress=False)
    pairs = {}
    for name in ("calendar", "walk"):
        gt = read_all_frames(vid4 / "GT" / name)
        lq = read_all_frames(vid4 / "BIx4" / name)
        pairs[name] = [(imresize(lq[t], 4), gt[t]) for t in range(len(gt))]
    clips, mean_p, mean_s = by_hand(pairs)
    for name, (p, s, n) in clips.items():
        assert result["clips"][name] == {
            "psnr": pytest.approx(p, abs=1e-9),
            "ssim": pytest.approx(s, abs=1e-12),
            "frames": n,
        }
    assert result["mean"] == {
        "psnr": pytest.approx(mean_p, abs=1e-9),
        "ssim": pytest.approx(mean_s, abs=1e-12),
    }
    # Bicubic on Vid4 BI: the paper's 23.78/0.6347 is shown for comparison.
    assert result["published"] == {"paper": [23.78, 0.6347]} and result["full_protocol"] is True
    assert result["weights"] is None and result["space"] == "y"


def test_mean_is_over_clips_of_per_clip_means(vid4: Path, tiny_weights: Path):
    result = evaluate("basicvsr", weights=str(tiny_weights), dataset="vid4", root=vid4, progress=False)
    model = create_model("basicvsr", checkpoint=tiny_weights)
    pairs = {}
    for name in ("calendar", "walk"):
        gt = read_all_frames(vid4 / "GT" / name)
        lq = read_all_frames(vid4 / "BIx4" / name)
        with torch.no_grad():
            out = model(torch.from_numpy(lq).permute(0, 3, 1, 2).float().div(255).unsqueeze(0))[0]
        pairs[name] = [(to_uint8(out[t]), gt[t]) for t in range(len(gt))]
    clips, mean_p, mean_s = by_hand(pairs)
    assert [result["clips"][n]["frames"] for n in ("calendar", "walk")] == [2, 4]
    for name, (p, s, _) in clips.items():
        assert result["clips"][name]["psnr"] == pytest.approx(p, abs=1e-9)
        assert result["clips"][name]["ssim"] == pytest.approx(s, abs=1e-12)
    assert result["mean"]["psnr"] == pytest.approx(mean_p, abs=1e-9)
    assert result["mean"]["ssim"] == pytest.approx(mean_s, abs=1e-12)
    # Not the mean over all frames pooled (the two clips have different lengths).
    all_frames = [psnr(p, g) for v in pairs.values() for p, g in v]
    assert abs(result["mean"]["psnr"] - sum(all_frames) / len(all_frames)) > 1e-6


class MirrorStub(nn.Module):
    """Output t = nearest x4 upscale of input t, scaled, plus t/40: each output index is recognisable."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        n, t, c, h, w = x.shape
        up = x.repeat_interleave(4, dim=3).repeat_interleave(4, dim=4)
        out = 0.6 * up + torch.arange(t, dtype=x.dtype).view(1, t, 1, 1, 1) / 40
        self.outputs.append(out.clone())
        return out


def test_vimeo_mirror_protocol_scores_the_centre_frame_only(tmp_path: Path, hr: np.ndarray):
    root = tmp_path / "vimeo"
    names = [f"im{i}.png" for i in range(1, 8)]
    lq = np.stack([degrade(f, "bi") for f in hr])
    garbage = np.zeros_like(hr)
    gt = garbage.copy()
    gt[3] = hr[3]  # only im4 is real: the other GT frames must not matter
    save(gt, root / "sequences" / "00001" / "0001", names)
    save(lq, root / "BIx4" / "00001" / "0001", names)
    (root / "sep_testlist.txt").write_text("00001/0001\n")

    stub = MirrorStub().train()
    result = evaluate(stub, dataset="vimeo90k-t", root=root, progress=False)
    assert stub.training  # a caller's module gets its own mode back
    (x,) = stub.inputs
    assert x.shape == (1, 14, 3, 16, 24)
    torch.testing.assert_close(x[0, 7:], x[0, :7].flip(0), rtol=0, atol=0)  # lq + lq[::-1]
    torch.testing.assert_close(x[0, 3], torch.from_numpy(lq[3]).permute(2, 0, 1).float() / 255)
    (out,) = stub.outputs
    centre = to_uint8(0.5 * (out[0, 3] + out[0, 10]))
    assert result["clips"] == {
        "00001/0001": {"psnr": psnr(centre, hr[3]), "ssim": ssim(centre, hr[3]), "frames": 1}
    }
    # The test can tell the right pair from a wrong one.
    assert psnr(to_uint8(out[0, 3]), hr[3]) != result["mean"]["psnr"]
    assert psnr(to_uint8(0.5 * (out[0, 3] + out[0, 11])), hr[3]) != result["mean"]["psnr"]

    # bicubic on the same septuplet: imresize of im4's LR against GT im4.
    bic = evaluate("bicubic", dataset="vimeo90k-t", root=root, progress=False)
    assert bic["mean"]["psnr"] == psnr(imresize(lq[3], 4), hr[3])
    assert bic["clips"]["00001/0001"]["frames"] == 1


def test_result_schema_and_table(vid4: Path, tiny_weights: Path):
    result = evaluate(
        "basicvsr", weights=str(tiny_weights), dataset="vid4", root=vid4, clips=["walk"], max_frames=3,
        space="rgb", progress=False,
    )  # fmt: skip
    assert set(result) == REQUIRED | EXTRA  # no "published": a file has no registered scores
    assert result["model"] == "basicvsr" and result["dataset"] == "vid4"
    assert list(result["clips"]) == ["walk"]
    assert set(result["clips"]["walk"]) == {"psnr", "ssim", "frames"}
    assert result["clips"]["walk"]["frames"] == 3
    assert set(result["mean"]) == {"psnr", "ssim"}
    assert all(isinstance(v, float) for v in result["mean"].values())
    assert result["full_protocol"] is False and result["space"] == "rgb"
    json.dumps(result)  # serialisable as is
    table = format_table(result)
    row = result["clips"]["walk"]
    assert "walk" in table and f"{row['psnr']:.4f}/{row['ssim']:.4f}" in table
    assert "model basicvsr" in table and "dataset vid4" in table and "space RGB" in table


def test_published_numbers_and_defaults():
    assert (
        default_space("reds4") == "rgb"
        and default_space("redsval4") == "rgb"
        and default_space("vid4") == "y"
    )
    assert default_weights("basicvsr", "reds4", "bi") == "basicvsr_reds4"
    assert default_weights("basicvsr", "vid4", "bi") == "basicvsr_vimeo90k_bi"
    assert default_weights("basicvsr", "udm10", "bd") == "basicvsr_vimeo90k_bd"
    for arch in ("basicvsr", "iconvsr", "basicvsr_pp"):
        for dataset, deg in (("reds4", "bi"), ("vid4", "bi"), ("vid4", "bd")):
            assert get_entry(default_weights(arch, dataset, deg)).arch == arch
    result = {
        "model": "basicvsr", "dataset": "vid4", "clips": {"a": {"psnr": 27.3, "ssim": 0.83, "frames": 3}},
        "mean": {"psnr": 27.3, "ssim": 0.83}, "weights": "basicvsr_vimeo90k_bi", "degradation": "bi",
        "space": "y", "published": {"mmagic": [27.2755, 0.8248], "paper": [27.24, 0.8251]},
    }  # fmt: skip
    table = format_table(result)
    assert "27.2755/0.8248" in table and "27.24/0.8251" in table and "+0.0245 dB" in table


def test_evaluate_errors(vid4: Path, tmp_path: Path):
    with pytest.raises(VsrkitError, match="no ground truth"):
        save([np.zeros((16, 16, 3), np.uint8)], tmp_path / "BIx4" / "lr_only")
        evaluate("bicubic", dataset="vid4", root=tmp_path, progress=False)
    with pytest.raises(VsrkitError, match="unknown model"):
        evaluate("edvr", dataset="vid4", root=vid4, progress=False)
    with pytest.raises(VsrkitError, match="no weights"):
        evaluate("bicubic", weights="basicvsr_reds4", dataset="vid4", root=vid4, progress=False)
    with pytest.raises(VsrkitError, match="needs at least"):  # IconVSR with 2 frames
        evaluate(create_model("iconvsr", mid_channels=8, num_blocks=1, edvr_channels=8), dataset="vid4",
                 root=vid4, clips=["calendar"], progress=False)  # fmt: skip


# --------------------------------------------------------------------------- CLI


def test_cli_eval_json(vid4: Path, tiny_weights: Path, tmp_path: Path, capsys):
    out = tmp_path / "res" / "r.json"
    argv = [
        "eval",
        "--model",
        "basicvsr",
        "--weights",
        str(tiny_weights),
        "--dataset",
        "vid4",
        "--root",
        str(vid4),
    ]
    assert main([*argv, "--clips", "calendar", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data) == REQUIRED | EXTRA
    expected = evaluate(
        "basicvsr", weights=str(tiny_weights), dataset="vid4", root=vid4, clips=["calendar"], progress=False
    )
    assert data == json.loads(json.dumps(expected))  # the API's numbers, exactly
    assert format_table(data) in printed
    assert list(out.parent.iterdir()) == [out]  # no temporary file left beside it

    # --set passes model options (here: two independent segments, a paper ablation).
    assert main([*argv, "--set", "num_segments=2", "--clips", "calendar", "--no-progress"]) == 0
    assert "calendar" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "vid4", "--root", "{missing}"], "dataset root not found"),
        (
            ["--dataset", "vid4", "--root", "{vid4}", "--clips", "walk,foliage"],
            "unknown clip(s) foliage in vid4; available: calendar, walk",
        ),
        (["--dataset", "vid5", "--root", "{vid4}"], "unknown dataset 'vid5'"),
        (["--dataset", "vid4", "--root", "{vid4}", "--set", "nope"], "--set expects KEY=VALUE"),
        (["--dataset", "vid4", "--root", "{vid4}", "--degradation", "bx"], "unknown degradation"),
    ],
)
def test_cli_bad_input_is_one_line(vid4: Path, tmp_path: Path, capsys, args, message):
    args = [a.format(missing=tmp_path / "missing", vid4=vid4) for a in args]
    assert main(["eval", "--model", "bicubic", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("vsrkit: error: ")
    assert message in captured.err and "Traceback" not in captured.err


def test_cli_unknown_model_option_is_one_line(vid4: Path, tiny_weights: Path, capsys):
    rc = main(["eval", "--model", "basicvsr", "--weights", str(tiny_weights), "--dataset", "vid4", "--root",
               str(vid4), "--set", "warp_mode=fast", "--no-progress"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown basicvsr option warp_mode" in err


# --------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def shared_clips(tmp_path_factory, shared_data: Path) -> Path:
    """Folder layout: 2 clips x 5 frames of 128x128 real GT (TOFlow baseball, bikes.mp4)."""
    root = tmp_path_factory.mktemp("shared_clips")
    frames = []
    for i in range(1, 6):
        with Image.open(shared_data / "toflow_hr_baseball" / f"{i:02d}.png") as im:
            frames.append(np.asarray(im.convert("RGB"))[264:392, 564:692])
    save(frames, root / "baseball")
    bikes = read_all_frames(shared_data / "videos" / "bikes.mp4", max_frames=5)
    save(bikes[:, 72:200, 256:384], root / "bikes")
    return root


@pytest.mark.slow
def test_official_basicvsr_beats_bicubic_on_real_frames(shared_clips: Path, tmp_path: Path, capsys):
    results = {}
    for model in ("bicubic", "basicvsr"):
        out = tmp_path / f"{model}.json"
        argv = [
            "eval",
            "--model",
            model,
            "--dataset",
            "folder",
            "--root",
            str(shared_clips),
            "--json",
            str(out),
        ]
        if model == "basicvsr":
            argv += ["--weights", "basicvsr_vimeo90k_bi", "--device", "cpu"]
        assert main([*argv, "--no-progress"]) == 0
        results[model] = json.loads(out.read_text())
    with capsys.disabled():
        for r in results.values():
            print("\n" + format_table(r))
    bic, net = results["bicubic"], results["basicvsr"]
    assert net["weights"] == "basicvsr_vimeo90k_bi"
    assert {c: r["frames"] for c, r in net["clips"].items()} == {"baseball": 5, "bikes": 5}
    for clip in ("baseball", "bikes"):
        assert net["clips"][clip]["psnr"] > bic["clips"][clip]["psnr"] + 1.0
        assert net["clips"][clip]["ssim"] > bic["clips"][clip]["ssim"]
    assert math.isfinite(net["mean"]["psnr"]) and net["mean"]["psnr"] > bic["mean"]["psnr"] + 1.0
