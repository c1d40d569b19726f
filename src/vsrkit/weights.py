"""Checkpoint reading, layout conversion and vsrkit's own format.

Three layouts are recognised by their contents, never by file name:

- **BasicSR**: ``{"params": ..., "params_ema": ...}`` (``params_ema`` preferred). This is
  vsrkit's native key layout, so it loads unchanged.
- **mmagic / mmediting**: ``{"meta", "state_dict"}`` with keys prefixed ``generator.``, with or
  without ``step_counter`` and SPyNet's mean/std buffers. Converted by :func:`mmagic_to_native`.
- **vsrkit**: safetensors whose metadata holds the architecture and its configuration.

Every file is read with ``torch.load(weights_only=True)`` or safetensors: no pickled code runs.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import VsrkitError
from .fsutil import atomic_write

VSRKIT_FORMAT = "vsrkit-1"
_SPYNET_CONST = {"spynet.mean", "spynet.std"}


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    layout: str  # "basicsr", "mmagic" or "vsrkit"
    path: str
    arch: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


# -- reading ------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any supported checkpoint file into vsrkit's native key layout."""
    path = Path(path)
    if not path.is_file():
        raise VsrkitError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file to the user
        raise VsrkitError(f"cannot read checkpoint {path}: {unreadable_reason(path, exc)}") from None
    return _from_object(obj, str(path))


def unreadable_reason(path: str | os.PathLike, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed with ``exc``, in words for the user:
    unsafe contents (a well-formed pickle the safe loader refuses) or damage."""
    if "unsupported global" in str(exc).lower() or _is_whole_pickle(Path(path)):
        return (
            "it contains pickled objects that safe loading refuses (weights_only=True); "
            "vsrkit never runs code from a checkpoint"
        )
    return "not a readable PyTorch or safetensors checkpoint (corrupt or truncated?)"


def _is_whole_pickle(path: Path) -> bool:
    """Whether ``path`` holds a complete, well-formed pickle stream (a torch zip's ``data.pkl``, or
    a bare pickle). It is only parsed, never run: the safe loader refused it for its contents,
    not for damage, when this holds."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    return False
                data = archive.read(names[0])
        else:
            data = path.read_bytes()
        ops = list(pickletools.genops(data))
    except Exception:  # noqa: BLE001 - anything unparsable is damage
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"


def _safetensors_module(what: str):
    try:
        import safetensors.torch
    except ImportError:
        raise VsrkitError(
            f"{what} needs the safetensors package, which is not installed: pip install safetensors"
        ) from None
    return safetensors


def _read_safetensors(path: Path) -> Checkpoint:
    safetensors = _safetensors_module(f"reading {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001
        raise VsrkitError(f"cannot read checkpoint {path}: {' '.join(str(exc).split())[:200]}") from None
    if meta.get("format") == VSRKIT_FORMAT:
        return Checkpoint(sd, "vsrkit", str(path), *_vsrkit_metadata(meta, path))
    return _from_object(sd, str(path))


def _vsrkit_metadata(meta: dict[str, str], path: Path) -> tuple[str, dict[str, Any]]:
    """The architecture and configuration a vsrkit file records; their values are checked
    against the builder by :func:`vsrkit.models.model_config` before anything is built."""
    from .models import MODELS

    arch = meta.get("arch")
    if arch not in MODELS:
        raise VsrkitError(f"checkpoint {path}: metadata arch is {arch!r}, not one of {', '.join(MODELS)}")
    try:
        config = json.loads(meta.get("config", "{}"))
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise VsrkitError(f"checkpoint {path}: metadata config is not a JSON object of options")
    return arch, config


def _from_object(obj: Any, path: str) -> Checkpoint:
    if not isinstance(obj, dict):
        raise VsrkitError(f"{path} is not a model checkpoint (found a {type(obj).__name__})")
    if "params_ema" in obj or "params" in obj:
        sd = obj.get("params_ema") or obj["params"]
        return Checkpoint(_tensors(sd, path), "basicsr", path)
    if "state_dict" in obj:
        return Checkpoint(mmagic_to_native(_tensors(obj["state_dict"], path)), "mmagic", path)
    sd = _tensors(obj, path)
    if is_mmagic_layout(sd):
        return Checkpoint(mmagic_to_native(sd), "mmagic", path)
    return Checkpoint(sd, "basicsr", path)


def _tensors(sd: Any, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VsrkitError(f"{path} holds no state dict of tensors")
    return dict(sd)


# -- mmagic <-> native (BasicSR) key layout ------------------------------------------------
_MM_RULES: list[tuple[re.Pattern[str], str]] = [
    # mm's SPyNet levels are ConvModules in a Sequential; BasicSR interleaves ReLUs.
    (re.compile(r"^(spynet\.basic_module\.\d+\.basic_module\.)(\d+)\.conv\."), "SPYNET"),
    (re.compile(r"^(backward|forward)_resblocks\."), r"\1_trunk."),
    (re.compile(r"^upsample([12])\.upsample_conv\."), r"upconv\1."),
    (re.compile(r"^edvr\.feat_l([23])_conv([12])\.conv\."), r"edvr.conv_l\1_\2."),
    (re.compile(r"^edvr\.pcd_alignment\."), "edvr.pcd_align."),
    # Remaining ConvModule wrappers (PCD and TSA convs). conv_offset is a plain conv.
    (re.compile(r"\.conv\.(weight|bias)$"), r".\1"),
]


def is_mmagic_layout(sd: dict[str, torch.Tensor]) -> bool:
    return any(
        k.startswith("generator.") or "_resblocks." in k or "upsample_conv" in k or k == "step_counter"
        for k in sd
    )


def mmagic_to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmagic/mmediting keys → BasicSR keys (the steps of the reference notes, §1)."""
    from .models import families

    out = {}
    # mmagic's test mode runs the EMA generator where a checkpoint has one.
    generator = "generator_ema." if any(k.startswith("generator_ema.") for k in sd) else "generator."
    for key, value in sd.items():
        if key.startswith(generator):
            key = key[len(generator) :]
        elif key.startswith(("generator.", "generator_ema.", "discriminator.", "ema.")):
            continue
        if key == "step_counter":
            continue
        for pattern, repl in _MM_RULES:
            if repl == "SPYNET":
                key = pattern.sub(lambda m: f"{m.group(1)}{2 * int(m.group(2))}.", key)
            else:
                key = pattern.sub(repl, key)
        for family in families().values():
            for pattern, repl in family.mmagic_key_rules:
                key = pattern.sub(repl, key)
        out[key] = value
    return out


def native_to_mmagic(sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`mmagic_to_native`, for writing mmagic-layout checkpoints."""
    out = {}
    conv_module = re.compile(
        r"^(edvr\.pcd_align\.(offset_conv\d\.l\d|feat_conv\.l\d|cas_offset_conv\d)"
        r"|edvr\.fusion\.(feat_fusion|spatial_attn[1-4]|spatial_attn_l\d|spatial_attn_add1))\.(weight|bias)$"
    )
    for key, value in sd.items():
        key = re.sub(
            r"^(spynet\.basic_module\.\d+\.basic_module\.)(\d+)\.",
            lambda m: f"{m.group(1)}{int(m.group(2)) // 2}.conv.",
            key,
        )
        if arch != "basicvsr_pp":
            key = re.sub(r"^(backward|forward)_trunk\.", r"\1_resblocks.", key)
        key = re.sub(r"^upconv([12])\.", r"upsample\1.upsample_conv.", key)
        key = conv_module.sub(lambda m: f"{m.group(1)}.conv.{m.group(4)}", key)
        key = re.sub(r"^edvr\.conv_l([23])_([12])\.", r"edvr.feat_l\1_conv\2.conv.", key)
        key = key.replace("edvr.pcd_align.", "edvr.pcd_alignment.")
        out["generator." + key] = value
    return out


# -- architecture inference -----------------------------------------------------------------
def infer_arch(sd: dict[str, torch.Tensor]) -> str:
    from .models import families

    for family in families().values():
        if family.infer_config is not None and family.infer_config(sd) is not None:
            return family.name
    if any(k.startswith(("backbone.", "deform_align.")) for k in sd):
        return "basicvsr_pp"
    if (
        any(k.startswith(("edvr.", "backward_fusion.")) for k in sd)
        or "forward_trunk.main.0.weight" in sd
        and (sd["forward_trunk.main.0.weight"].shape[1] == 2 * sd["forward_trunk.main.0.weight"].shape[0] + 3)
    ):
        return "iconvsr"
    if "forward_trunk.main.0.weight" in sd:
        return "basicvsr"
    raise VsrkitError("cannot tell the architecture from the checkpoint's keys (is it a VSR model?)")


def _num_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"main\.2\.(\d+)\.")
    found = [int(m.group(1)) for k in sd if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def infer_config(sd: dict[str, torch.Tensor], arch: str) -> dict[str, Any]:
    """The constructor options that produce this state dict's shapes."""
    from .models import get_family

    family = get_family(arch)
    if family.infer_config is not None and (config := family.infer_config(sd)) is not None:
        return config
    if arch == "basicvsr_pp":
        config: dict[str, Any] = {
            "mid_channels": sd["backbone.backward_1.main.0.weight"].shape[0],
            "num_blocks": _num_blocks(sd, "backbone.backward_1."),
            "is_low_res_input": "feat_extract.main.0.weight" in sd,
        }
        if not any(k.startswith("deform_align.") for k in sd):
            config["alignment"] = "flow"
        return config
    trunk = sd["forward_trunk.main.0.weight"]
    config = {"mid_channels": trunk.shape[0], "num_blocks": _num_blocks(sd, "forward_trunk.")}
    if arch == "basicvsr":
        if "backward_trunk.main.0.weight" not in sd:
            config["propagation"] = "unidirectional"
        if trunk.shape[1] == trunk.shape[0] + 6:
            config["alignment"] = "image"
        return config
    if "edvr.fusion.feat_fusion.weight" in sd:
        edvr_c = sd["edvr.conv_first.weight"].shape[0]
        num_frames = sd["edvr.fusion.feat_fusion.weight"].shape[1] // edvr_c
        config["temporal_padding"] = (num_frames - 1) // 2
        config["edvr_channels"] = edvr_c
    else:
        config["refill"] = False
    if "fusion.weight" in sd:
        config["coupled"] = False
    return config


# -- strict loading ---------------------------------------------------------------------------
def load_state_dict_strict(model: nn.Module, ckpt: Checkpoint, arch: str) -> None:
    """Load ``ckpt`` into ``model``; any mismatch is an error naming the keys."""
    sd = dict(ckpt.state_dict)
    expected = model.state_dict()
    for key in _SPYNET_CONST:
        # Released mmediting checkpoints predate these buffers; they are ImageNet constants.
        if key in expected and key not in sd:
            sd[key] = expected[key]
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} keys ({_abbrev(keys)})")
        if misshaped:
            shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in misshaped[:3]]
            parts.append(f"{len(misshaped)} mis-shaped keys ({'; '.join(shapes)})")
        raise VsrkitError(
            f"checkpoint {ckpt.path} ({ckpt.layout} layout) does not fit {arch} "
            f"{_config_brief(model)}: " + ", ".join(parts)
        )
    model.load_state_dict(sd, strict=True)


def _abbrev(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", … {len(keys) - n} more" if len(keys) > n else "")


def _config_brief(model: nn.Module) -> str:
    config = getattr(model, "config", {})
    return "(" + ", ".join(f"{k}={v}" for k, v in config.items()) + ")" if config else ""


# -- writing ---------------------------------------------------------------------------------
def save_vsrkit(model: nn.Module, path: str | os.PathLike, arch: str | None = None) -> None:
    """Write ``model`` as safetensors with its architecture and configuration in the metadata."""
    save_file = _safetensors_module(f"writing {path}").torch.save_file
    arch = arch or getattr(model, "arch", None)
    if arch is None:
        raise ValueError("the architecture is unknown: pass arch=")
    config = getattr(model, "config", {})
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": VSRKIT_FORMAT, "arch": arch, "config": json.dumps(config)}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
