"""No user data is ever lost: races at the output path, concurrent runs, signals, leftovers, full disks.

Races are made deterministic with a hook in ``VideoWriter.write``: after a given frame the test (or, in a
subprocess, the hook itself) acts while the run is certainly in progress, with its temporary output and
spill folder on disk. Subprocesses run the real ``vsrkit`` CLI so that signals reach its handlers. Tiny
models (8 channels, 1 block) on 4 LR frames of 32×32 keep every run short; races and
full disks that need no model are tested on the writer alone. No timing is asserted.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import vsrkit
from vsrkit.cli import main
from vsrkit.data.degradations import bi_degrade
from vsrkit.data.video import VideoWriter, open_frames, open_writer
from vsrkit.errors import VsrkitError
from vsrkit.fsutil import DiskFullError, owner_tag, put_in_place
from vsrkit.weights import atomic_write, save_vsrkit

REPO = Path(__file__).resolve().parents[1]
FRAMES = 4
OUT_SIZE = (128, 128)
HOST = owner_tag().split("-")[1]

# Runs the CLI with VideoWriter.write hooked: after frame PAUSE_AFTER it writes its pid to MARKER, then
# waits until GO exists (forever if GO is never made: a signal or kill ends it).
HOOKED_CLI = r"""
import os, sys, time
from pathlib import Path
import vsrkit.data.video as video
pause_after, marker, go = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
write = video.VideoWriter.write
def hooked(self, frame):
    write(self, frame)
    if self.frames_written == pause_after:
        marker.write_text(str(os.getpid()))
        while not go.exists():
            time.sleep(0.02)
video.VideoWriter.write = hooked
from vsrkit.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_basicvsr.safetensors"
    save_vsrkit(vsrkit.create_model("basicvsr", mid_channels=8, num_blocks=1), path)
    return path


@pytest.fixture(scope="module")
def lr_clip(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 frames of the real tree.avi, MATLAB-bicubic ×1/4, cropped to 32×32."""
    out = tmp_path_factory.mktemp("clips") / "tree_lr.mp4"
    with open_frames(shared_data / "videos" / "tree.avi") as source:
        with open_writer(out, fps=25, crf=12) as writer:
            for index, frame in enumerate(source):
                if index == FRAMES:
                    break
                writer.write(np.ascontiguousarray(bi_degrade(frame)[:32, :32]))
    return out


def frames_for_writer(count: int = FRAMES) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture
def spill_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary directory of this test's own, for in-process runs and subprocesses alike."""
    root = tmp_path / "tmpdir"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def upscale_args(src: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return ["upscale", str(src), str(out), "--weights", str(weights), "--quiet", *extra]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def spill_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("vsrkit-"))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vsrkit: error: ") and "\n" not in err, err
    return err


def decoded_frames(path: Path) -> tuple[int, tuple[int, int]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, (stream.codec_context.width, stream.codec_context.height)


ORIGINAL_WRITE = VideoWriter.write


def hook_writer(monkeypatch: pytest.MonkeyPatch, after: int, action) -> None:
    """Run ``action()`` in the middle of the run: after frame ``after`` is written."""
    write = ORIGINAL_WRITE

    def hooked(self: VideoWriter, frame: np.ndarray) -> None:
        write(self, frame)
        if self.frames_written == after:
            action()

    monkeypatch.setattr(VideoWriter, "write", hooked)


def start_hooked(args: list[str], folder: Path, name: str, spill: Path, pause_after: int = 2):
    marker, go = folder / f"{name}.paused", folder / f"{name}.go"
    env = {**os.environ, "TMPDIR": str(spill), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", HOOKED_CLI, str(pause_after), str(marker), str(go), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, marker, go


def wait_paused(proc: subprocess.Popen, marker: Path) -> None:
    deadline = time.monotonic() + 600  # a guard against hanging forever, not a speed check
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before pausing: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, "the run never reached its pause"
        time.sleep(0.02)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------ races at the output


def appear(out: Path, what: str) -> None:
    """The user (or another program) puts ``what`` at ``out``."""
    if what == "file":
        out.write_bytes(b"the user's file")
        return
    out.mkdir()
    if what == "folder":
        (out / "notes.txt").write_text("the user's notes")


def untouched(out: Path, what: str) -> bool:
    if what == "file":
        return out.read_bytes() == b"the user's file"
    return sorted(p.name for p in out.iterdir()) == ([] if what == "empty folder" else ["notes.txt"])


@pytest.mark.parametrize(
    ("output", "what"),
    [("out.mp4", "file"), ("out.mp4", "folder"), ("frames", "empty folder"), ("frames", "file")],
)
def test_what_appears_at_the_output_during_writing_is_kept(tmp_path, output, what) -> None:
    out = tmp_path / output
    with pytest.raises(VsrkitError) as caught:
        with open_writer(out, fps=25) as writer:
            for index, frame in enumerate(frames_for_writer()):
                writer.write(frame)
                if index == 1:
                    appear(out, what)
    assert str(caught.value) == (
        f"output {out} appeared during the run; pass --overwrite to replace it "
        "(this run's result is discarded)"
    )
    assert untouched(out, what) and leftovers(tmp_path) == []


def test_a_folder_appearing_during_a_cli_run_is_one_line_and_kept(
    lr_clip, weights, tmp_path, spill_root, monkeypatch, capsys
) -> None:
    out = tmp_path / "out.mp4"
    hook_writer(monkeypatch, 2, lambda: appear(out, "folder"))
    assert main(upscale_args(lr_clip, out, weights)) == 2
    assert f"output {out} appeared during the run; pass --overwrite" in one_error_line(capsys)
    assert untouched(out, "folder") and leftovers(tmp_path) == [] and spill_folders(spill_root) == []


def test_overwrite_replaces_frames_or_a_file_but_never_a_folder_of_user_files(tmp_path) -> None:
    frames = tmp_path / "frames"
    with pytest.raises(VsrkitError, match="holds files other than frames \\(e.g. notes.txt\\)"):
        with open_writer(frames, overwrite=True) as writer:
            for index, frame in enumerate(frames_for_writer()):
                writer.write(frame)
                if index == 1:
                    appear(frames, "folder")
                    (frames / "00000000.png").write_bytes(b"a frame")
    assert sorted(p.name for p in frames.iterdir()) == ["00000000.png", "notes.txt"]

    # A folder of nothing but frames, and a file at a video output, may be replaced with --overwrite.
    (frames / "notes.txt").unlink()
    video = tmp_path / "out.mp4"
    for out in (frames, video):
        with open_writer(out, fps=25, overwrite=True) as writer:
            for index, frame in enumerate(frames_for_writer()):
                writer.write(frame)
                if index == 1 and out == video:
                    appear(video, "file")
    assert sorted(p.name for p in frames.iterdir()) == [f"{i:08d}.png" for i in range(FRAMES)]
    assert decoded_frames(video) == (FRAMES, (64, 48))
    assert leftovers(tmp_path) == []


def test_two_concurrent_runs_to_one_output(lr_clip, weights, tmp_path) -> None:
    spill = tmp_path / "tmpdir"
    spill.mkdir()
    out = tmp_path / "out.mp4"
    runs = [start_hooked(upscale_args(lr_clip, out, weights), tmp_path, name, spill) for name in "ab"]
    for proc, marker, _ in runs:
        wait_paused(proc, marker)  # both are now mid-run, each with its own partial file
    assert len(leftovers(tmp_path)) == 2
    for _, _, go in runs:
        go.touch()
    results = [proc.communicate(timeout=600) + (proc.returncode,) for proc, _, _ in runs]
    assert sorted(code for _, _, code in results) == [0, 2], results
    loser_err = next(err for _, err, code in results if code == 2).strip()
    assert loser_err.startswith("vsrkit: error: ") and "\n" not in loser_err
    assert f"output {out} appeared during the run; pass --overwrite" in loser_err
    assert decoded_frames(out) == (FRAMES, OUT_SIZE)  # the winner's complete video
    assert leftovers(tmp_path) == [] and spill_folders(spill) == []


# ------------------------------------------------------------------------------ signals, kill -9


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(lr_clip, weights, tmp_path, signum) -> None:
    spill = tmp_path / "tmpdir"
    spill.mkdir()
    out = tmp_path / "out.mp4"
    proc, marker, _ = start_hooked(upscale_args(lr_clip, out, weights), tmp_path, "run", spill)
    wait_paused(proc, marker)
    assert len(leftovers(tmp_path)) == 1 and len(spill_folders(spill)) == 1
    assert str(proc.pid) in leftovers(tmp_path)[0] and str(proc.pid) in spill_folders(spill)[0]
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signum
    assert err.strip() == f"vsrkit: stopped by {signal.Signals(signum).name}"
    assert leftovers(tmp_path) == [] and spill_folders(spill) == [] and not out.exists()


def test_kill_9_leftovers_are_removed_by_the_next_run(lr_clip, weights, tmp_path, spill_root, capsys) -> None:
    proc, marker, _ = start_hooked(
        upscale_args(lr_clip, tmp_path / "out.mp4", weights), tmp_path, "run", spill_root
    )
    wait_paused(proc, marker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=600)
    partial, spill = leftovers(tmp_path), spill_folders(spill_root)
    assert len(partial) == 1 and len(spill) == 1 and str(proc.pid) in partial[0]
    assert (spill_root / spill[0] / "frames.u8").stat().st_size > 0

    # Not ours to remove: a live owner's files (the test's parent process), a name that only looks like
    # vsrkit's, another machine's leftover, and a dead owner's folder that holds a user's file.
    alive = f".other.partial-{os.getppid()}-{HOST}-abcd1234.mp4"
    other_host = f".other.partial-{dead_pid()}-{'0' if HOST[0] != '0' else '1'}{HOST[1:]}-abcd1234.mp4"
    lookalike = ".notes.partial-draft.txt"
    for name in (alive, other_host, lookalike):
        (tmp_path / name).write_bytes(b"keep")
    foreign = spill_root / f"vsrkit-{dead_pid()}-{HOST}-abcd1234"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep")

    assert main(upscale_args(lr_clip, tmp_path / "again.mp4", weights)) == 0, capsys.readouterr().err
    assert leftovers(tmp_path) == sorted([alive, other_host, lookalike])
    assert spill_folders(spill_root) == [foreign.name] and (foreign / "thesis.tex").exists()
    assert decoded_frames(tmp_path / "again.mp4")[0] == FRAMES


# ------------------------------------------------------------------------------ eval --json


@pytest.fixture(scope="module")
def vid4(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Vid4-layout root: one clip of 2 real frames (64×96 GT) with BIx4 LR."""
    from PIL import Image

    root = tmp_path_factory.mktemp("Vid4")
    for kind in ("GT", "BIx4"):
        (root / kind / "clip").mkdir(parents=True)
    for i in (1, 2):
        with Image.open(shared_data / "toflow_hr_baseball" / f"{i:02d}.png") as im:
            gt = np.asarray(im.convert("RGB"))[320:384, 620:716]
        Image.fromarray(gt).save(root / "GT" / "clip" / f"{i:08d}.png")
        Image.fromarray(np.ascontiguousarray(bi_degrade(gt))).save(root / "BIx4" / "clip" / f"{i:08d}.png")
    return root


def test_eval_json_never_replaces_a_file_without_overwrite(vid4, tmp_path, monkeypatch, capsys) -> None:
    import vsrkit.evaluate

    out = tmp_path / "result.json"
    argv = ["eval", "--model", "bicubic", "--dataset", "vid4", "--root", str(vid4), "--no-progress"]
    out.write_text("the user's file")
    assert main([*argv, "--json", str(out)]) == 2
    assert f"--json {out} exists; pass --overwrite" in one_error_line(capsys)
    assert out.read_text() == "the user's file"

    # A file that appears while the evaluation runs is kept, too.
    fresh = tmp_path / "fresh.json"
    evaluate = vsrkit.evaluate.evaluate

    def evaluate_while_a_file_appears(*args, **kwargs):
        fresh.write_text("appeared meanwhile")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(vsrkit.evaluate, "evaluate", evaluate_while_a_file_appears)
    assert main([*argv, "--json", str(fresh)]) == 2
    assert f"--json {fresh} appeared during the evaluation; pass --overwrite" in one_error_line(capsys)
    assert fresh.read_text() == "appeared meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.json", "result.json"]  # no temp file

    monkeypatch.undo()
    assert main([*argv, "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["dataset"] == "vid4"


# ------------------------------------------------------------------------------ train work folder


@pytest.fixture(scope="module")
def tiny_train(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cache = tmp_path_factory.mktemp("frame_cache")
    sets = [
        f"data.root={shared_data / 'videos'}",
        "data.clips=[tree.avi]",
        "data.max_frames_per_video=6",
        f"data.cache_dir={cache}",
        "data.num_frames=3",
        "data.lr_patch=16",
        "data.batch_size=1",
        "data.num_workers=0",
        "model.mid_channels=8",
        "model.num_blocks=1",
        "val.every=0",
        "train.fix_iter=0",
        "train.num_threads=1",
    ]
    return [str(REPO / "configs" / "tiny_cpu.yaml"), *(a for s in sets for a in ("--set", s))]


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _iterations(work: Path) -> list[int]:
    return [r["iter"] for r in map(json.loads, (work / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_train_refuses_a_previous_run_unless_resume_or_overwrite(
    tiny_train, tmp_path, capsys, keep_threads
) -> None:
    work = tmp_path / "work"
    run = ["train", *tiny_train, "--work-dir", str(work)]
    assert main([*run, "--set", "train.iterations=1"]) == 0
    (work / "notes.txt").write_text("the user's notes")
    latest, final = work / "checkpoints" / "latest.pth", work / "final.safetensors"
    before = {p: p.read_bytes() for p in (latest, final)}
    capsys.readouterr()

    assert main([*run, "--set", "train.iterations=1"]) == 2
    err = one_error_line(capsys)
    assert f"work folder {work} holds a previous run" in err and "--resume" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in before} == before
    assert main([*run, "--resume", "--overwrite"]) == 2
    assert "choose one" in one_error_line(capsys)

    assert main([*run, "--resume", "--set", "train.iterations=2"]) == 0
    assert torch.load(latest, weights_only=True)["iteration"] == 2 and _iterations(work) == [1, 2]

    assert main([*run, "--overwrite", "--set", "train.iterations=1"]) == 0
    assert torch.load(latest, weights_only=True)["iteration"] == 1 and _iterations(work) == [1]
    assert (work / "notes.txt").read_text() == "the user's notes"


# ------------------------------------------------------------------------------ full disk (injected)


def test_full_disk_in_atomic_write_is_one_line_and_leaves_nothing(tmp_path) -> None:
    target = tmp_path / "latest.pth"
    target.write_bytes(b"the previous checkpoint")

    def write_until_full(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskFullError) as caught:
        atomic_write(target, write_until_full)
    assert str(caught.value) == f"cannot write {target}: no space left on device"
    assert isinstance(caught.value, VsrkitError) and isinstance(caught.value, OSError)
    assert target.read_bytes() == b"the previous checkpoint" and sorted(os.listdir(tmp_path)) == [
        "latest.pth"
    ]


def test_full_disk_in_a_checkpoint_save(tiny_train, tmp_path, monkeypatch, keep_threads) -> None:
    from vsrkit.train import Trainer, load_config

    sets = [a for a in tiny_train[1:] if a != "--set"]
    trainer = Trainer(load_config(tiny_train[0], sets), tmp_path)

    def quota_exceeded(obj: object, f) -> None:
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(torch, "save", quota_exceeded)
    latest = tmp_path / "checkpoints" / "latest.pth"
    with pytest.raises(DiskFullError, match=f"^cannot write {latest}: disk quota exceeded$"):
        trainer.save(["latest.pth"])
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_full_disk_in_the_spill(lr_clip, weights, tmp_path, spill_root, monkeypatch, capsys) -> None:
    save = torch.save

    def spill_disk_full(obj: object, f) -> None:
        save(obj, f)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", spill_disk_full)
    # Two-frame segments: the backward states of later segments are spilled to disk.
    assert main(upscale_args(lr_clip, tmp_path / "out.mp4", weights, "--segment-frames", "2")) == 2
    err = one_error_line(capsys)
    assert f"cannot write {spill_root}/vsrkit-{os.getpid()}-" in err and "no space left on device" in err
    assert spill_folders(spill_root) == [] and leftovers(tmp_path) == []


def test_full_disk_in_the_output(tmp_path, monkeypatch) -> None:
    from PIL import Image

    def png_disk_full(self, fp, *args, **kwargs) -> None:
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", png_disk_full)
    frames = tmp_path / "frames"
    with pytest.raises(VsrkitError) as caught, open_writer(frames) as writer:
        writer.write(frames_for_writer(1)[0])
    assert str(frames) in str(caught.value) and "No space left on device" in str(caught.value)
    assert "\n" not in str(caught.value) and os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ full disk (tmpfs)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 256 kB tmpfs: a real full disk. Needs root (mount); skipped where mounting is not allowed."""
    folder = tmp_path / "small"
    folder.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=60)


def fill(folder: Path, leave: int) -> Path:
    """Fill ``folder``'s file system with ``folder/filler``, then free ``leave`` bytes of it."""
    filler = folder / "filler"
    with open(filler, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_real_full_disk_is_one_line_and_leaves_nothing(
    lr_clip, weights, vid4, small_tmpfs, tmp_path, spill_root, monkeypatch, capsys
) -> None:
    # The output: 4 frames of noise, as a video and as PNGs, do not fit in 256 kB.
    noise = [np.random.default_rng(i).integers(0, 256, (240, 320, 3), dtype=np.uint8) for i in range(4)]
    for out in (small_tmpfs / "out.mp4", small_tmpfs / "frames"):
        with pytest.raises(VsrkitError) as caught:
            with open_writer(out, fps=25, crf=0) as writer:
                for frame in noise:
                    writer.write(frame)
        message = str(caught.value)
        assert str(out) in message and "No space left on device" in message and "\n" not in message
        assert os.listdir(small_tmpfs) == []

    # The spill, with 16 kB left: the spooled frames (12 kB) fit, a backward state (32 kB) does not.
    fill(small_tmpfs, leave=16 * 1024)
    monkeypatch.setattr(tempfile, "tempdir", str(small_tmpfs))
    assert main(upscale_args(lr_clip, tmp_path / "out.mp4", weights, "--segment-frames", "2")) == 2
    err = one_error_line(capsys)
    assert f"cannot write {small_tmpfs}/vsrkit-" in err and "no space left on device" in err
    assert os.listdir(small_tmpfs) == ["filler"] and leftovers(tmp_path) == []
    monkeypatch.setattr(tempfile, "tempdir", str(spill_root))

    # JSON, onto a disk that is full.
    fill(small_tmpfs, leave=0)
    result = small_tmpfs / "result.json"
    argv = ["eval", "--model", "bicubic", "--dataset", "vid4", "--root", str(vid4), "--no-progress"]
    assert main([*argv, "--json", str(result)]) == 2
    assert one_error_line(capsys).endswith(f"cannot write {result}: no space left on device")
    assert os.listdir(small_tmpfs) == ["filler"]


def test_real_full_disk_in_a_checkpoint(tiny_train, small_tmpfs, capsys, keep_threads) -> None:
    work = small_tmpfs / "work"
    assert main(["train", *tiny_train, "--work-dir", str(work), "--set", "train.iterations=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err == f"vsrkit: error: cannot write {work / 'checkpoints' / 'latest.pth'}: no space left on device"
    )
    assert leftovers(work / "checkpoints") == []


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_put_in_place_never_replaces_anything(tmp_path: Path, monkeypatch, renameat2: bool) -> None:
    import vsrkit.fsutil as fsutil

    if not renameat2:  # as on other systems, or file systems without RENAME_NOREPLACE
        monkeypatch.setattr(fsutil, "_rename_noreplace", lambda src, dest: False)
    src_file, src_dir = tmp_path / "src_file", tmp_path / "src_dir"
    src_file.write_text("new")
    src_dir.mkdir()
    (tmp_path / "file").write_text("the user's")
    (tmp_path / "empty").mkdir()  # os.rename(folder, existing_empty_folder) would silently replace it
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for src in (src_file, src_dir):
        for dest in ("file", "empty", "dangling"):
            with pytest.raises(FileExistsError):
                put_in_place(src, tmp_path / dest)
    assert (tmp_path / "file").read_text() == "the user's" and list((tmp_path / "empty").iterdir()) == []
    assert (tmp_path / "dangling").is_symlink() and src_file.exists() and src_dir.is_dir()
    put_in_place(src_file, tmp_path / "placed_file")
    put_in_place(src_dir, tmp_path / "placed_dir")
    assert (tmp_path / "placed_file").read_text() == "new" and (tmp_path / "placed_dir").is_dir()
    assert not src_file.exists() and not src_dir.exists()


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    # safetensors replaces the file it is given with a private (0600) one of its own.
    path = tmp_path / "final.safetensors"
    save_vsrkit(vsrkit.create_model("basicvsr", mid_channels=8, num_blocks=1), path)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_file_added_to_a_frames_folder_while_it_is_replaced_keeps_the_folder(tmp_path, monkeypatch) -> None:
    import vsrkit.data.video as video

    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "00000000.png").write_bytes(b"an old frame")
    make_temp_dir = video.make_temp_dir

    def add_a_file_just_before_the_move(folder, base, kind="partial"):
        if kind == "old":  # the last moment: the folder was checked, and is about to be moved aside
            (frames / "notes.txt").write_text("the user's notes")
        return make_temp_dir(folder, base, kind)

    monkeypatch.setattr(video, "make_temp_dir", add_a_file_just_before_the_move)
    with pytest.raises(VsrkitError, match=f"output folder {frames} holds files other than frames"):
        with open_writer(frames, overwrite=True) as writer:
            writer.write(frames_for_writer(1)[0])
    assert sorted(p.name for p in frames.iterdir()) == ["00000000.png", "notes.txt"]
    assert (frames / "00000000.png").read_bytes() == b"an old frame" and leftovers(tmp_path) == []
