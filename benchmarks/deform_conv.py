"""Time vsrkit's CPU deformable convolution against torchvision's and a dense conv2d.

Shapes are the models': BasicVSR++'s second-order alignment (128 -> 64 channels, 16 offset
groups, with mask) and IconVSR's PCD alignment at full resolution (64 -> 64, 8 groups), both
3x3 with padding 1 on a 180x320 frame (the reference evaluation size). GFLOP/s count the
convolution only: 2 * Cout * Cin * 9 * Ho * Wo per call, the same for every method, so the
dense conv2d of the same shape shows the ceiling.

The methods are timed round-robin (one call of each per round, after a warm-up round) and the
best round is reported, because the machine's cores may be shared: compare the ratios of one
run, not absolute times across runs.

    python benchmarks/deform_conv.py                  # both shapes, 5 rounds
    python benchmarks/deform_conv.py --train          # also forward+backward at 2x64x64
    python benchmarks/deform_conv.py --threads 1 --rounds 3 --size 90x160
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as tv_deform_conv2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from vsrkit.ops.deform_conv import deform_conv2d  # noqa: E402

SHAPES = {
    # name: (in channels, out channels, offset groups)
    "second_order": (128, 64, 16),  # BasicVSR++'s second-order deformable alignment
    "pcd": (64, 64, 8),
}


def make_inputs(
    n: int, cin: int, cout: int, groups: int, h: int, w: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random tensors shaped like the models' DCN inputs; offsets of a few pixels as in flows."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "input": torch.randn(n, cin, h, w, generator=gen),
        # Flow-guided offsets: a shared displacement of several pixels plus a residual.
        "offset": torch.randn(n, 2 * groups * 9, h, w, generator=gen) * 2.0 + 3.0,
        "mask": torch.rand(n, groups * 9, h, w, generator=gen),
        "weight": torch.randn(cout, cin, 3, 3, generator=gen) * (1.0 / (cin * 9) ** 0.5),
        "bias": torch.randn(cout, generator=gen) * 0.1,
    }


def time_round_robin(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """Best wall time and best process CPU time, in seconds, of each function.

    The functions are called in turn ``rounds`` times. CPU time (all threads) is the steadier
    figure when other processes share the cores; it includes OpenMP threads spin-waiting
    unless OMP_WAIT_POLICY=PASSIVE is set, and for one thread it is the single-core cost.
    """
    for fn in fns.values():  # warm-up: allocator, oneDNN primitive caches
        fn()
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def report(title: str, gflop: float, best: dict[str, tuple[float, float]], ref: str) -> None:
    print(f"\n{title}  ({gflop:.2f} GFLOP per call)")
    print(
        f"  {'method':<36} {'wall ms':>9} {'GFLOP/s':>8} {'speed-up':>9} {'CPU ms':>9} {'CPU-time ratio':>15}"
    )
    ref_wall, ref_cpu = best[ref]
    for name, (wall, cpu) in best.items():
        print(
            f"  {name:<36} {wall * 1e3:9.1f} {gflop / wall:8.1f} {ref_wall / wall:8.2f}x"
            f" {cpu * 1e3:9.1f} {ref_cpu / cpu:14.2f}x"
        )
    print(f"  (speed-up and CPU-time ratio are relative to {ref})")


def bench_forward(name: str, n: int, h: int, w: int, rounds: int) -> None:
    cin, cout, groups = SHAPES[name]
    t = make_inputs(n, cin, cout, groups, h, w)
    x, off, msk, wt, b = t["input"], t["offset"], t["mask"], t["weight"], t["bias"]
    x_cl = x.contiguous(memory_format=torch.channels_last)
    x16, wt16, b16 = x.bfloat16(), wt.bfloat16(), b.bfloat16()
    x16_cl = x_cl.bfloat16()
    wt_cl, wt16_cl = (
        wt.contiguous(memory_format=torch.channels_last),
        wt16.contiguous(memory_format=torch.channels_last),
    )

    def autocast_call() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return deform_conv2d(x, off, wt, b, mask=msk)

    fns: dict[str, Callable[[], object]] = {
        "torchvision fp32": lambda: tv_deform_conv2d(x, off, wt, b, padding=1, mask=msk),
        "vsrkit fp32": lambda: deform_conv2d(x, off, wt, b, mask=msk),
        "vsrkit fp32 channels_last": lambda: deform_conv2d(x_cl, off, wt, b, mask=msk),
        "vsrkit bf16 (bf16 input+weight)": lambda: deform_conv2d(x16, off, wt16, b16, mask=msk),
        "vsrkit bf16 channels_last": lambda: deform_conv2d(x16_cl, off, wt16, b16, mask=msk),
        "vsrkit autocast bf16 (fp32 tensors)": autocast_call,
        "dense conv2d fp32 channels_last": lambda: F.conv2d(x_cl, wt_cl, b, padding=1),
        "dense conv2d bf16 channels_last": lambda: F.conv2d(x16_cl, wt16_cl, b16, padding=1),
    }
    with torch.inference_mode():
        ref = tv_deform_conv2d(x, off, wt, b, padding=1, mask=msk)
        ref64 = tv_deform_conv2d(
            x.double(), off.double(), wt.double(), b.double(), padding=1, mask=msk.double()
        )
        ours = deform_conv2d(x, off, wt, b, mask=msk)
        ours16 = deform_conv2d(x16, off, wt16, b16, mask=msk).float()
        scale = ref.abs().max().item()
        print(
            f"\n[{name}] max|diff| vs torchvision fp32: vsrkit fp32 {(ours - ref).abs().max():.2e}, "
            f"bf16 {(ours16 - ref).abs().max():.2e} (output max {scale:.2f}); vs float64: "
            f"torchvision fp32 {(ref - ref64).abs().max():.2e}, vsrkit fp32 {(ours - ref64).abs().max():.2e}"
        )
        best = time_round_robin(fns, rounds)
    gflop = 2.0 * cout * cin * 9 * h * w * n / 1e9
    report(f"[{name}] forward {n}x{cin}x{h}x{w} -> {cout}, G={groups}, mask", gflop, best, "torchvision fp32")


def bench_train(name: str, n: int, h: int, w: int, rounds: int) -> None:
    cin, cout, groups = SHAPES[name]
    t = make_inputs(n, cin, cout, groups, h, w)
    leaves = {k: v.requires_grad_() for k, v in t.items()}
    grad = torch.randn(n, cout, h, w)

    def step(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for v in leaves.values():
                v.grad = None
            fn().backward(grad)

        return run

    def tv_fn() -> torch.Tensor:
        return tv_deform_conv2d(
            leaves["input"],
            leaves["offset"],
            leaves["weight"],
            leaves["bias"],
            padding=1,
            mask=leaves["mask"],
        )

    def ours_fn() -> torch.Tensor:
        return deform_conv2d(
            leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], mask=leaves["mask"]
        )

    def ours_autocast() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ours_fn()

    fns = {
        "torchvision fp32": step(tv_fn),
        "vsrkit fp32": step(ours_fn),
        "vsrkit autocast bf16": step(ours_autocast),
    }
    best = time_round_robin(fns, rounds)
    gflop = 3 * 2.0 * cout * cin * 9 * h * w * n / 1e9  # forward + 2 backward GEMMs
    report(
        f"[{name}] forward+backward {n}x{cin}x{h}x{w} -> {cout}, G={groups}", gflop, best, "torchvision fp32"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--size", default="180x320", help="frame HxW (default 180x320)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--train", action="store_true", help="also time forward+backward at 2x64x64")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.lower().split("x"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    for name in args.shapes:
        bench_forward(name, args.batch, h, w, args.rounds)
    if args.train:
        for name in args.shapes:
            bench_train(name, 2, 64, 64, args.rounds)


if __name__ == "__main__":
    main()
