"""CPU runtimes for an exported model: vsrkit's PyTorch engine, onnxruntime and OpenVINO.

One run times, on the same real REDS LR frames and weights (the model's default weights, as
``vsrkit upscale`` picks them; ``--random`` for perturbed random ones):

* ``PyTorch, plain``: the model's whole-clip ``model(lqs)`` in fp32, unprepared: the reference
  output every PSNR is measured against;
* ``PyTorch engine``: :func:`vsrkit.engine.upscale_frames`, uint8 frames in and out (what
  ``vsrkit upscale`` runs), fp32 and bf16;
* ``onnxruntime CPU``: the ``vsrkit export`` file (ONNX DeformConv) on the CPU provider, fp32
  (its CPU provider has no bf16 kernels for these ops);
* ``OpenVINO``: the ``--deform-conv decomposed`` export (OpenVINO has no DeformConv), fp32
  and bf16 through ``INFERENCE_PRECISION_HINT`` (OpenVINO then runs everything in bf16, the
  flow estimation and the warps included).

Each row is the best of ``--reps`` whole-clip runs divided by the frame count, after one
untimed warm-up run (session creation, compilation and the export itself are not counted).
PSNR is over all frames as 8-bit RGB against the plain fp32 PyTorch output (``inf``: equal).
The runtimes get as many threads as PyTorch uses. Needs ``pip install 'vsrkit[onnx]' openvino``.

    python benchmarks/runtimes.py                       # BasicVSR, 180x320, T=5
    python benchmarks/runtimes.py --models all --reps 1
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import vsrkit  # noqa: E402
from vsrkit.engine import upscale_frames  # noqa: E402
from vsrkit.export import export_onnx  # noqa: E402
from vsrkit.models import MODELS  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "reds_lr_000"


def load_frames(num: int, height: int, width: int) -> np.ndarray:
    """The first ``num`` real REDS LR frames (180×320), centre-cropped to ``height``×``width``."""
    files = sorted(DATA.glob("*.png"))[:num]
    if len(files) < num:
        raise SystemExit(f"{DATA} has only {len(files)} frames")
    frames = np.stack([np.array(Image.open(f).convert("RGB")) for f in files])
    h, w = frames.shape[1:3]
    top, left = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(frames[:, top : top + height, left : left + width])


def to_uint8(out: np.ndarray) -> np.ndarray:
    """(1, T, 3, H, W) float → (T, H, W, 3) uint8, rounded as vsrkit's engine quantises."""
    t = torch.from_numpy(np.ascontiguousarray(out))[0].float()
    return t.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def load_model(arch: str, random: bool) -> tuple[torch.nn.Module, str]:
    if random:
        model = vsrkit.create_model(arch).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * (0.02 if "conv_offset" in name else 0.005))
        return model, "perturbed random weights"
    from vsrkit.models import get_family

    name = get_family(arch).default_weights
    return vsrkit.create_model(arch, checkpoint=name), name


def runners(model: torch.nn.Module, frames: np.ndarray, folder: Path, threads: int) -> dict[str, Callable]:
    """Name → zero-argument callable returning (T, H, W, 3) uint8 frames."""
    import onnxruntime as ort
    import openvino as ov

    lqs = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255).unsqueeze(0).contiguous()
    lq = lqs.numpy()
    t = len(frames)
    out: dict[str, Callable] = {}

    def plain() -> np.ndarray:
        with torch.inference_mode():
            return to_uint8(model(lqs).numpy())

    out["PyTorch, plain (fp32 reference)"] = plain
    for precision in ("fp32", "bf16"):
        out[f"PyTorch engine {precision}"] = lambda p=precision: np.stack(
            list(upscale_frames(iter(frames), model, device="cpu", precision=p))
        )

    native = folder / "native.onnx"
    start = time.perf_counter()
    export_onnx(model, native, frames=t)
    print(f"  exported {native.name} in {time.perf_counter() - start:.0f} s", flush=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(native), options, providers=["CPUExecutionProvider"])
    out["onnxruntime CPU fp32"] = lambda: to_uint8(session.run(["hq"], {"lq": lq})[0])

    decomposed = folder / "decomposed.onnx"
    start = time.perf_counter()
    export_onnx(model, decomposed, frames=t, deform_conv="decomposed")
    print(f"  exported {decomposed.name} in {time.perf_counter() - start:.0f} s", flush=True)
    core = ov.Core()
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
        compiled = core.compile_model(
            str(decomposed), "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
        )
        # The hint that compiled: OpenVINO falls back to f32 where the CPU has no bf16.
        actual = str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
        label = f"OpenVINO {precision}" + ("" if actual == hint else f" (ran {actual})")
        out[label] = lambda c=compiled: to_uint8(c([lq])[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", default="180x320", help="LR HxW (a centre crop of the REDS LR frames)")
    parser.add_argument(
        "--models", default=next(iter(MODELS)), help=f"comma-separated, or all ({', '.join(MODELS)})"
    )
    parser.add_argument("--reps", type=int, default=2, help="timed runs per row (the best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    parser.add_argument("--random", action="store_true", help="perturbed random weights, not the defaults")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    height, width = (int(v) for v in args.size.lower().split("x"))
    archs = list(MODELS) if args.models == "all" else args.models.split(",")
    frames = load_frames(args.frames, height, width)

    import onnxruntime
    import openvino

    now = datetime.datetime.now(datetime.timezone.utc)
    print(
        f"# {now:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, {threads} threads, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"openvino {openvino.__version__}; {width}x{height} LR, T={args.frames}, best of {args.reps}"
    )
    for arch in archs:
        model, weights = load_model(arch, args.random)
        print(f"\n## {arch} ({weights})", flush=True)
        with tempfile.TemporaryDirectory(prefix="vsrkit-runtimes-") as tmp:
            rows = runners(model, frames, Path(tmp), threads)
            reference = None
            results = []
            for name, run in rows.items():
                output = run()  # warm-up (and the output compared)
                if reference is None:
                    reference = output
                best = float("inf")
                for _ in range(args.reps):
                    start = time.perf_counter()
                    run()
                    best = min(best, time.perf_counter() - start)
                results.append((name, best / args.frames, psnr(output, reference)))
                print(f"  {name}: {best / args.frames:.3f} s/frame", flush=True)
        print("\n| runtime | s/frame | PSNR vs fp32 PyTorch (dB) |\n|---|---|---|")
        for name, seconds, value in results:
            shown = "equal" if value == float("inf") else f"{value:.1f}"
            print(f"| {name} | {seconds:.2f} | {shown} |")


if __name__ == "__main__":
    main()
