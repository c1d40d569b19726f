"""CPU speed of vsrkit against the BasicSR 1.4.2 reference, on the same frames and weights.

For each model and precision this times, interleaved round by round:

* ``ref``: BasicSR's own architecture (loaded by ``tests/reference_oracle.py``), plain fp32,
  ``model(lqs)`` on the whole clip — the baseline of every ratio;
* ``ref-tuned`` (BasicVSR only): the same with channels_last weights and bf16 autocast, the
  best the reference gets from two lines of setup;
* ``engine``: vsrkit's user path, :func:`vsrkit.engine.upscale_frames` from uint8 frames to
  uint8 frames (spooling, model preparation and quantisation included);
* ``forward`` (with ``--forward``): the prepared model's whole-clip ``model(lqs)``.

The two sides run in two separate worker processes, as their users would run them: vsrkit's
engine tells glibc's malloc to keep freed memory (:func:`vsrkit.accel.keep_freed_memory`),
which would also speed up the reference if it ran in the same process. ``--ref-alloc`` adds
``ref-alloc``: the reference run inside vsrkit's process, with that setting.

Every timing is of the whole clip; the best of ``--reps`` rounds is reported, divided by the
number of frames. The cores may be shared with other work: compare the ratios of one run, not
absolute times across runs. Outputs are compared as 8-bit frames against the reference's fp32
output (PSNR over all frames). GFLOP/s count conv and GEMM FLOPs (``torch.utils.flop_counter``
on the fp32 model, deformable convs included) per second of the whole clip, next to the
throughput of a dense 64→64 3×3 convolution measured at the same size in the same run:
oneDNN's direct kernels and, where vsrkit's fp32 path runs it, NNPACK's Winograd (counted with
the direct convolution's FLOPs, so it can exceed the cores' FMA peak).

    python benchmarks/speed.py                                   # 180x320, T=5, all models
    python benchmarks/speed.py --size 64x64 --frames 5 --reps 1  # a quick look
    python benchmarks/speed.py --models basicvsr --precisions bf16
"""

from __future__ import annotations

import argparse
import copy
import datetime
import multiprocessing as mp
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import vsrkit  # noqa: E402
from reference_oracle import basicsr_arch, reference_basicvsrpp  # noqa: E402
from vsrkit.accel import keep_freed_memory, prepare_for_inference  # noqa: E402
from vsrkit.engine import upscale_frames  # noqa: E402
from vsrkit.models import families, get_family  # noqa: E402
from vsrkit.models.basicvsr import BasicVSR  # noqa: E402
from vsrkit.models.basicvsr_pp import BasicVSRPlusPlus  # noqa: E402
from vsrkit.models.iconvsr import IconVSR  # noqa: E402
from vsrkit.ops import nnpack  # noqa: E402
from vsrkit.ops.fast_conv import FastConv2d  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "reds_lr_000"
# The BasicSR/mmagic oracle of each builder, at the papers' size.
_REFERENCES: dict[type, Callable[[], torch.nn.Module]] = {
    BasicVSR: lambda: basicsr_arch("basicvsr_arch").BasicVSR(num_feat=64, num_block=30),
    IconVSR: lambda: basicsr_arch("basicvsr_arch").IconVSR(num_feat=64, num_block=30),
    BasicVSRPlusPlus: lambda: reference_basicvsrpp(mid_channels=64, num_blocks=7),
}
#: The families with an oracle to race against.
MODELS = tuple(name for name, family in families().items() if family.builder in _REFERENCES)


def load_frames(num: int, height: int, width: int) -> np.ndarray:
    """The first ``num`` real REDS LR frames (180×320), centre-cropped to ``height``×``width``."""
    files = sorted(DATA.glob("*.png"))[:num]
    if len(files) < num:
        raise SystemExit(f"{DATA} has only {len(files)} frames")
    frames = np.stack([np.array(Image.open(f).convert("RGB")) for f in files])
    h, w = frames.shape[1:3]
    if height > h or width > w:
        raise SystemExit(f"--size must fit in the {h}x{w} REDS LR frames")
    top, left = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(frames[:, top : top + height, left : left + width])


def reference_model(arch: str) -> torch.nn.Module:
    return _REFERENCES[get_family(arch).builder]()


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights, with the zero-initialised offset convs made non-zero (as the tests do)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.02 if "conv_offset" in name else 0.005))


def to_uint8(out: torch.Tensor) -> np.ndarray:
    """(1, T, 3, H, W) float → (T, H, W, 3) uint8, rounded as vsrkit's engine quantises."""
    return out[0].float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def clip_flops(model: torch.nn.Module, lqs: torch.Tensor) -> float:
    """Conv + GEMM FLOPs of one whole-clip forward.

    Counting runs the model once; above 128 px a side it is run on a half-size centre crop and
    the count multiplied by 4 (convs scale with the pixel count; the models' padding to
    multiples of 4 or 32 makes this slightly inexact). vsrkit's deformable convs are GEMMs, so
    they are counted too.
    """
    h, w = lqs.shape[-2:]
    factor = 1
    if h >= 128 and w >= 128:
        top, left = h // 4, w // 4
        lqs = lqs[..., top : top + h // 2, left : left + w // 2].contiguous()
        factor = 4
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(lqs)
    return float(counter.get_total_flops()) * factor


def dense_conv_gflops(height: int, width: int, reps: int) -> dict[str, float]:
    """Throughput of one 64→64 3×3 conv at the benchmark size, interleaved: oneDNN's direct
    kernels (NCHW and NHWC fp32, NHWC bf16) and, where it runs, NNPACK's Winograd (fp32, its
    FLOPs counted as the direct convolution's)."""
    conv = torch.nn.Conv2d(64, 64, 3, 1, 1).eval()
    x = torch.randn(1, 64, height, width)
    variants = {
        "NCHW fp32": (conv, x),
        "NHWC fp32": (
            copy.deepcopy(conv).to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        ),
        "NHWC bf16": (
            copy.deepcopy(conv).to(torch.bfloat16, memory_format=torch.channels_last),
            x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
        ),
    }
    if nnpack.available():
        variants["NCHW fp32 NNPACK"] = (FastConv2d.from_conv(copy.deepcopy(conv), nnpack=True), x)
    flops = 2 * 64 * 64 * 9 * height * width
    calls = max(3, int(2e10 // flops))  # about 20 GFLOP per timing
    best = dict.fromkeys(variants, float("inf"))
    with torch.inference_mode():
        for _ in range(reps + 1):
            for name, (c, xx) in variants.items():
                c(xx)
                start = time.perf_counter()
                for _ in range(calls):
                    c(xx)
                best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return {name: flops / t / 1e9 for name, t in best.items()}


def _build_runners(side: str, arch: str, opts: dict, lqs: torch.Tensor, frames: np.ndarray):
    """This side's runners for ``arch`` (name → zero-argument callable returning uint8 frames)."""
    torch.manual_seed(0)
    ref = reference_model(arch).eval()
    perturb(ref, seed=1)
    runners: dict[str, Callable[[], np.ndarray]] = {}

    def ref_run(model=ref) -> np.ndarray:
        with torch.inference_mode():
            return to_uint8(model(lqs))

    if side == "reference":
        runners["ref fp32"] = ref_run
        if get_family(arch).builder is BasicVSR and "bf16" in opts["precisions"]:
            tuned = copy.deepcopy(ref).to(memory_format=torch.channels_last)

            def tuned_run(model=tuned) -> np.ndarray:
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    return to_uint8(model(lqs))

            runners["ref-tuned bf16"] = tuned_run
        return runners, None
    ours = vsrkit.create_model(arch)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    flops = clip_flops(ours, lqs) / len(frames)
    if opts["ref_alloc"]:
        runners["ref-alloc fp32"] = ref_run
    for precision in opts["precisions"]:

        def engine_run(precision=precision, model=ours) -> np.ndarray:
            return np.stack(list(upscale_frames(iter(frames), model, device="cpu", precision=precision)))

        runners[f"engine {precision}"] = engine_run
        if opts["forward"]:
            prepared = prepare_for_inference(ours, "cpu", precision)

            def forward_run(model=prepared) -> np.ndarray:
                with torch.inference_mode():
                    return to_uint8(model(lqs))

            runners[f"forward {precision}"] = forward_run
    return runners, flops


def _serve(conn, side: str, opts: dict) -> None:
    """Worker process: builds one side's runners and times them on request."""
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    if side == "vsrkit":
        keep_freed_memory()  # what the engine does on its first CPU run
    height, width = opts["size"]
    frames = load_frames(opts["frames"], height, width)
    lqs = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)[None].contiguous()
    runners: dict[str, Callable[[], np.ndarray]] = {}
    while True:
        cmd, *rest = conn.recv()
        try:
            if cmd == "stop":
                return
            if cmd == "setup":
                runners, flops = _build_runners(side, rest[0], opts, lqs, frames)
                conn.send((list(runners), flops))
            elif cmd == "run":
                start = time.perf_counter()
                out = runners[rest[0]]()
                conn.send((time.perf_counter() - start, out))
            elif cmd == "dense":
                conn.send(dense_conv_gflops(height, width, rest[0]))
        except Exception as e:  # noqa: BLE001 - reported by the parent
            conn.send(e)


class Worker:
    """One side (``"reference"`` or ``"vsrkit"``) in its own process."""

    def __init__(self, side: str, opts: dict) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, side, opts), daemon=True)
        self.process.start()

    def call(self, *message):
        self.conn.send(message)
        reply = self.conn.recv()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def stop(self) -> None:
        self.conn.send(("stop",))
        self.process.join(timeout=30)


def _fmt_dense(dense: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in dense.items()) + " GFLOP/s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", default="180x320", help="LR HxW (a centre crop of the REDS LR frames)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--reps", type=int, default=2, help="timed rounds (the best is kept)")
    parser.add_argument("--forward", action="store_true", help="also time the prepared model's forward")
    parser.add_argument(
        "--ref-alloc", action="store_true", help="also time the reference inside vsrkit's process"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))
    opts = {
        "frames": args.frames,
        "size": (height, width),
        "precisions": [p for p in args.precisions.split(",") if p],
        "forward": args.forward,
        "ref_alloc": args.ref_alloc,
        "threads": args.threads,
    }
    models = [m for m in args.models.split(",") if m]
    t = args.frames
    load_frames(t, height, width)  # fail early on missing data

    print(
        f"# vsrkit speed, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"# {' '.join(sys.argv)}")
    print(f"# frames: {DATA.name}, first {t}, {height}x{width} LR; whole-clip times, best of {args.reps}")
    workers = {side: Worker(side, opts) for side in ("reference", "vsrkit")}
    try:
        for side, worker in workers.items():
            print(f"# dense 64->64 3x3 conv, {side} process: {_fmt_dense(worker.call('dense', args.reps))}")
        print()
        header = (
            f"{'model':<12} {'prec':<5} {'runner':<10} {'s/frame':>8} {'speed-up':>8} {'PSNR dB':>8} "
            f"{'GFLOP/s':>8}"
        )
        print(header)
        print("-" * len(header))
        for arch in models:
            names, _ = workers["reference"].call("setup", arch)
            ours, flops = workers["vsrkit"].call("setup", arch)
            print(f"{arch}: {flops / 1e9:.0f} GFLOP per frame (conv + GEMM)")
            order = [("reference", n) for n in names] + [("vsrkit", n) for n in ours]
            best = dict.fromkeys((n for _, n in order), float("inf"))
            outputs: dict[str, np.ndarray] = {}
            for _ in range(args.reps):
                for side, name in order:
                    seconds, outputs[name] = workers[side].call("run", name)
                    best[name] = min(best[name], seconds)
            # The load of a shared machine drifts: the ceiling is measured again after each model.
            dense_now = workers["vsrkit"].call("dense", 1)
            base = best["ref fp32"]
            for _, name in order:
                runner, precision = name.split(" ")
                per_frame = best[name] / t
                quality = psnr(outputs[name], outputs["ref fp32"])
                print(
                    f"{arch:<12} {precision:<5} {runner:<10} {per_frame:8.2f} {base / best[name]:7.2f}x "
                    f"{quality:8.1f} {flops / per_frame / 1e9:8.0f}"
                )
            print(f"{arch:<12} dense 64->64 3x3 conv right after (vsrkit process): {_fmt_dense(dense_now)}")
            sys.stdout.flush()
    finally:
        for worker in workers.values():
            worker.stop()
    print()
    print(f"# conv+GEMM GFLOP per frame: counted on vsrkit's fp32 model at {height}x{width}, T={t}")


if __name__ == "__main__":
    main()
