"""``vsrkit.batch(inputs, output_dir)``: many videos, and long films cut into shots, on Ray.

Each input is upscaled by :func:`vsrkit.upscale.upscale` in a Ray task, so every output has
what ``vsrkit upscale`` promises. Without an address a local Ray is started, bound to the
loopback address, and stopped at the end; with one (``ray://`` or ``HOST:PORT``), that cluster
runs the tasks, and the inputs and ``output_dir`` must be reachable from every node at the
same paths. A Ray that this process already joined (``ray.init`` before the call) is used as
it is.

- **Outputs** are ``output_dir/<input stem>.mp4``. One that exists is left alone: it is
  skipped when it holds as many frames as its input (outputs appear only when complete), and
  is an error naming it otherwise; ``overwrite=True`` replaces outputs.
- **Failures** are per input: one line each (``failed`` in the summary); the others go on.
- **Workers** that die (killed, out of memory, a lost node) have their task retried, up to
  ``max_retries`` times (Ray's task retries); a retried task starts its input or shots again.
- **Scene cuts** (``scene_cuts=True``): a task finds an input's shots (:mod:`vsrkit.scenes`);
  the shots are spread over the workers, each encoded to its own segment in a hidden folder
  in ``output_dir``, then joined without re-encoding. The result is the file that
  ``vsrkit upscale --scene-cuts`` makes.
- **Progress**: one bar for the whole batch, in frames, fed by the tasks through a small Ray
  actor.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import VsrkitError
from .scenes import DEFAULT_MIN_SHOT_FRAMES, DEFAULT_THRESHOLD, segment_name, shot_folder_beside

# Ray's own default, made explicit: a task whose worker dies runs again up to this many times.
DEFAULT_MAX_RETRIES = 3
# Progress reports from a task at most this often (seconds): one actor call each.
_REPORT_EVERY = 0.5
# A film's shots are grouped into about this many tasks per worker, for load balance.
_TASKS_PER_WORKER = 2


# -- inputs -----------------------------------------------------------------------------------
def expand_inputs(items: Iterable[str | os.PathLike]) -> tuple[list[Path], dict[str, str]]:
    """Video files from files, folders (their videos, not recursive) and ``@list.txt`` files.

    A list holds one path a line (blank lines and ``#`` comments skipped), relative to the
    list's folder. Returns the files in order, and the entries that gave none with why.
    """
    from .data.video import VIDEO_EXTENSIONS, _natural_key

    files: list[Path] = []
    problems: dict[str, str] = {}
    for item in items:
        text = os.fspath(item)
        if text.startswith("@"):
            listing = Path(text[1:])
            try:
                lines = listing.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise VsrkitError(f"cannot read the input list {listing}: {exc}") from exc
            entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            more, bad = expand_inputs(listing.parent / entry for entry in entries)
            files.extend(more)
            problems.update(bad)
        elif os.path.isdir(text):
            videos = sorted(
                (
                    e.path
                    for e in os.scandir(text)
                    if e.is_file()
                    and not e.name.startswith(".")
                    and Path(e.name).suffix.lower() in VIDEO_EXTENSIONS
                ),
                key=lambda p: _natural_key(os.path.basename(p)),
            )
            if not videos:
                problems[text] = f"no videos ({' '.join(VIDEO_EXTENSIONS)}) in folder {text}"
            files.extend(Path(v) for v in videos)
        else:
            files.append(Path(text))
    return files, problems


# -- the work ---------------------------------------------------------------------------------
@dataclass
class _Job:
    """One input: its output, its frames and, with scene cuts, its shots and segments."""

    input: Path
    output: Path
    frames: int
    shots: list[tuple[int, int]] | None = None
    folder: Path | None = None
    groups_left: int = 0
    segments: list[Path] = field(default_factory=list)
    failed: str | None = None


class _ProgressBoard:
    """Frames done per task key; a retried task reports from zero again under its key."""

    def __init__(self) -> None:
        self.done: dict[str, float] = {}

    def report(self, key: str, frames: float) -> None:
        self.done[key] = frames

    def total(self) -> float:
        return sum(self.done.values())


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """One short line for a failure: a VsrkitError's text, else the exception's type and text.

    Ray's errors carry the worker's own exception as ``cause`` inside a long banner; the cause
    is what the user needs.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return _one_line(cause, limit)
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())
    text = text if isinstance(exc, VsrkitError) else f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reporter(board: Any, key: str):
    state = {"done": 0.0, "sent": 0.0}

    def progress(frames: float) -> None:
        state["done"] += frames
        now = time.monotonic()
        if now - state["sent"] >= _REPORT_EVERY:
            state["sent"] = now
            board.report.remote(key, state["done"])

    def flush() -> None:
        board.report.remote(key, state["done"])

    board.report.remote(key, 0.0)
    return progress, flush


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _upscale_task(
    input: str, output: str, options: dict, threads: int, board: Any, key: str
) -> tuple[bool, str | None]:
    """A Ray task: ``upscale(input, output, **options)``; (True, None) or (False, one line)."""
    from .upscale import upscale

    _set_threads(threads)
    progress, flush = _reporter(board, key)
    try:
        upscale(input, output, **options, progress=progress)
    except Exception as exc:  # noqa: BLE001 - reported as this input's one line
        return False, _one_line(exc)
    flush()
    return True, None


def _detect_task(input: str, threshold: float, min_shot_frames: int, allow_corrupt: bool):
    from .data.video import open_frames
    from .scenes import detect_shots

    _set_threads(1)
    try:
        with open_frames(input, allow_corrupt=allow_corrupt) as source:
            return True, detect_shots(source, threshold, min_shot_frames)
    except Exception as exc:  # noqa: BLE001
        return False, _one_line(exc)


def _join_task(input: str, segments: list[str], output: str, overwrite: bool, allow_corrupt: bool):
    from .scenes import join_segments

    try:
        join_segments(input, segments, output, overwrite=overwrite, allow_corrupt=allow_corrupt)
    except Exception as exc:  # noqa: BLE001
        return False, _one_line(exc)
    return True, None


def _group_shots(shots: list[tuple[int, int]], groups: int) -> list[list[tuple[int, int]]]:
    """Consecutive shots in about ``groups`` groups of similar frame counts."""
    total = shots[-1][1] - shots[0][0]
    target = max(1, total / max(1, groups))
    out: list[list[tuple[int, int]]] = [[]]
    done = 0
    for shot in shots:
        if out[-1] and done + (shot[1] - shot[0]) / 2 > target * len(out):
            out.append([])
        out[-1].append(shot)
        done += shot[1] - shot[0]
    return out


def _probe(path: Path, allow_corrupt: bool) -> int:
    """The frame count of a video, read without decoding (its packets); a VsrkitError if unreadable."""
    import warnings

    from .data.video import open_frames

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the worker that upscales it warns, once
        with open_frames(path, allow_corrupt=allow_corrupt) as source:
            return source.num_frames or 0


# -- Ray ----------------------------------------------------------------------------------------
def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1")


# Ray's session folder holds Unix sockets, whose paths may not exceed 107 bytes; the session's
# own part (``ray/session_DATE_TIME_PID/sockets/plasma_store``) takes about 70 of them.
_RAY_SOCKET_ROOM = 107 - 72


def _short_session_folder() -> dict[str, str]:
    """``_temp_dir`` for a local Ray where ``$TMPDIR`` is too long for its sockets, else nothing.

    The fallback is Ray's own default without ``$TMPDIR``, ``/tmp/ray``: sessions there are
    named by date and process id, so runs never share one.
    """
    default = os.path.join(tempfile.gettempdir(), "ray")
    if len(default.encode()) <= _RAY_SOCKET_ROOM:
        return {}
    return {"_temp_dir": "/tmp/ray"}


def _start_ray(address: str | None):
    """Join ``address``, or start a local Ray; returns (ray module, whether we started it)."""
    if address is None or _is_loopback(address):
        # On Linux Ray replaces a loopback node address with the host's outward one unless
        # told that this is not a cluster; a local Ray then listens on 127.0.0.1 only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as exc:
        raise VsrkitError("vsrkit batch needs Ray: pip install 'vsrkit[ray]'") from exc
    if ray.is_initialized():
        return ray, False
    common = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    try:
        if address is None:
            import torch

            cpus = os.cpu_count() or 1
            ray.init(
                address="local",
                num_cpus=cpus,
                num_gpus=torch.cuda.device_count(),
                _node_ip_address="127.0.0.1",
                **_short_session_folder(),
                **common,
            )
        else:
            ray.init(address=address, **common)
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        raise VsrkitError(f"cannot start or join Ray at {address or 'local'}: {_one_line(exc)}") from exc
    return ray, True


def _plan_resources(ray: Any, workers: int | None, threads: int | None, device: str) -> tuple[int, int, dict]:
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0)) if device in ("auto", "cuda") or device.startswith("cuda") else 0
    node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=cpus)
    if workers is None:
        workers = gpus if gpus else max(1, cpus // 4)
    if workers < 1:
        raise VsrkitError(f"--workers must be at least 1, got {workers}")
    if threads is None:
        threads = max(1, min(cpus // workers, node_cpus))
    if threads < 1:
        raise VsrkitError(f"--threads must be at least 1, got {threads}")
    if threads > node_cpus:
        raise VsrkitError(f"--threads {threads} is more than any Ray node has ({node_cpus} CPUs)")
    task = {"num_cpus": threads}
    if gpus:
        task = {"num_cpus": 1, "num_gpus": 1}
    return workers, threads, task


# -- the batch ----------------------------------------------------------------------------------
def batch(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    address: str | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    scene_cuts: bool = False,
    scene_threshold: float = DEFAULT_THRESHOLD,
    min_shot_frames: int = DEFAULT_MIN_SHOT_FRAMES,
    progress: bool = True,
    max_retries: int = DEFAULT_MAX_RETRIES,
    **upscale_options: Any,
) -> dict[str, Any]:
    """Upscale many videos on Ray; ``output_dir/<stem>.mp4`` for each (see the module docs).

    ``inputs``: video files, folders of videos and ``@list.txt`` files. ``workers``: tasks
    run at once (default: one per GPU, else a quarter of the CPUs); ``threads``: PyTorch
    threads per worker (default: CPUs / workers). ``upscale_options`` are those of
    :func:`vsrkit.upscale.upscale` (``model``, ``weights``, ``precision``, ``tile``, ``crf``...).
    Returns ``{"done": [outputs], "skipped": [outputs], "failed": {input: reason}, "seconds"}``;
    failures are not raised.
    """
    start_time = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    for name in ("input", "output", "shots", "scene_cuts", "progress"):
        if name in upscale_options:
            raise TypeError(f"batch() got an unexpected keyword argument {name!r}")
    out_dir = Path(output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VsrkitError(f"cannot make the output folder {out_dir}: {exc.strerror or exc}") from exc
    allow_corrupt = bool(upscale_options.get("allow_corrupt", False))
    options = {**upscale_options, "overwrite": overwrite}

    files, failed = expand_inputs(inputs)
    done: list[str] = []
    skipped: list[str] = []
    jobs: list[_Job] = []
    claimed: dict[Path, Path] = {}
    for path in files:
        output = out_dir / f"{path.stem}.mp4"
        if output in claimed:
            failed[str(path)] = f"{output} is also the output of {claimed[output]}; rename one of them"
            continue
        claimed[output] = path
        try:
            frames = _probe(path, allow_corrupt)
        except VsrkitError as exc:
            # Found without decoding (missing, not a video, truncated): no worker needed.
            failed[str(path)] = str(exc)
            continue
        if output.exists() or output.is_symlink():
            if path.exists() and output.exists() and output.samefile(path):
                failed[str(path)] = f"output {output} is the input; choose another output folder"
                continue
            if not overwrite:
                try:
                    have = _probe(output, True)
                except VsrkitError:
                    have = None
                if have is not None and (have == frames or (allow_corrupt and have > 0)):
                    skipped.append(str(output))
                else:
                    failed[str(path)] = (
                        f"{output} exists and is not a complete upscale of {path.name}; "
                        "pass --overwrite to replace it"
                    )
                continue
        jobs.append(_Job(path, output, frames))

    if jobs:
        _run(
            jobs,
            workers,
            address,
            threads,
            options,
            scene_cuts,
            scene_threshold,
            min_shot_frames,
            progress,
            max_retries,
            allow_corrupt,
        )
    for job in jobs:
        if job.failed is not None:
            failed[str(job.input)] = job.failed
        else:
            done.append(str(job.output))
    return {
        "done": done,
        "skipped": skipped,
        "failed": failed,
        "seconds": time.perf_counter() - start_time,
    }


def _run(
    jobs: list[_Job],
    workers: int | None,
    address: str | None,
    threads: int | None,
    options: dict,
    scene_cuts: bool,
    scene_threshold: float,
    min_shot_frames: int,
    show_progress: bool,
    max_retries: int,
    allow_corrupt: bool,
) -> None:
    ray, started = _start_ray(address)
    try:
        workers, threads, resources = _plan_resources(
            ray, workers, threads, str(options.get("device", "auto"))
        )
        task_options = {**resources, "max_retries": max_retries}
        upscale_remote = ray.remote(_upscale_task).options(**task_options)
        detect_remote = ray.remote(_detect_task).options(num_cpus=1, max_retries=max_retries)
        join_remote = ray.remote(_join_task).options(num_cpus=1, max_retries=max_retries)
        board = ray.remote(num_cpus=0)(_ProgressBoard).remote()
        bar = None
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(
                total=sum(job.frames for job in jobs),
                unit="frame",
                desc="batch",
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} frames "
                "[{elapsed}<{remaining}]",
            )

        # Tasks wait here for a free worker: (kind, job, remote function, arguments).
        queue: list[tuple[str, _Job, Any, tuple]] = []
        running: dict[Any, tuple[str, _Job]] = {}  # ObjectRef -> (kind, job)

        def submit(kind: str, job: _Job, remote: Any, args: tuple) -> None:
            queue.append((kind, job, remote, args))

        def launch() -> None:
            while queue and len(running) < workers:
                kind, job, remote, args = queue.pop(0)
                if job.failed is None:  # the rest of a failed input's work is dropped
                    running[remote.remote(*args)] = (kind, job)

        for job in jobs:
            if scene_cuts:
                submit(
                    "detect",
                    job,
                    detect_remote,
                    (str(job.input), scene_threshold, min_shot_frames, allow_corrupt),
                )
            else:
                args = (str(job.input), str(job.output), options, threads, board, f"{job.input}")
                submit("upscale", job, upscale_remote, args)
        launch()
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            if bar is not None:
                _update(bar, ray, board)
            for ref in ready:
                kind, job = running.pop(ref)
                try:
                    ok, value = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a task Ray gave up on (retries spent)
                    ok, value = False, _one_line(exc)
                if job.failed is not None:
                    continue
                if not ok:
                    job.failed = value
                    continue
                if kind == "detect":
                    job.shots = value
                    try:
                        job.folder = shot_folder_beside(job.output)
                    except VsrkitError as exc:
                        job.failed = str(exc)
                        continue
                    groups = _group_shots(job.shots, workers * _TASKS_PER_WORKER)
                    job.groups_left = len(groups)
                    for n, group in enumerate(groups):
                        args = (
                            str(job.input),
                            str(job.folder),
                            {**options, "shots": group},
                            threads,
                            board,
                            f"{job.input}#{n}",
                        )
                        submit("shots", job, upscale_remote, args)
                elif kind == "shots":
                    job.groups_left -= 1
                    if job.groups_left == 0:
                        segments = [str(job.folder / segment_name(shot)) for shot in job.shots]
                        args = (
                            str(job.input),
                            segments,
                            str(job.output),
                            options["overwrite"],
                            allow_corrupt,
                        )
                        submit("join", job, join_remote, args)
            launch()
        if bar is not None:
            _update(bar, ray, board)
            bar.close()
    finally:
        for job in jobs:
            if job.folder is not None:
                shutil.rmtree(job.folder, ignore_errors=True)
        if started:
            ray.shutdown()


def _update(bar: Any, ray: Any, board: Any) -> None:
    try:
        bar.n = ray.get(board.total.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - a lost progress actor costs the bar, not the batch
        return
    bar.refresh()
