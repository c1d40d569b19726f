"""The ``--model``, ``--weights`` and ``--set`` options every command that builds a model takes.

Choices and defaults come from the registry of families (:mod:`vsrkit.models.registry`), so
a new family appears in every command without an edit here.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import VsrkitError

SET_HELP = "model option (value parsed as YAML), e.g. --set num_blocks=10; repeatable"


def family_names() -> list[str]:
    """The names ``--model`` accepts."""
    from ..models import families

    return list(families())


def add_model_options(
    p: argparse.ArgumentParser,
    *,
    extra_models: tuple[str, ...] = (),
    required: bool = False,
    model_help: str | None = None,
    weights_help: str = "registered weights name (see `vsrkit weights`) or checkpoint file; "
    "default: the model's default weights",
) -> None:
    """Add ``--model`` (a family, or one of ``extra_models``), ``--weights`` and ``--set``."""
    from ..models import default_family

    names = [*extra_models, *family_names()]
    if required:
        p.add_argument("--model", required=True, metavar="|".join(names), help=model_help)
    else:
        default = default_family().name
        p.add_argument(
            "--model",
            type=_family_name,
            choices=names,
            help=model_help or f"architecture (default: the one of --weights, else {default})",
        )
    p.add_argument("--weights", metavar="NAME|PATH", help=weights_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help=SET_HELP)


def _family_name(text: str) -> str:
    """A family's name for ``text``, one of its aliases (``basicvsr++``); else ``text`` itself,
    which argparse then refuses naming the choices."""
    from ..models import get_family

    try:
        return get_family(text).name
    except VsrkitError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=flow"]`` → ``{"a": 1, "b": "flow"}``, each value read as a YAML scalar."""
    import yaml

    config: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise VsrkitError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise VsrkitError(f"--set {key}: cannot read {text!r} as a value") from None
        if isinstance(value, (dict, list)):
            raise VsrkitError(f"--set {key}: expected a single value, got {text!r}")
        config[key] = value
    return config
