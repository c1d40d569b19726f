"""Issue #14: outside ``vsrkit.models`` nothing names an architecture; everything asks the registry.

The first test parses every module of vsrkit outside ``models/`` and every benchmark, and fails on
any string constant (docstrings included) that equals a registered family's name or alias. The
others check that what replaced the names works for every family: checkpoints in either layout
are recognised by the family whose model fits them, and the commands offer every family.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import vsrkit
from vsrkit.cli import main
from vsrkit.models import default_family, families
from vsrkit.models.registry import normalise_name
from vsrkit.weights import infer_family, mmagic_to_native, native_to_mmagic, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "vsrkit"


def _architecture_names() -> set[str]:
    names = set()
    for family in families().values():
        names.add(family.name)
        names.update(family.aliases)
        names.update(normalise_name(alias) for alias in family.aliases)
    return names


def _checked_files() -> list[Path]:
    inside = [p for p in PACKAGE.rglob("*.py") if (PACKAGE / "models") not in p.parents]
    return sorted(inside + list((REPO / "benchmarks").glob("*.py")))


def test_no_string_outside_models_is_an_architecture_name() -> None:
    names = _architecture_names()
    assert names, "no family is registered"
    found = []
    for path in _checked_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not found, "architecture names outside vsrkit/models (ask the registry):\n" + "\n".join(found)


def test_the_check_sees_a_name_where_one_is_written() -> None:
    # The check above must be able to fail: the same walk finds a comparison with a name.
    name = default_family().name
    tree = ast.parse(f"if arch == {name!r}:\n    pass\n")
    constants = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    assert name in constants and name in _architecture_names()


def _tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {"mid_channels": 8, "num_blocks": 1}
    if "edvr_channels" in vsrkit.model_config(arch):
        config["edvr_channels"] = 8
    return vsrkit.create_model(arch, **config)


@pytest.mark.parametrize("arch", list(families()))
def test_every_family_recognises_its_checkpoints_in_both_layouts(arch: str, tmp_path: Path) -> None:
    model = _tiny(arch)
    native = model.state_dict()
    found, config = infer_family(native)
    assert found == arch and config["mid_channels"] == 8
    # mmagic's layout: its renames, the EMA generator preferred, the discriminator ignored.
    mmagic = native_to_mmagic(native, arch)
    stale = {k: torch.zeros_like(v) for k, v in mmagic.items()}
    ema = {"generator_ema." + k.removeprefix("generator."): v for k, v in mmagic.items()}
    discriminator = {"discriminator.conv0.weight": torch.ones(4, 3, 3, 3), "step_counter": torch.ones(1)}
    path = tmp_path / "mmagic.pth"
    torch.save({"meta": {}, "state_dict": {**stale, **ema, **discriminator}}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.layout == "mmagic" and set(ckpt.state_dict) == set(native)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in native.items())
    loaded = vsrkit.create_model(checkpoint=path)
    assert loaded.arch == arch
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in native.items())


def test_generator_alone_is_read_when_there_is_no_ema() -> None:
    arch = default_family().name
    native = _tiny(arch).state_dict()
    counter = {"generator.step_counter": torch.ones(1)}  # mmagic's iteration count, not a weight
    plain = mmagic_to_native({**native_to_mmagic(native, arch), **counter}, arch)
    assert set(plain) == set(native) and all(torch.equal(plain[k], v) for k, v in native.items())


def test_commands_offer_every_family(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["upscale", "--help"], ["weights", "--help"], ["convert", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(command)
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert all(name in text for name in families()), command


def test_upscale_set_checks_model_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip = tmp_path / "in.mp4"
    clip.write_bytes(b"")  # never read: the options are refused first
    for option, needle in (("no_such_option=1", "no_such_option"), ("mid_channels=0", "mid_channels")):
        code = main(["upscale", str(clip), str(tmp_path / "out.mp4"), "--set", option])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("vsrkit: error: --set") and needle in err[0]
    assert not (tmp_path / "out.mp4").exists()
