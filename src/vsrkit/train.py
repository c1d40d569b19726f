"""Training as in the BasicVSR / IconVSR / BasicVSR++ papers, on one CPU, one GPU or many (DDP).

``vsrkit train CONFIG --work-dir DIR [--resume | --overwrite] [--set key=value ...]`` runs :func:`train`.
A config is YAML with the sections of :data:`DEFAULTS`; ``base: other.yaml`` inherits another
config (deep merge). See ``docs/training.md`` for the recipes and every option.

The pieces, each matching the references' behaviour (mmagic / BasicSR, read, not copied):

* **Optimiser.** Adam with one parameter group per ``optim.lr_mult`` prefix (e.g. SPyNet at
  ×0.125) and one for the rest.
* **Schedule.** :func:`cosine_restart_lr`, mmcv/mmagic's ``CosineRestart``: periods, restart
  weights, ``eta_min``, a closed form of the iteration. torch's ``CosineAnnealingWarmRestarts``
  matches only for one period with weight 1 (it has no restart weights, only geometric period
  growth, and restarts instead of staying at ``eta_min`` after the last period), so it is not
  used. Being a pure function of the iteration, the schedule needs no state to resume.
* **Fixed flow.** Parameters under ``train.fix_modules`` (SPyNet, EDVR-M) have
  ``requires_grad=False`` for the 0-based iterations ``it < fix_iter``, i.e. exactly the first
  ``fix_iter`` optimiser steps; their gradients stay ``None``, so Adam skips them (no moment
  updates, no step). ``fix_iter`` ≤ 0 never freezes (mmagic's ``fix_iter=-1``).
* **Loss.** Charbonnier ``mean(sqrt((x - y)² + eps))`` with ``eps = 1e-12`` (ε = 1e-6).
* **EMA** (``train.ema_decay``, BasicSR's BasicVSR++ REDS recipe: 0.999) of the parameters;
  validation, ``best.pth`` and ``final.safetensors`` use it when on.
* **Checkpoints** ``work_dir/checkpoints/{latest,best,iter_N}.pth`` hold the model (``params``,
  plus ``params_ema``: BasicSR's layout, so ``vsrkit.create_model(checkpoint=...)`` and every
  command read them directly), optimiser, schedule, RNG states of every rank, iteration and
  config. They are written with :func:`vsrkit.weights.atomic_write` (temporary file, fsync,
  rename) and read with ``torch.load(weights_only=True)``.
* **DDP.** Started by ``torchrun``: gloo on CPU, NCCL on CUDA; only rank 0 writes. The model is
  re-wrapped when the frozen set changes, because DDP only synchronises the parameters that
  required gradients when it was built.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from .checks import (
    ANY_INT,
    BOOLEAN,
    NAMES,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    PROBABILITY,
    TEXT,
    Check,
    choice,
    list_of,
    mapping_of,
    nearest_key,
    number,
    optional,
)
from .data.datasets import DATASETS, DEGRADATIONS
from .errors import VsrkitError
from .fsutil import disk_full_error, is_disk_full, remove_dead_leftovers
from .models import MODELS, default_family

CHECKPOINT_FORMAT = "vsrkit-train-1"


@dataclass(frozen=True)
class Opt:
    """A config value: its default and what it accepts."""

    default: Any
    check: Check


_LAYOUT = choice("videos", *DATASETS)
_DEGRADATION = choice(*DEGRADATIONS)

#: Every option: its default and what it accepts. The one declaration of the config: unknown keys
#: and bad values (at any depth, in files and ``--set``) are refused against it, and
#: :data:`DEFAULTS` is read from it. The ``model`` section holds ``arch`` and the builder's options
#: (checked against the builder, see :func:`vsrkit.models.model_config`); ``optim.lr_mult`` maps
#: any module prefix to a multiplier.
SCHEMA: dict[str, Any] = {
    "model": {"arch": Opt(default_family().name, choice(*MODELS))},
    "init": {
        "model": Opt(None, optional(TEXT)),  # whole model: checkpoint file or registered weights name
        "spynet": Opt(None, optional(TEXT)),  # SPyNet only: a SPyNet file or a checkpoint with spynet.*
        "edvr": Opt(None, optional(TEXT)),  # IconVSR's EDVR-M: an EDVR-M file or a checkpoint with edvr.*
    },
    "data": {
        "layout": Opt("videos", _LAYOUT),  # "videos" (a folder of video files) or a data-set layout
        "root": Opt(None, optional(TEXT)),
        "split": Opt("train", TEXT),
        "clips": Opt(None, optional(NAMES)),  # only these clips / video file names (globs for videos)
        "exclude": Opt([], optional(NAMES)),  # leave these out (globs): hold-out clips
        "degradation": Opt("bi", _DEGRADATION),
        "scale": Opt(4, POSITIVE_INT),
        "num_frames": Opt(15, POSITIVE_INT),
        "lr_patch": Opt(64, POSITIVE_INT),
        "mirror": Opt(False, BOOLEAN),  # Vimeo-90K: append the reversed clip (7 → 14 frames)
        "flip": Opt(True, BOOLEAN),
        "transpose": Opt(True, BOOLEAN),
        "temporal_flip": Opt(False, BOOLEAN),
        "batch_size": Opt(4, POSITIVE_INT),  # per process (per GPU); the total is batch_size × world size
        "num_workers": Opt(4, NON_NEGATIVE_INT),
        "max_frames_per_video": Opt(None, optional(POSITIVE_INT)),
        "cache_dir": Opt(None, optional(TEXT)),  # videos: decoded-frame cache; default WORK_DIR/frame_cache
        "use_lq_files": Opt(True, BOOLEAN),  # data-set layouts: use the shipped LR frames when present
    },
    "val": {
        "every": Opt(0, NON_NEGATIVE_INT),  # iterations between validations; 0: never
        "layout": Opt(None, optional(_LAYOUT)),  # default: the data layout, or a test set (reds4, vid4, ...)
        "root": Opt(None, optional(TEXT)),  # default: data.root
        "clips": Opt(None, optional(NAMES)),
        "exclude": Opt([], optional(NAMES)),
        "degradation": Opt(None, optional(_DEGRADATION)),  # default: data.degradation
        "max_frames": Opt(None, optional(POSITIVE_INT)),
        "gt_crop": Opt(
            None, optional(POSITIVE_INT)
        ),  # centre crop of the GT (pixels) to bound time and memory
        "space": Opt("y", choice("y", "rgb")),  # "y" (Vid4, UDM10, Vimeo-90K-T) or "rgb" (REDS4)
    },
    "train": {
        "iterations": Opt(300000, POSITIVE_INT),
        "seed": Opt(0, NON_NEGATIVE_INT),
        "fix_iter": Opt(0, ANY_INT),
        "fix_modules": Opt(["spynet", "edvr"], NAMES),
        "ema_decay": Opt(None, optional(PROBABILITY)),
        "save_every": Opt(5000, NON_NEGATIVE_INT),  # latest.pth
        "keep_every": Opt(0, NON_NEGATIVE_INT),  # also iter_N.pth every this many iterations; 0: never
        "log_every": Opt(100, NON_NEGATIVE_INT),
        "num_threads": Opt(None, optional(POSITIVE_INT)),  # torch.set_num_threads; None: torch's default
        "device": Opt("auto", choice("auto", "cpu", "cuda")),
        "find_unused_parameters": Opt(False, BOOLEAN),
    },
    "optim": {
        "type": Opt("adam", choice("adam")),
        "lr": Opt(2.0e-4, POSITIVE_FLOAT),
        "betas": Opt([0.9, 0.99], list_of(number(0, 1, high_open=True), length=2)),
        "weight_decay": Opt(0.0, NON_NEGATIVE_FLOAT),
        "lr_mult": Opt({}, optional(mapping_of(NON_NEGATIVE_FLOAT))),  # module-name prefix → multiplier
    },
    "scheduler": {
        "type": Opt("cosine_restart", choice("cosine_restart", "constant")),
        "periods": Opt(None, optional(list_of(POSITIVE_INT))),  # None: one period of train.iterations
        "restart_weights": Opt([1.0], optional(list_of(NON_NEGATIVE_FLOAT))),
        "eta_min": Opt(1.0e-7, NON_NEGATIVE_FLOAT),
    },
    "loss": {"type": Opt("charbonnier", choice("charbonnier")), "eps": Opt(1.0e-12, POSITIVE_FLOAT)},
}


def _defaults(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: _defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}


#: Every option with its default (from :data:`SCHEMA`). Configs override these; ``--set`` may only
#: name keys that exist here or in the config, except under the free-form sections ``model`` and
#: ``optim.lr_mult``.
DEFAULTS: dict[str, Any] = _defaults(SCHEMA)

_FREE_FORM = {("model",), ("optim", "lr_mult")}


# ----------------------------------------------------------------------------------- configs


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise VsrkitError(f"config inheritance loops through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise VsrkitError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise VsrkitError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise VsrkitError(f"config {path} must be a mapping of sections")
    base = data.pop("base", None)
    if base:
        data = _merge(_read_yaml(path.parent / base, (*seen, path)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.iterations=1000"`` → ``(["train", "iterations"], 1000)``; the value is a YAML scalar."""
    if "=" not in text:
        raise VsrkitError(f"--set expects key=value, got {text!r}")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise VsrkitError(f"--set: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # e.g. an unquoted path with a colon: take it as text
    return parts, value


def apply_overrides(cfg: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides (dotted keys) to a merged config, rejecting unknown keys."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        parts, value = parse_override(text)
        node = cfg
        for depth, part in enumerate(parts[:-1]):
            if part not in node:
                if tuple(parts[: depth + 1]) in _FREE_FORM or tuple(parts[:depth]) in _FREE_FORM:
                    node[part] = {}
                else:
                    raise VsrkitError(f"--set {text}: {_unknown(parts[: depth + 1], node)}")
            if not isinstance(node[part], dict):
                raise VsrkitError(f"--set {text}: {'.'.join(parts[: depth + 1])!r} is not a section")
            node = node[part]
        if parts[-1] not in node and tuple(parts[:-1]) not in _FREE_FORM:
            raise VsrkitError(f"--set {text}: {_unknown(parts, node)}")
        node[parts[-1]] = value
    return cfg


def _unknown(parts: Sequence[str], known: Iterable[str]) -> str:
    """ "unknown key train.iteration (did you mean train.iterations?)"."""
    section = "".join(p + "." for p in parts[:-1])
    return f"unknown key {section}{parts[-1]} ({nearest_key(parts[-1], known, section)})"


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a training config: defaults, then the file (with its ``base`` chain), then ``overrides``.

    Every key and value is checked against :data:`SCHEMA` (see :func:`check_config`).
    """
    cfg = _merge(DEFAULTS, _read_yaml(Path(path)))
    check_config(cfg, source=f"config {path}")
    if overrides:
        cfg = apply_overrides(cfg, overrides)
        check_config(cfg, source="--set")
    return cfg


def _check_section(schema: dict[str, Any], section: dict[str, Any], path: list[str], source: str) -> None:
    """Check (and normalise in place) ``section`` against ``schema``: keys, then values."""
    for key, value in list(section.items()):
        parts = [*path, str(key)]
        dotted = ".".join(parts)
        rule = schema.get(key)
        if rule is None:
            raise VsrkitError(f"{source}: {_unknown(parts, schema)}")
        if isinstance(rule, dict):
            if not isinstance(value, dict):
                raise VsrkitError(f"{source}: {dotted} must be a section of keys, got {value!r:.60}")
            _check_section(rule, value, parts, source)
        else:
            section[key] = rule.check(value, f"{source}: {dotted}")


def check_config(cfg: dict[str, Any], source: str = "config") -> None:
    """Refuse, in one line naming ``source`` and the dotted key, any key that :data:`SCHEMA` (or,
    under ``model``, the architecture's builder) does not have and any value it does not accept,
    then the combinations that would fail late (after minutes of data preparation).

    Values are normalised in place (``"1e-4"``, which YAML reads as text, becomes a number).
    """
    from .models import build_model, model_config

    model = cfg.get("model")
    if not isinstance(model, dict):
        raise VsrkitError(f"{source}: model must be a section of keys, got {model!r:.60}")
    options = dict(model)
    arch = options.pop("arch", None)
    if not arch:
        raise VsrkitError(f"{source}: model.arch is required")
    arch = SCHEMA["model"]["arch"].check(arch, f"{source}: model.arch")
    checked = model_config(arch, source=source, section="model.", **options)
    cfg["model"] = {"arch": arch, **{k: checked[k] for k in options}}
    _check_section(SCHEMA, {k: v for k, v in cfg.items() if k != "model"}, [], source)

    data, sch = cfg["data"], cfg["scheduler"]
    periods, weights = sch["periods"], sch["restart_weights"]
    if periods and weights and len(weights) not in (1, len(periods)):
        raise VsrkitError(
            f"{source}: scheduler.restart_weights has {len(weights)} values for {len(periods)} "
            "scheduler.periods (give one, or one per period)"
        )
    # The shortest clip is the model's to say: build it without weights' memory to ask it.
    with torch.device("meta"):
        shell = build_model(arch, **checked)
    need = shell.min_frames
    frames = int(data["num_frames"]) * (2 if data["mirror"] else 1)
    if frames < need:
        raise VsrkitError(
            f"{source}: {shell.title} with this config needs clips of >= {need} frames, data gives {frames}"
        )


def val_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``val`` section with its defaults taken from ``data``."""
    val, data = dict(cfg["val"]), cfg["data"]
    val["layout"] = val["layout"] or data["layout"]
    val["root"] = val["root"] or data["root"]
    val["degradation"] = val["degradation"] or data["degradation"]
    val["scale"] = data["scale"]
    return val


# ----------------------------------------------------------------------------------- pieces


def cosine_restart_lr(
    base_lr: float, iteration: int, periods: Sequence[int], restart_weights: Sequence[float], eta_min: float
) -> float:
    """mmcv/mmagic ``CosineRestart``: the learning rate at 0-based ``iteration``.

    In period ``i`` (starting at ``c_i = sum(periods[:i])``) the rate is
    ``eta_min + 0.5 · w_i · (base_lr - eta_min) · (1 + cos(π · (it - c_i) / periods[i]))``;
    after the last period it stays at ``eta_min``.
    """
    if len(periods) != len(restart_weights):
        raise VsrkitError("scheduler.periods and scheduler.restart_weights must have the same length")
    start = 0
    for period, weight in zip(periods, restart_weights, strict=True):
        if iteration < start + period:
            alpha = (iteration - start) / period
            return eta_min + 0.5 * weight * (base_lr - eta_min) * (1.0 + math.cos(math.pi * alpha))
        start += period
    return float(eta_min)


def charbonnier_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``mean(sqrt((pred - target)² + eps))``: the papers' loss (``eps`` is ε², 1e-12)."""
    return torch.sqrt((pred - target).pow(2) + eps).mean()


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def param_groups(model: nn.Module, lr: float, lr_mult: dict[str, float]) -> list[dict[str, Any]]:
    """Adam parameter groups: one per ``lr_mult`` prefix (longest prefix wins), one for the rest.

    Each group carries ``name`` and ``base_lr`` (the rate before the schedule). Prefixes that
    match nothing (``edvr`` on BasicVSR) give no group.
    """
    buckets: dict[str, list[nn.Parameter]] = {"base": []}
    for name, p in model.named_parameters():
        hits = [k for k in lr_mult if _matches(name, k)]
        buckets.setdefault(max(hits, key=len) if hits else "base", []).append(p)
    groups = []
    for key, params in buckets.items():
        if not params:
            continue
        mult = 1.0 if key == "base" else float(lr_mult[key])
        groups.append({"params": params, "lr": lr * mult, "base_lr": lr * mult, "name": key})
    return groups


def set_frozen(model: nn.Module, prefixes: Sequence[str], frozen: bool) -> int:
    """Turn ``requires_grad`` off (``frozen``) or on for parameters under ``prefixes``; returns the count."""
    count = 0
    for name, p in model.named_parameters():
        if any(_matches(name, k) for k in prefixes):
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None
            count += 1
    return count


def _raw_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors with container and ``generator.`` prefix removed, keys untouched."""
    from .weights import read_checkpoint

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - safetensors or unreadable: let read_checkpoint decide
        return read_checkpoint(path).state_dict
    if isinstance(obj, dict):
        for key in ("params_ema", "params", "state_dict"):
            if isinstance(obj.get(key), dict) and obj[key]:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VsrkitError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("generator."): v for k, v in obj.items() if k != "step_counter"}


def load_submodule(model: nn.Module, prefix: str, source: str | os.PathLike) -> str:
    """Initialise ``model.<prefix>`` from ``source``, strictly within the submodule.

    ``source`` is a file or a registered weights name; it may be a whole model (its
    ``<prefix>.*`` keys are used, e.g. SPyNet from ``basicvsr_reds4``) or the component alone
    (keys without the prefix, e.g. ``spynet`` or ``edvrm_reds``), in BasicSR or mmagic layout.
    Returns a description for the log.
    """
    from .hub import get_weights
    from .weights import Checkpoint, load_state_dict_strict, mmagic_to_native

    sub = getattr(model, prefix, None)
    if not isinstance(sub, nn.Module):
        raise VsrkitError(f"init.{prefix}: {getattr(model, 'arch', 'this model')} has no {prefix} module")
    path, _entry = get_weights(os.fspath(source))
    raw = _raw_state_dict(Path(path))
    dot = prefix + "."
    if not any(k.startswith(dot) for k in raw):
        raw = {dot + k: v for k, v in raw.items()}
    # Key renames (mmagic → BasicSR) are written for full-model keys, hence after prefixing.
    native = mmagic_to_native(raw)
    sd = {k[len(dot) :]: v for k, v in native.items() if k.startswith(dot)}
    target = sub.state_dict()
    for const in ("mean", "std"):  # SPyNet's ImageNet constants, absent from older files
        if prefix == "spynet" and const in target and const not in sd:
            sd[const] = target[const]
    load_state_dict_strict(sub, Checkpoint(sd, "component", str(path)), prefix)
    return f"{prefix} ← {source} ({len(sd)} tensors)"


def init_weights(model: nn.Module, init: dict[str, Any]) -> list[str]:
    """Apply the ``init`` section: whole model first, then components (which override it)."""
    from . import create_model

    done = []
    if init.get("model"):
        src = create_model(model.arch, checkpoint=init["model"], **{k: v for k, v in model.config.items()})
        model.load_state_dict(src.state_dict(), strict=True)
        done.append(f"model ← {init['model']}")
    for prefix in ("spynet", "edvr"):
        if init.get(prefix):
            done.append(load_submodule(model, prefix, init[prefix]))
    return done


def build_training_model(cfg: dict[str, Any], init: bool = True) -> nn.Module:
    """The config's model, initialised from the seed (same on every rank) and the ``init`` section.

    ``init=False`` skips the ``init`` section (a resumed run overwrites every weight anyway, and
    must not need the initial checkpoints any more).
    """
    from .models import build_model

    torch.manual_seed(int(cfg["train"]["seed"]))
    model_cfg = dict(cfg["model"])
    arch = model_cfg.pop("arch")
    model = build_model(arch, **model_cfg)
    model.init_log = init_weights(model, cfg["init"]) if init else []  # type: ignore[attr-defined]
    return model


# ----------------------------------------------------------------------------------- RNG state


def _rng_state() -> dict[str, Any]:
    """This process's RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": [int(version), [int(v) for v in state], gauss],
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------- distributed


class _Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, device_choice: str) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
        if device_choice == "cuda" and not torch.cuda.is_available():
            raise VsrkitError("train.device is cuda but no CUDA device is available")
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.enabled = self.world_size > 1
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            # All ranks tear gloo down together: once in CI, rank 1, which destroyed its group
            # while rank 0 was still writing the final weights, aborted in gloo's threads
            # ("terminate called without an active exception").
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------- logging


class _Log:
    """Console progress line, ``train.log`` (text), ``log.jsonl`` and TensorBoard (rank 0 only)."""

    def __init__(self, work_dir: Path, enabled: bool, start_iteration: int, resumed: bool) -> None:
        self.enabled = enabled
        self.work_dir = work_dir
        self.writer = None
        if not enabled:
            return
        self.jsonl = work_dir / "log.jsonl"
        if resumed:
            self._truncate_jsonl(start_iteration)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged after the checkpoint by the interrupted run, so the
            # resumed curve joins the old one instead of overlapping it.
            self.writer = SummaryWriter(
                str(work_dir / "tensorboard"), purge_step=start_iteration if resumed else None
            )
        except ImportError:
            warnings.warn(
                "tensorboard is not installed: no TensorBoard logs (pip install tensorboard)", stacklevel=2
            )

    def _truncate_jsonl(self, iteration: int) -> None:
        from .weights import atomic_write

        if not self.jsonl.is_file():
            return
        keep = []
        for line in self.jsonl.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if rec.get("iter", 0) <= iteration:
                keep.append(line)
        atomic_write(self.jsonl, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))

    def record(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(self.jsonl, json.dumps(rec) + "\n")

    def text(self, line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        self._append(self.work_dir / "train.log", time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")

    @staticmethod
    def _append(path: Path, text: str) -> None:
        try:
            with open(path, "a") as f:
                f.write(text)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(exc, path) from None
            raise

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


# ----------------------------------------------------------------------------------- work folder

#: The files a run writes in its work folder, the only ones ``--overwrite`` removes: checkpoints, final
#: weights, logs and TensorBoard events. ``frame_cache/`` (decoded videos, valid for any run) and any
#: other file stay.
RUN_FILES = ("checkpoints/{latest,best,iter_N}.pth", "final.safetensors", "log.jsonl", "train.log",
             "tensorboard/events.out.tfevents.*")  # fmt: skip
_CHECKPOINT_NAME = re.compile(r"(?:latest|best|iter_\d+)\.pth")
_EVENTS_PREFIX = "events.out.tfevents."


def previous_run_files(work_dir: Path) -> list[Path]:
    """The files of :data:`RUN_FILES` that ``work_dir`` holds."""
    found = [work_dir / name for name in ("final.safetensors", "log.jsonl", "train.log")]
    found = [p for p in found if p.is_file() and not p.is_symlink()]
    for folder, wanted in (
        (work_dir / "checkpoints", _CHECKPOINT_NAME.fullmatch),
        (work_dir / "tensorboard", lambda name: name.startswith(_EVENTS_PREFIX)),
    ):
        if folder.is_dir() and not folder.is_symlink():
            found += sorted(
                p for p in folder.iterdir() if wanted(p.name) and p.is_file() and not p.is_symlink()
            )
    return found


def _work_dir_refusal(work_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """Why ``work_dir`` may not be used with these options, or None."""
    if resume and overwrite:
        return "--resume continues the run in the work folder and --overwrite starts it afresh: choose one"
    if work_dir.exists() and not work_dir.is_dir():
        return f"work folder {work_dir} is a file"
    if resume or overwrite:
        return None
    previous = previous_run_files(work_dir) if work_dir.is_dir() else []
    if previous:
        return (
            f"work folder {work_dir} holds a previous run ({previous[0].relative_to(work_dir)}); "
            "pass --resume to continue it or --overwrite to start afresh"
        )
    return None


def _remove_previous_run(work_dir: Path) -> None:
    """``--overwrite``: remove the previous run's :data:`RUN_FILES`, nothing else."""
    for path in previous_run_files(work_dir):
        path.unlink(missing_ok=True)
    for folder in ("checkpoints", "tensorboard"):
        try:
            (work_dir / folder).rmdir()  # only if now empty: a user's files in it stay
        except OSError:
            pass


# ----------------------------------------------------------------------------------- trainer


class Trainer:
    """One training run in ``work_dir``; :meth:`run` trains to ``train.iterations``."""

    def __init__(
        self, cfg: dict[str, Any], work_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False
    ) -> None:
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.ckpt_dir = self.work_dir / "checkpoints"
        tr = cfg["train"]
        if tr.get("num_threads"):
            torch.set_num_threads(int(tr["num_threads"]))
        self.dist = _Dist(str(tr.get("device", "auto")))
        # Rank 0 prepares the work folder (other nodes may not see it); every rank acts on its verdict.
        refusal = self.dist.gather_objects(
            self._prepare_work_dir(resume, overwrite) if self.dist.is_main else None
        )[0]
        if refusal is not None:
            self.dist.close()
            raise VsrkitError(refusal)
        self.seed = int(tr["seed"])
        random.seed(self.seed + self.dist.rank)
        np.random.seed((self.seed + self.dist.rank) % 2**32)

        will_resume = resume and (self.ckpt_dir / "latest.pth").is_file()
        self.model = build_training_model(cfg, init=not will_resume).to(self.dist.device)
        self.fix_modules = [
            m for m in tr["fix_modules"] if isinstance(getattr(self.model, m, None), nn.Module)
        ]
        opt = cfg["optim"]
        self.optimizer = torch.optim.Adam(
            param_groups(self.model, float(opt["lr"]), dict(opt["lr_mult"] or {})),
            lr=float(opt["lr"]),
            betas=tuple(float(b) for b in opt["betas"]),
            weight_decay=float(opt["weight_decay"]),
        )
        self.ema: nn.Module | None = None
        if tr.get("ema_decay"):
            self.ema = copy.deepcopy(self.model).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)
        self.iteration = 0
        self.best: dict[str, Any] = {"psnr": None, "iteration": None}
        resumed = False
        if resume:
            resumed = self._load_latest()
        # --resume without a checkpoint (a run killed before its first save) also drops that run's log lines.
        self.log = _Log(self.work_dir, self.dist.is_main, self.iteration, resumed or resume)
        for line in getattr(self.model, "init_log", []):
            self.log.text(f"init: {line}")
        self.frozen: bool | None = None
        self.net: nn.Module = self.model
        self.val_clips: list[Any] | None = None

    # -- schedule & freezing
    def periods(self) -> tuple[list[int], list[float]]:
        sch = self.cfg["scheduler"]
        periods = sch.get("periods") or [int(self.cfg["train"]["iterations"])]
        weights = sch.get("restart_weights") or [1.0] * len(periods)
        if len(weights) == 1 and len(periods) > 1:
            weights = list(weights) * len(periods)
        return [max(1, int(p)) for p in periods], [float(w) for w in weights]

    def set_learning_rates(self, iteration: int) -> dict[str, float]:
        sch = self.cfg["scheduler"]
        periods, weights = self.periods()
        out = {}
        for group in self.optimizer.param_groups:
            if sch["type"] == "constant":
                lr = group["base_lr"]
            else:
                lr = cosine_restart_lr(group["base_lr"], iteration, periods, weights, float(sch["eta_min"]))
            group["lr"] = lr
            out[group["name"]] = lr
        return out

    def _apply_freezing(self, iteration: int) -> None:
        fix_iter = int(self.cfg["train"]["fix_iter"])
        frozen = bool(self.fix_modules) and fix_iter > 0 and iteration < fix_iter
        if frozen == self.frozen:
            return
        count = set_frozen(self.model, self.fix_modules, frozen)
        if self.frozen is not None or frozen:
            state = "frozen" if frozen else "trainable"
            self.log.text(f"iter {iteration}: {', '.join(self.fix_modules)} {state} ({count} tensors)")
        self.frozen = frozen
        self.net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # Rebuilt on every change: DDP registers gradient hooks only for the parameters that
            # require gradients when it is constructed.
            cuda = self.dist.device.type == "cuda"
            self.net = DistributedDataParallel(
                self.model,
                device_ids=[self.dist.device.index] if cuda else None,
                find_unused_parameters=bool(self.cfg["train"]["find_unused_parameters"]),
            )

    # -- checkpoints
    def _prepare_work_dir(self, resume: bool, overwrite: bool) -> str | None:
        """Create the work folder (and with ``overwrite`` empty it of the previous run); the reason why
        it may not be used, or None."""
        refusal = _work_dir_refusal(self.work_dir, resume, overwrite)
        if refusal is not None:
            return refusal
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            # Left by processes killed inside atomic_write (never a complete checkpoint); a live run's stay.
            for folder in (self.work_dir, self.ckpt_dir):
                remove_dead_leftovers(folder)
            if overwrite:
                _remove_previous_run(self.work_dir)
        except OSError as exc:
            return f"cannot prepare work folder {self.work_dir}: {exc.strerror or exc}"
        return None

    def state(self) -> dict[str, Any]:
        periods, weights = self.periods()
        rng = self.dist.gather_objects(_rng_state())
        return {
            "format": CHECKPOINT_FORMAT,
            "arch": self.model.arch,
            "model_config": dict(self.model.config),
            "iteration": self.iteration,
            "params": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            **(
                {"params_ema": {k: v.detach().cpu() for k, v in self.ema.state_dict().items()}}
                if self.ema is not None
                else {}
            ),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "type": self.cfg["scheduler"]["type"],
                "periods": periods,
                "restart_weights": weights,
                "eta_min": float(self.cfg["scheduler"]["eta_min"]),
                "iteration": self.iteration,
            },
            "rng": rng,
            "best": dict(self.best),
            "config": self.cfg,
        }

    def save(self, names: Sequence[str]) -> None:
        """Write the checkpoint under each of ``names`` (all ranks call; rank 0 writes)."""
        state = self.state()  # collective (RNG states of every rank)
        if not self.dist.is_main:
            return
        from .weights import atomic_write

        def write(tmp: str) -> None:
            # Through a file object: torch.save to a path hides the OSError of a full disk.
            with open(tmp, "wb") as f:
                torch.save(state, f)

        for name in names:
            atomic_write(self.ckpt_dir / name, write)

    def _load_latest(self) -> bool:
        path = self.ckpt_dir / "latest.pth"
        if not path.is_file():
            if self.dist.is_main:
                print(f"vsrkit: no checkpoint at {path}; starting from scratch", file=sys.stderr)
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            from .weights import unreadable_reason

            raise VsrkitError(f"cannot read {path}: {unreadable_reason(path, exc)}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise VsrkitError(f"{path} is not a vsrkit training checkpoint")
        if state["arch"] != self.model.arch or state["model_config"] != dict(self.model.config):
            raise VsrkitError(
                f"{path} is a {state['arch']} {state['model_config']}, but the config builds "
                f"{self.model.arch} {dict(self.model.config)}"
            )
        self.model.load_state_dict(state["params"], strict=True)
        if self.ema is not None:
            self.ema.load_state_dict(state.get("params_ema", state["params"]), strict=True)
        saved_groups = [g.get("name") for g in state["optimizer"]["param_groups"]]
        groups = [g["name"] for g in self.optimizer.param_groups]
        if saved_groups != groups:
            raise VsrkitError(f"{path}: optimizer groups {saved_groups} differ from the config's {groups}")
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the config's rates win (they may have changed)
            group["base_lr"] = float(self.cfg["optim"]["lr"]) * (
                1.0 if group["name"] == "base" else float(self.cfg["optim"]["lr_mult"][group["name"]])
            )
        self.iteration = int(state["iteration"])
        self.best = dict(state.get("best") or self.best)
        rng = state.get("rng") or []
        if self.dist.rank < len(rng):
            _set_rng_state(rng[self.dist.rank])
        if self.dist.is_main:
            print(f"vsrkit: resumed from {path} at iteration {self.iteration}", file=sys.stderr)
        return True

    # -- data
    def _loader(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        from .data.train_data import IterationBatchSampler, build_train_dataset, seed_worker

        data = self.cfg["data"]
        cache = data.get("cache_dir") or self.work_dir / "frame_cache"
        # Rank 0 decodes the videos into the cache; the others then only map it.
        if not self.dist.is_main:
            self.dist.barrier()
        dataset = build_train_dataset(data, self.seed, cache)
        if self.dist.is_main:
            self.dist.barrier()
        sampler = IterationBatchSampler(
            int(data["batch_size"]), self.dist.rank, self.dist.world_size, self.iteration
        )
        workers = int(data["num_workers"])
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.seed * 1000 + self.dist.rank),
            persistent_workers=workers > 0,
            pin_memory=self.dist.device.type == "cuda",
            prefetch_factor=2 if workers > 0 else None,
        )

    # -- validation
    @torch.no_grad()
    def validate(self) -> float | None:
        from .data.train_data import load_val_clips
        from .metrics import MetricAverager, psnr

        val = val_config(self.cfg)
        if self.val_clips is None:
            self.val_clips = load_val_clips(val)
        model = self.ema if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        avg = MetricAverager()
        for clip in self.val_clips:
            out = model(clip.lq[None].to(self.dist.device))[0].clamp_(0, 1).cpu()
            for t in range(out.shape[0]):
                avg.add(clip.name, psnr(out[t], clip.gt[t], space=str(val["space"])))
        model.train(was_training)
        return avg.mean() if avg.num_frames else None

    def _ema_update(self) -> None:
        if self.ema is None:
            return
        decay = float(self.cfg["train"]["ema_decay"])
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
            for e, b in zip(self.ema.buffers(), self.model.buffers(), strict=True):
                e.copy_(b)

    # -- the loop
    def run(self) -> dict[str, Any]:
        tr = self.cfg["train"]
        total = int(tr["iterations"])
        val_every = int(self.cfg["val"]["every"] or 0)
        save_every, keep_every = int(tr["save_every"] or 0), int(tr["keep_every"] or 0)
        log_every = max(1, int(tr["log_every"] or 1))
        eps = float(self.cfg["loss"]["eps"])
        if self.iteration >= total:
            self.log.text(f"already at iteration {self.iteration} of {total}: nothing to do")
            self.log.close()
            self.dist.close()
            return {"iteration": self.iteration, "best": self.best, "work_dir": str(self.work_dir)}
        self.log.text(
            f"training {self.model.arch} {self.model.config} from iteration {self.iteration} to {total} "
            f"on {self.dist.world_size} process(es), {self.dist.device}; total batch "
            f"{int(self.cfg['data']['batch_size']) * self.dist.world_size}"
        )
        batches = iter(self._loader())
        self.model.train()
        losses: list[float] = []
        t_last, it_last, t_start, it_start = (
            time.perf_counter(),
            self.iteration,
            time.perf_counter(),
            self.iteration,
        )
        while self.iteration < total:
            it = self.iteration
            self._apply_freezing(it)
            lrs = self.set_learning_rates(it)
            lq, gt = next(batches)
            lq = lq.to(self.dist.device, non_blocking=True)
            gt = gt.to(self.dist.device, non_blocking=True)
            loss = charbonnier_loss(self.net(lq), gt, eps)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self._ema_update()
            self.iteration = it + 1
            losses.append(float(loss.detach()))

            if self.iteration % log_every == 0 or self.iteration == total:
                mean_loss = self.dist.mean(sum(losses) / len(losses))
                losses.clear()
                now = time.perf_counter()
                speed = (self.iteration - it_last) / max(now - t_last, 1e-9)
                overall = (self.iteration - it_start) / max(now - t_start, 1e-9)
                t_last, it_last = now, self.iteration
                self.log.record({"iter": self.iteration, "loss": mean_loss, "lr": lrs, "it_s": speed})
                self.log.scalars(
                    self.iteration, {"train/loss": mean_loss, **{f"lr/{k}": v for k, v in lrs.items()}}
                )
                self.log.text(
                    f"iter {self.iteration}/{total} | {speed:.2f} it/s | loss {mean_loss:.5f} | "
                    f"lr {lrs.get('base', next(iter(lrs.values()))):.3e} | "
                    f"ETA {_eta((total - self.iteration) / max(overall, 1e-9))}"
                )

            names = []
            if val_every and (self.iteration % val_every == 0 or self.iteration == total):
                value = self.validate() if self.dist.is_main else None
                value = self.dist.gather_objects(value)[0]
                if value is not None:
                    self.log.record({"iter": self.iteration, "val_psnr": value})
                    self.log.scalars(self.iteration, {"val/psnr": value})
                    self.log.text(
                        f"iter {self.iteration}: validation PSNR ({self.cfg['val']['space']}) {value:.4f} dB"
                    )
                    if self.best["psnr"] is None or value > self.best["psnr"]:
                        self.best = {"psnr": value, "iteration": self.iteration}
                        names.append("best.pth")
            if (save_every and self.iteration % save_every == 0) or self.iteration == total:
                names.append("latest.pth")
            if keep_every and self.iteration % keep_every == 0:
                names.append(f"iter_{self.iteration}.pth")
            if names:
                self.save(names)
        self._finish()
        return {"iteration": self.iteration, "best": self.best, "work_dir": str(self.work_dir)}

    def _finish(self) -> None:
        # Cheap cross-rank consistency check: DDP must have kept the weights identical.
        checksum = float(sum(p.detach().double().sum().item() for p in self.model.parameters()))
        sums = self.dist.gather_objects(checksum)
        if self.dist.is_main:
            from .weights import save_vsrkit

            final = self.ema if self.ema is not None else self.model
            save_vsrkit(final, self.work_dir / "final.safetensors", arch=self.model.arch)
            self.log.record(
                {"iter": self.iteration, "event": "end", "rank_checksums": sums, "best": self.best}
            )
            if len(set(sums)) > 1:
                warnings.warn(f"weights differ across ranks: {sums}", stacklevel=2)
            self.log.text(
                f"done at iteration {self.iteration}; weights in {self.work_dir / 'final.safetensors'}"
            )
        self.log.close()
        self.dist.close()


def train(
    config: str | os.PathLike | dict[str, Any],
    work_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train from a config file (or an already loaded config dict) into ``work_dir``.

    A ``work_dir`` that holds a previous run (checkpoints, ``final.safetensors``, logs) is refused unless
    ``resume`` (continue it from ``checkpoints/latest.pth``) or ``overwrite`` (remove that run's files,
    see :data:`RUN_FILES`, and start afresh) is given.

    Returns ``{"iteration", "best", "work_dir"}``. Under ``torchrun`` every rank calls this.
    """
    if isinstance(config, dict):
        cfg = apply_overrides(_merge(DEFAULTS, config), overrides)
        check_config(cfg)
    else:
        cfg = load_config(config, overrides)
    return Trainer(cfg, work_dir, resume=resume, overwrite=overwrite).run()
