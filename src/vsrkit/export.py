"""Export a model to ONNX: ``vsrkit export`` and :func:`export_onnx`.

The graph takes ``lq``, ``(1, T, 3, H, W)`` float32 RGB in [0, 1], with T fixed at export time
and H, W free, and returns ``hq``, ``(1, T, 3, 4H, 4W)`` (the input size for same-size models).
It is the model's whole-clip ``forward``, traced by ``torch.onnx.export(dynamo=True)`` with
symbolic H and W, so the models' padding to multiples and minimum sizes is computed in the
graph for each frame size.

The deformable convolutions (IconVSR's EDVR-M, BasicVSR++'s alignment) become ONNX
``DeformConv`` (opset 19; onnxruntime's CPU provider and TensorRT run it) or, with
``deform_conv="decomposed"``, GridSample and a matrix product, for runtimes without the op
(OpenVINO 2026.4). See :mod:`vsrkit.ops.deform_conv`.

The architecture, configuration, weights name and sha256 go into the model's
``metadata_props`` (keys ``vsrkit.*``). The file is checked with ``onnx.checker`` and run once
in onnxruntime before it is put in place.

onnx, onnxscript and onnxruntime come with ``pip install 'vsrkit[onnx]'``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import VsrkitError
from .fsutil import make_temp_file, put_in_place, remove_dead_leftovers

DEFORM_CONV_CHOICES = ("native", "decomposed")
DEFAULT_OPSET = 19
# DeformConv appeared in opset 19; GridSample (the decomposed form and flow warping) in 16.
_MIN_OPSET = {"native": 19, "decomposed": 16}
# The size the model is traced at. Any size works: H and W are symbolic, and the padding
# amounts are computed from them; odd sides keep every pad in use while tracing.
_TRACE_SIZE = (37, 53)
# Smallest side the exported graph is declared for: IconVSR reflect-pads by up to 3 pixels.
_MIN_SIDE = 4


def require_onnx(purpose: str = "exporting to ONNX") -> None:
    """Raise a one-line :class:`VsrkitError` when a package of the ``onnx`` extra is missing."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise VsrkitError(
            f"{purpose} needs {', '.join(missing)}, which is not installed; "
            "pip install 'vsrkit[onnx]'"
        )


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    frames: int = 5,
    deform_conv: str = "native",
    opset: int = DEFAULT_OPSET,
    weights_name: str | None = None,
    weights_sha256: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``model`` as an ONNX file taking ``frames`` frames of any size; return a summary.

    ``model`` must carry ``.arch`` and ``.config`` (as :func:`vsrkit.create_model` gives it).
    ``deform_conv`` is ``"native"`` (ONNX DeformConv) or ``"decomposed"`` (GridSample + MatMul).
    The output appears only once checked and run in onnxruntime; an existing file is refused
    unless ``overwrite``.
    """
    require_onnx()
    output = Path(output)
    if deform_conv not in DEFORM_CONV_CHOICES:
        raise VsrkitError(
            f"--deform-conv must be one of {', '.join(DEFORM_CONV_CHOICES)}, got {deform_conv!r}"
        )
    if opset < _MIN_OPSET[deform_conv]:
        raise VsrkitError(
            f"--deform-conv {deform_conv} needs opset {_MIN_OPSET[deform_conv]} or later, got {opset}"
        )
    min_frames = getattr(model, "min_frames", 1)
    if frames < min_frames:
        raise VsrkitError(f"{model.arch} needs at least {min_frames} frames, got --frames {frames}")
    remove_dead_leftovers(output.parent)
    check_destination(output, overwrite)

    # A float32 CPU copy: the caller's model keeps its device, dtype and mode.
    model = copy.deepcopy(model).cpu().float().eval()
    start = time.perf_counter()
    proto = trace_clip(model, frames, deform_conv, opset)
    metadata = {
        "vsrkit.version": _version(),
        "vsrkit.arch": model.arch,
        "vsrkit.config": json.dumps(model.config, sort_keys=True),
        "vsrkit.weights": weights_name or "",
        "vsrkit.weights_sha256": weights_sha256 or "",
        "vsrkit.frames": str(frames),
        "vsrkit.deform_conv": deform_conv,
        "vsrkit.scale": str(_scale(model)),
    }
    set_metadata(proto, metadata)

    tmp = make_temp_file(output.parent, output.stem, output.suffix)
    try:
        import onnx

        onnx.save(proto, tmp)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise VsrkitError(
                f"the exported graph is not valid ONNX: {str(exc).splitlines()[0][:300]}"
            ) from None
        check_shape = _smoke_test(tmp, frames, _scale(model))
        _put_in_place(tmp, output, overwrite)
    except OSError as exc:
        raise VsrkitError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    op_types = {node.op_type for node in proto.graph.node}
    return {
        "output": str(output),
        "arch": model.arch,
        "frames": frames,
        "deform_conv": deform_conv,
        "opset": opset,
        "deform_conv_nodes": sum(node.op_type == "DeformConv" for node in proto.graph.node),
        "op_types": sorted(op_types),
        "bytes": output.stat().st_size,
        "seconds": time.perf_counter() - start,
        "check_output_shape": check_shape,
    }


def _version() -> str:
    from . import __version__

    return __version__


def _scale(model: nn.Module) -> int:
    # The same-size BasicVSR++ variants take HR frames (is_low_res_input=False).
    return 4 if getattr(model, "is_low_res_input", True) else 1


def trace_clip(model: nn.Module, frames: int, deform_conv: str, opset: int):
    """The model's whole-clip forward as an ONNX ModelProto with symbolic H and W."""
    height = torch.export.Dim("height", min=_MIN_SIDE, max=1 << 15)
    width = torch.export.Dim("width", min=_MIN_SIDE, max=1 << 15)
    example = torch.rand(1, frames, 3, *_TRACE_SIZE)
    return trace_to_onnx(
        model,
        (example,),
        ({3: height, 4: width},),
        input_names=["lq"],
        output_names=["hq"],
        deform_conv=deform_conv,
        opset=opset,
        label=model.arch,
    )


def trace_to_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[dict[int, Any] | None, ...],
    *,
    input_names: list[str],
    output_names: list[str],
    deform_conv: str = "native",
    opset: int = DEFAULT_OPSET,
    label: str = "the model",
):
    """``module(*example)`` as an ONNX ModelProto whose inputs have the given symbolic dims.

    The deformable convolutions become ``DeformConv`` (``deform_conv="native"``) or GridSample
    and GEMM (``"decomposed"``). Any failure is one line naming ``label``.
    """
    import warnings

    from .ops import deform_conv as dc

    translations = {}
    if deform_conv == "native":
        dc.export_op()
        translations[torch.ops.vsrkit.deform_conv2d.default] = _onnx_deform_conv
    form = "DeformConv" if deform_conv == "native" else "decomposed"
    with dc.exporting_as(form), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # Traced here rather than by torch.onnx.export, which retries failures with other
            # strategies (minutes each). Non-strict: the models' Python runs as written.
            # Deferred asserts: a size condition met while tracing becomes an assertion that
            # the ONNX graph drops, not a specialisation of the graph.
            exported = torch.export.export(
                module,
                example,
                dynamic_shapes=dynamic_shapes,
                strict=False,
                prefer_deferred_runtime_asserts_over_guards=True,
            )
            program = torch.onnx.export(
                exported,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamo=True,
                custom_translation_table=translations,
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one line for the user
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise VsrkitError(f"torch.onnx.export failed for {label}: {first[:300]}") from None
    return program.model_proto


def set_metadata(proto, metadata: dict[str, str]) -> None:
    """Replace the ModelProto's ``metadata_props`` by ``metadata``."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _onnx_deform_conv(input, weight, offset, bias, mask, stride, padding, dilation, groups, offset_groups):
    """``vsrkit::deform_conv2d`` as ONNX DeformConv; the layouts are the same (torchvision's)."""
    from onnxscript import opset19 as op

    return op.DeformConv(
        input,
        weight,
        offset,
        bias,
        mask,
        dilations=list(dilation),
        group=groups,
        offset_group=offset_groups,
        pads=[padding[0], padding[1], padding[0], padding[1]],
        strides=list(stride),
    )


def _smoke_test(path: Path, frames: int, scale: int) -> tuple[int, ...]:
    """Run the file once in onnxruntime on a small clip; return the output shape."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        h, w = 32, 48
        lq = np.random.default_rng(0).random((1, frames, 3, h, w), dtype=np.float32)
        (hq,) = session.run(["hq"], {"lq": lq})
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are not one type
        raise VsrkitError(
            f"the exported file does not run in onnxruntime: {str(exc).splitlines()[0][:300]}"
        ) from None
    expected = (1, frames, 3, scale * h, scale * w)
    if hq.shape != expected or not np.isfinite(hq).all():
        raise VsrkitError(f"the exported file gave {hq.shape} (expected {expected}) or non-finite values")
    return tuple(hq.shape)


def check_destination(output: Path, overwrite: bool) -> None:
    if output.is_dir():
        raise VsrkitError(f"{output} is a directory")
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise VsrkitError(f"{output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise VsrkitError(f"no such directory: {output.parent}")


def _put_in_place(tmp: Path, output: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``output``; without ``overwrite``, never replace a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, output)
        return
    try:
        put_in_place(tmp, output)
    except FileExistsError:
        raise VsrkitError(f"{output} appeared during the export; not replaced (pass --overwrite)") from None
