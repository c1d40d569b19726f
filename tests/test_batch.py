"""`vsrkit batch` on a local 2-worker Ray bound to 127.0.0.1, on real clips from ../shared/data.

One local Ray serves the module (it takes seconds to start on two cores); ``vsrkit.batch``
uses a Ray that the process already joined. The `ray start --head` test starts its own
cluster in a new session and ends exactly that process group, by id.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import vsrkit
from vsrkit.batching import _group_shots, expand_inputs
from vsrkit.cli import main
from vsrkit.data.degradations import bi_degrade
from vsrkit.data.video import open_frames, open_writer, read_all_frames
from vsrkit.upscale import upscale
from vsrkit.weights import save_vsrkit

# Ray keeps a loopback node address only when told this is not a multi-host cluster.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    # The workers' temporary files (a killed worker's spill folder among them) go to a folder
    # of the test's own; Ray's session folder needs a short path for its sockets.
    worker_tmp = tmp_path_factory.mktemp("worker-tmp")
    ray_tmp = tempfile.mkdtemp(prefix="vsrkit-ray-")
    env = {**LOOPBACK_ENV, "TMPDIR": str(worker_tmp)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=ray_tmp,
        logging_level="WARNING",
    )
    try:
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_basicvsr.safetensors"
    save_vsrkit(vsrkit.create_model("basicvsr", mid_channels=8, num_blocks=1), path)
    return path


def write_lr_clip(video, path, frames, crop=None):
    """The first ``frames`` frames of a real clip, MATLAB-bicubic ×1/4, with its audio if any."""
    with open_frames(video) as source, open_writer(path, source=source, crf=12) as writer:
        for i, frame in enumerate(source):
            if i == frames:
                break
            frame = frame[: crop[0], : crop[1]] if crop else frame
            writer.write(np.ascontiguousarray(bi_degrade(frame)))
    return path


@pytest.fixture(scope="module")
def clips(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    videos = shared_data / "videos"
    for name in ("cup.mp4", "box.mp4", "tree.avi"):
        write_lr_clip(videos / name, folder / f"{Path(name).stem}_lr.mp4", 8)
    return folder


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def frame_times(path):
    import av

    with av.open(str(path)) as container:
        return [f.pts for f in container.decode(container.streams.video[0])]


def test_inputs_from_files_folders_and_lists(tmp_path, clips):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two clips\n{clips / 'tree_lr.mp4'}\n\nmissing.mp4\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    files, problems = expand_inputs([clips, f"@{listing}", empty])
    names = [p.name for p in files]
    assert names == ["box_lr.mp4", "cup_lr.mp4", "tree_lr.mp4", "tree_lr.mp4", "missing.mp4"]
    assert files[-1] == tmp_path / "missing.mp4"  # relative to the list's folder
    assert list(problems) == [str(empty)]


def test_shots_grouped_in_order_by_frames():
    shots = [(0, 6), (6, 12), (12, 18)]
    assert _group_shots(shots, 4) == [[(0, 6)], [(6, 12)], [(12, 18)]]
    assert _group_shots(shots, 1) == [shots]
    groups = _group_shots([(i * 10, i * 10 + 10) for i in range(10)], 4)
    assert [s for g in groups for s in g] == [(i * 10, i * 10 + 10) for i in range(10)]
    assert len(groups) == 4


def test_batch_equals_upscale_names_bad_inputs_and_reruns_skip(
    ray_local, clips, tiny_weights, shared_data, tmp_path, capsys
):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for clip in clips.iterdir():
        (inputs / clip.name).symlink_to(clip)
    data = (shared_data / "videos" / "cup.mp4").read_bytes()
    (inputs / "broken.mp4").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    out.mkdir()
    users_file = out / "tree_lr.mp4"
    users_file.write_bytes(b"the user's own file, not an upscale")

    argv = ["batch", str(inputs), "-o", str(out), "--workers", "2", "--threads", "1"]
    argv += ["--weights", str(tiny_weights), "--quiet"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    errors = [line for line in errors if line.startswith("vsrkit: error:")]
    print(captured.out, errors)
    assert len(errors) == 2 and "Traceback" not in captured.err
    assert any("broken.mp4" in line and "truncated" in line for line in errors)
    assert any("tree_lr.mp4" in line and "--overwrite" in line for line in errors)
    assert users_file.read_bytes() == b"the user's own file, not an upscale"
    assert "2 upscaled, 0 skipped" in captured.out

    for name in ("cup_lr", "box_lr"):
        reference = tmp_path / f"{name}_reference.mp4"
        upscale(clips / f"{name}.mp4", reference, weights=tiny_weights, progress=False)
        got, want = read_all_frames(out / f"{name}.mp4"), read_all_frames(reference)
        assert got.shape == want.shape == (8, 480, 640, 3)
        assert psnr(got, want) >= 50
        assert frame_times(out / f"{name}.mp4") == frame_times(reference)

    # A rerun skips the complete outputs and touches nothing.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "0 upscaled, 2 skipped" in captured.out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def _children(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_worker_killed_mid_run_is_retried(ray_local, shared_data, tiny_weights, tmp_path):
    clip = write_lr_clip(shared_data / "videos" / "box.mp4", tmp_path / "long.mp4", 32)
    out = tmp_path / "out"
    result: dict = {}
    run = threading.Thread(
        target=lambda: result.update(
            vsrkit.batch([clip], out, workers=1, threads=1, weights=tiny_weights, progress=False)
        )
    )
    run.start()
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and run.is_alive() and time.monotonic() < deadline:
        # Mid-run: the task's worker is upscaling and its partial output exists.
        started = out.is_dir() and any(p.name.startswith(".long.") for p in out.iterdir())
        workers = [p for p in _children(os.getpid()) if "ray::_upscale_task" in _cmdline(p)]
        if started and workers:
            victim = workers[0]
            assert not (out / "long.mp4").exists()
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.02)
    run.join(timeout=300)
    assert victim is not None, "the task's worker was never seen running"
    assert result["failed"] == {} and result["done"] == [str(out / "long.mp4")]
    assert not os.path.exists(f"/proc/{victim}") or "ray::_upscale_task" not in _cmdline(victim)
    assert read_all_frames(out / "long.mp4").shape == (32, 480, 640, 3)
    assert frame_times(out / "long.mp4") == frame_times(clip)


def test_three_shot_film_split_across_workers_equals_sequential(
    ray_local, shared_data, tiny_weights, tmp_path
):
    from test_scene_cuts import make_three_shot_film, video_timing

    film = make_three_shot_film(shared_data / "videos", tmp_path / "film.mp4")
    sequential = tmp_path / "sequential.mp4"
    upscale(film, sequential, weights=tiny_weights, scene_cuts=True, min_shot_frames=4, progress=False)
    out = tmp_path / "out"
    summary = vsrkit.batch(
        [film],
        out,
        workers=2,
        threads=1,
        weights=tiny_weights,
        scene_cuts=True,
        min_shot_frames=4,
        progress=False,
    )
    assert summary["failed"] == {} and summary["done"] == [str(out / "film.mp4")]
    assert [p.name for p in out.iterdir()] == ["film.mp4"]  # the shot segments are gone
    got, want = read_all_frames(out / "film.mp4"), read_all_frames(sequential)
    assert got.shape == want.shape == (18, 480, 640, 3)
    assert psnr(got, want) >= 50
    assert video_timing(out / "film.mp4") == video_timing(sequential)


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry))
    return members


def test_batch_starts_and_ends_its_own_local_ray(clips, tiny_weights, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *LOOPBACK_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(vsrkit.__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vsrkit", "batch", str(clips / "box_lr.mp4"), "-o", str(out)]
    command += ["--workers", "2", "--threads", "1", "--weights", str(tiny_weights), "--quiet"]
    run = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
        assert "1 upscaled" in stdout
        assert read_all_frames(out / "box_lr.mp4").shape == (8, 480, 640, 3)
        # The Ray it started (GCS, raylet, workers: all in its session) is gone with it.
        deadline = time.monotonic() + 15
        while _session_members(run.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_members(run.pid) == []
    finally:
        for pid in _session_members(run.pid):
            os.kill(pid, signal.SIGKILL)
        run.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_started_with_ray_start_is_used_through_ray_address(clips, tiny_weights, tmp_path):
    pytest.importorskip("ray")
    port = _free_port()
    # Its own token and temporary folder: nothing shared with other Rays on this machine.
    env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(vsrkit.__file__).parents[1]), env.get("PYTHONPATH", "")])
    ray_tmp = tempfile.mkdtemp(prefix="vsrkit-ray-")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port)]
        + ["--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", ray_tmp],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        out = tmp_path / "out"
        command = [sys.executable, "-m", "vsrkit", "batch", str(clips / "cup_lr.mp4"), "-o", str(out)]
        command += ["--ray-address", f"127.0.0.1:{port}", "--workers", "1", "--threads", "1"]
        command += ["--weights", str(tiny_weights)]
        done = None
        for _ in range(30):  # until the head answers
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
            if done.returncode == 0 or "cannot start or join Ray" not in done.stderr:
                break
            time.sleep(1)
        assert done is not None and done.returncode == 0, done.stderr[-2000:]
        assert "1 upscaled" in done.stdout
        assert "batch: 100%" in done.stderr and "8/8 frames" in done.stderr  # one bar, in frames
        assert read_all_frames(out / "cup_lr.mp4").shape == (8, 480, 640, 3)
        # The command's driver joined this cluster: its log is in the cluster's session folder.
        assert list(Path(ray_tmp).glob("session_2*/logs/python-core-driver-*"))
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # gcs_server may ignore SIGTERM
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
