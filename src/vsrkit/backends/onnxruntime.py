"""``--backend onnxruntime``: a model's per-frame steps as ONNX graphs run by onnxruntime.

:class:`OnnxRuntimeModel` wraps a PyTorch :class:`~vsrkit.models.base.VSRModel` and has the same
interface, so the engine streams, tiles and windows it as it does the PyTorch model; only the
steps run elsewhere. Each step is exported on first use, with the batch, height and width
symbolic (the engine batches flow pairs and tiles, and frames come in any size):

- ``flow``: ``flow(ref, supp)``;
- ``backward_step`` and ``forward_step``: one graph per set of inputs present. A branch's first
  frame has no state and no flow: where feeding a zero state, a zero flow and the frame itself as
  its neighbour gives exactly the same output as the model's own start (checked on the PyTorch
  model once, bit for bit; true of BasicVSR with feature alignment, whose warp of a zero state is
  zero), the graph of the later frames serves it; otherwise (BasicVSR's ``alignment="image"``) a
  start graph without those inputs is exported;
- ``reconstruct``; ``refine`` for models with refine passes;
- for models that do not stream exactly (BasicVSR++), the whole-clip forward of one window,
  ``window_frames`` frames fixed in the graph (the model's Python loops over the frames), so one
  graph per window length met: usually one, two when a clip is shorter than a window.

- ``keyframe_feature`` for models with keyframes (IconVSR's EDVR-M refill): one graph from a
  keyframe's stacked window of frames. Neighbouring windows share frames, which the PyTorch model
  computes once; here each window is computed whole (same result to a conv's rounding).

The graphs are cached in ``vsrkit.cache.cache_dir()/onnx/ARCH-KEY/``, where KEY hashes the
architecture, its configuration, the weights' values, the opset, and the vsrkit and torch
versions. Each file is written atomically and carries the key in its metadata; a file that
onnxruntime cannot load, or whose key differs, is exported again.

Everything runs in fp32; tensors cross to onnxruntime through host memory (numpy), so the engine
keeps its tensors on the CPU and ``providers`` (CPU by default; CUDA or TensorRT where this
onnxruntime has them) choose where the graphs run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import cache_dir
from ..errors import VsrkitError
from ..export import DEFAULT_OPSET, require_onnx, set_metadata, trace_clip, trace_to_onnx
from ..fsutil import atomic_write
from ..memory import InferenceMemory
from ..models.base import KeyframeFeatureFn, StepInput, VSRModel

CPU_PROVIDER = "CPUExecutionProvider"
# Bumped when the graphs' inputs or naming change, so older cache entries are not used.
_GRAPH_FORMAT = 1
# The size steps are traced at (rounded up to the model's pad multiple): odd sides keep any
# size-dependent padding in use while tracing. Two frames: a batch of 1 would be specialised.
_TRACE_SIZE = (37, 53)
_TRACE_BATCH = 2
_MIN_SIDE = 4
_MAX_SIDE = 1 << 15

#: The tensors each step takes, in the order of its graph's inputs (None ones are left out).
STEP_INPUTS = {
    "flow": ("ref", "supp"),
    "backward_step": ("lq", "neighbour", "flow", "keyframe", "feat"),
    "forward_step": ("lq", "neighbour", "flow", "keyframe", "feat", "backward_feat"),
    "reconstruct": ("lq", "forward_feat", "backward_feat"),
    "refine": ("lq",),
    "keyframe_feature": ("window_frames",),
}


def resolve_providers(providers: str | Sequence[str] | None) -> list[str]:
    """onnxruntime execution providers by name (``CUDAExecutionProvider`` or just ``cuda``).

    A comma-separated string or a list; none means the CPU provider. A provider this onnxruntime
    lacks is one line naming those it has.
    """
    require_onnx("--backend onnxruntime")
    import onnxruntime as ort

    available = ort.get_available_providers()
    if isinstance(providers, str):
        providers = providers.split(",")
    names = [str(p).strip() for p in providers or []]
    if not names:
        return [CPU_PROVIDER]
    by_key = {p.lower(): p for p in available}
    by_key.update({p.lower().removesuffix("executionprovider"): p for p in available})
    resolved = []
    for name in names:
        provider = by_key.get(name.lower())
        if provider is None:
            raise VsrkitError(
                f"onnxruntime has no execution provider {name!r}; available: {', '.join(available)}"
            )
        if provider not in resolved:
            resolved.append(provider)
    return resolved


def weights_digest(model: nn.Module) -> str:
    """sha256 of a model's state: every tensor's name, dtype, shape and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _call(model: VSRModel, method: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model``'s step ``method`` on named tensors; absent names are None."""
    if method == "flow":
        return model.flow(inputs["ref"], inputs["supp"])
    if method in ("backward_step", "forward_step"):
        x = StepInput(inputs["lq"], inputs.get("neighbour"), inputs.get("flow"), inputs.get("keyframe"))
        if method == "backward_step":
            return model.backward_step(x, inputs.get("feat"))
        return model.forward_step(x, inputs.get("feat"), inputs.get("backward_feat"))
    if method == "reconstruct":
        return model.reconstruct(inputs["lq"], inputs["forward_feat"], inputs.get("backward_feat"))
    if method == "refine":
        return model.refine(inputs["lq"])
    if method == "keyframe_feature":
        return model.keyframe_feature(inputs["window_frames"])
    raise ValueError(f"unknown step {method!r}")


class _Step(nn.Module):
    """One step of ``model`` taking exactly the tensors ``names``, positionally, for export."""

    def __init__(self, model: VSRModel, method: str, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.method, self.names = model, method, tuple(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return _call(self.model, self.method, dict(zip(self.names, tensors, strict=True)))


class OnnxRuntimeModel(VSRModel):
    """``model`` with its steps run by onnxruntime (see the module's documentation)."""

    def __init__(
        self,
        model: VSRModel,
        providers: str | Sequence[str] | None = None,
        *,
        opset: int = DEFAULT_OPSET,
        cache_root: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.providers = resolve_providers(providers)
        if not isinstance(model, VSRModel):
            raise VsrkitError(f"--backend onnxruntime runs vsrkit models, not {type(model).__name__}")
        # A float32 CPU copy to trace: the caller's model keeps its device, dtype and mode.
        self.source = copy.deepcopy(model).cpu().float().eval()
        self.arch, self.config = model.arch, dict(model.config)
        for name in (
            "scale",
            "min_frames",
            "pad_multiple",
            "streams_exactly",
            "bidirectional",
            "refine_passes",
            "keyframe_reach",
        ):
            setattr(self, name, getattr(model, name))
        self.opset = opset
        from .. import __version__

        key_parts = {
            "arch": self.arch,
            "config": self.config,
            "weights": weights_digest(self.source),
            "opset": opset,
            "deform_conv": "native",
            "vsrkit": __version__,
            "torch": torch.__version__,
            "format": _GRAPH_FORMAT,
        }
        self.cache_key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
        root = Path(cache_root) if cache_root is not None else cache_dir()
        self.folder = root / "onnx" / f"{self.arch}-{self.cache_key[:16]}"
        #: graph names exported (not found in the cache) by this adapter, in order
        self.exported: list[str] = []
        self._sessions: dict[str, Any] = {}
        self._zero_start: dict[str, bool] = {}
        self._channels: dict[str, int] = {}
        self._example_inputs: dict[str, torch.Tensor] = {}
        self._told = False

    # -- what the engine must know ------------------------------------------------------------
    @property
    def title(self) -> str:
        return self.source.title

    def inference_memory(self, height: int, width: int, element_size: int = 4) -> InferenceMemory:
        return self.source.inference_memory(height, width, 4)

    def refine_done(self, mean_abs_residue: float) -> bool:
        return self.source.refine_done(mean_abs_residue)

    def keyframes(self, num_frames: int) -> list[int]:
        return self.source.keyframes(num_frames)

    def keyframe_window(self, key: int, num_frames: int) -> list[int]:
        return self.source.keyframe_window(key, num_frames)

    def keyframe_feature(self, window_frames: torch.Tensor) -> torch.Tensor:
        return self._step("keyframe_feature", {"window_frames": window_frames})

    def keyframe_features(self, num_frames: int, order: Sequence[int] | None = None) -> KeyframeFeatureFn:
        def feature(key: int, frame: Callable[[int], torch.Tensor]) -> torch.Tensor:
            window = self.keyframe_window(key, num_frames)
            return self.keyframe_feature(torch.stack([frame(j) for j in window], dim=1))

        return feature

    # -- steps ----------------------------------------------------------------------------------
    def flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        return self._step("flow", {"ref": ref, "supp": supp})

    def backward_step(self, x: StepInput, feat: torch.Tensor | None) -> torch.Tensor:
        return self._propagation_step("backward_step", x, {"feat": feat})

    def forward_step(
        self, x: StepInput, feat: torch.Tensor | None, backward_feat: torch.Tensor | None
    ) -> torch.Tensor:
        return self._propagation_step("forward_step", x, {"feat": feat, "backward_feat": backward_feat})

    def reconstruct(
        self, lq: torch.Tensor, forward_feat: torch.Tensor, backward_feat: torch.Tensor | None
    ) -> torch.Tensor:
        return self._step(
            "reconstruct", {"lq": lq, "forward_feat": forward_feat, "backward_feat": backward_feat}
        )

    def refine(self, lq: torch.Tensor) -> torch.Tensor:
        return self._step("refine", {"lq": lq})

    def forward(self, lqs: torch.Tensor) -> torch.Tensor:
        """(N, T, 3, H, W) → HR: one window graph per clip length (models that do not stream exactly)."""
        if self.streams_exactly:
            return self.propagate_clip(lqs)
        frames = lqs.shape[1]
        if frames < self.min_frames:
            raise VsrkitError(f"{self.title} needs at least {self.min_frames} frames, got {frames}")
        name = f"window.T{frames}"
        session = self._session(name, lambda: trace_clip(self.source, frames, "native", self.opset))
        # The clip graph takes one clip (N = 1), as `vsrkit export` writes it.
        return torch.cat([self._run(name, session, {"lq": lqs[n : n + 1]}) for n in range(lqs.shape[0])])

    def _propagation_step(
        self, method: str, x: StepInput, state: dict[str, torch.Tensor | None]
    ) -> torch.Tensor:
        inputs = {"lq": x.lq, "neighbour": x.neighbour, "flow": x.flow, "keyframe": x.keyframe, **state}
        if state["feat"] is None and x.flow is None and self._starts_from_zeros(method, inputs):
            n, _, h, w = x.lq.shape
            inputs["neighbour"] = x.lq
            inputs["flow"] = x.lq.new_zeros(n, 2, h, w)
            inputs["feat"] = x.lq.new_zeros(n, self._channels[method], h, w)
        return self._step(method, inputs)

    # -- graphs ---------------------------------------------------------------------------------
    def _step(self, method: str, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        names = [k for k in STEP_INPUTS[method] if inputs.get(k) is not None]
        name = f"{method}.{'-'.join(names)}"
        session = self._session(name, lambda: self._export_step(method, names))
        return self._run(name, session, {k: inputs[k] for k in names})

    def _examples(self) -> dict[str, torch.Tensor]:
        """Example tensors for every step input, at the trace size, from eager runs of the model."""
        if self._example_inputs:
            return dict(self._example_inputs)
        multiple = max(1, self.pad_multiple)
        h, w = (-(-side // multiple) * multiple for side in _TRACE_SIZE)
        gen = torch.Generator().manual_seed(0)
        lq = torch.rand(_TRACE_BATCH, 3, h, w, generator=gen)
        neighbour = torch.rand(_TRACE_BATCH, 3, h, w, generator=gen)
        with torch.no_grad():
            flow = self.source.flow(lq, neighbour)
            start = StepInput(lq, None, None)
            backward = self.source.backward_step(start, None) if self.bidirectional else None
            forward = self.source.forward_step(start, None, backward)
        self._channels["forward_step"] = forward.shape[1]
        if backward is not None:
            self._channels["backward_step"] = backward.shape[1]
        examples = {"lq": lq, "neighbour": neighbour, "flow": flow, "ref": lq, "supp": neighbour}
        examples.update(forward_feat=forward, feat=forward)
        if self.source.keyframes(max(self.min_frames, 2)):
            window = self.source.keyframe_window(0, max(self.min_frames, 2))
            frames = torch.rand(_TRACE_BATCH, len(window), 3, h, w, generator=gen)
            examples["window_frames"] = frames
            with torch.no_grad():
                examples["keyframe"] = self.source.keyframe_feature(frames)
        if backward is not None:
            examples["backward_feat"] = backward
        self._example_inputs = examples
        return dict(examples)

    def _starts_from_zeros(self, method: str, inputs: dict[str, torch.Tensor | None]) -> bool:
        """Whether zero state and flow (the frame as neighbour) give exactly the step's start output."""
        if method not in self._zero_start:
            examples = self._examples()
            lq = examples["lq"]
            n, _, h, w = lq.shape
            channels = self._channels[method]
            given = {k: examples[k] for k, v in inputs.items() if v is not None and k != "keyframe"}
            zeros = dict(given, neighbour=lq, flow=lq.new_zeros(n, 2, h, w))
            zeros["feat"] = lq.new_zeros(n, channels, h, w)
            with torch.no_grad():
                start = _call(self.source, method, given)
                from_zeros = _call(self.source, method, zeros)
            self._zero_start[method] = bool(torch.equal(start, from_zeros))
        return self._zero_start[method]

    def _export_step(self, method: str, names: Sequence[str]):
        examples = self._examples()
        if method == "backward_step":
            examples["feat"] = examples["backward_feat"]
        multiple = max(1, self.pad_multiple)
        batch = torch.export.Dim("batch", min=1, max=1 << 12)
        if multiple > 1:
            height = multiple * torch.export.Dim("height_blocks", min=1, max=_MAX_SIDE // multiple)
            width = multiple * torch.export.Dim("width_blocks", min=1, max=_MAX_SIDE // multiple)
        else:
            height = torch.export.Dim("height", min=_MIN_SIDE, max=_MAX_SIDE)
            width = torch.export.Dim("width", min=_MIN_SIDE, max=_MAX_SIDE)
        dims = {0: batch, 2: height, 3: width}
        # The window's frame count is fixed by the model: only its frames' size is free.
        window_dims = {0: batch, 3: height, 4: width}
        return trace_to_onnx(
            _Step(self.source, method, names),
            tuple(examples[k] for k in names),
            (tuple(window_dims if k == "window_frames" else dims for k in names),),
            input_names=list(names),
            output_names=["out"],
            opset=self.opset,
            label=f"{self.title}'s {method}",
        )

    def _session(self, name: str, build: Callable[[], Any]) -> Any:
        """The onnxruntime session of graph ``name``: from the cache, else exported and cached."""
        if name in self._sessions:
            return self._sessions[name]
        path = self.folder / f"{name}.onnx"
        session = self._load(path) if path.is_file() else None
        if session is None:
            if path.is_file():
                print(f"vsrkit: {path} is damaged or stale; exporting it again", file=sys.stderr)
            elif not self._told:
                print(
                    f"vsrkit: exporting {self.title}'s graphs for onnxruntime into {self.folder} "
                    "(once per model and weights)",
                    file=sys.stderr,
                )
                self._told = True
            proto = build()
            set_metadata(
                proto,
                {"vsrkit.cache_key": self.cache_key, "vsrkit.graph": name, "vsrkit.arch": self.arch},
            )
            import onnx

            try:
                atomic_write(path, lambda tmp: onnx.save(proto, tmp))
            except VsrkitError:  # a full disk, already one line
                raise
            except OSError as exc:
                raise VsrkitError(
                    f"cannot write {path}: {exc.strerror or exc} (VSRKIT_HOME chooses the cache folder)"
                ) from None
            self.exported.append(name)
            session = self._load(path, raise_errors=True)
        self._sessions[name] = session
        return session

    def _load(self, path: Path, raise_errors: bool = False) -> Any:
        """A session for ``path``, or None if it cannot be loaded or belongs to another key."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are not one type
            if raise_errors:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise VsrkitError(f"onnxruntime cannot load {path}: {first[:300]}") from None
            return None
        if session.get_modelmeta().custom_metadata_map.get("vsrkit.cache_key") != self.cache_key:
            if raise_errors:
                raise VsrkitError(f"{path} changed while it was being loaded")
            return None
        return session

    def _run(self, name: str, session: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # The graph may have dropped inputs the step ignores (BasicVSR's forward_step and
        # backward_feat): feed only those it declares.
        feeds = {
            arg.name: inputs[arg.name].detach().float().cpu().contiguous().numpy()
            for arg in session.get_inputs()
        }
        try:
            (out,) = session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are not one type
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise VsrkitError(f"onnxruntime failed running {self.title}'s {name}: {first[:300]}") from None
        return torch.from_numpy(out)
