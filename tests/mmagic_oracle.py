"""Load mmagic 1.2.0's RealBasicVSR and BasicVSR network files as a test oracle.

mmagic itself cannot be installed beside vsrkit (it pins mmcv/mmengine builds for other torch
versions), so its PyPI wheel is only downloaded (``pip download --no-deps mmagic==1.2.0``,
done by scripts/test.sh into ``.cache/wheels``) and the few files the networks need are read
from it unchanged: ``real_basicvsr_net.py``, ``basicvsr_net.py``, ``archs/sr_backbone.py``,
``archs/upsample.py`` and ``utils/flow_warp.py``. The packages around them and what they
import from mmengine and mmcv are replaced by small stand-ins (module base class, logger, a
registry that registers nothing, mmcv's ``ConvModule`` as conv + optional ReLU under the key
``conv``, mmagic's ``make_layer``).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
from torch import nn

MMAGIC_SPEC = "mmagic==1.2.0"
WHEEL_NAME = "mmagic-1.2.0-py2.py3-none-any.whl"
#: where scripts/test.sh puts the wheel; VSRKIT_TEST_WHEELS overrides it
WHEEL_DIR = Path(
    os.environ.get("VSRKIT_TEST_WHEELS", Path(__file__).resolve().parent.parent / ".cache" / "wheels")
)

#: the wheel's files that the oracle executes, unchanged
_MEMBERS = (
    "mmagic/models/editors/real_basicvsr/real_basicvsr_net.py",
    "mmagic/models/editors/basicvsr/basicvsr_net.py",
    "mmagic/models/archs/sr_backbone.py",
    "mmagic/models/archs/upsample.py",
    "mmagic/models/utils/flow_warp.py",
)


def mmagic_wheel() -> Path:
    """The mmagic 1.2.0 wheel: found in :data:`WHEEL_DIR`, else downloaded there.

    Without it the test is skipped on a developer's machine, but fails under CI (``CI`` set),
    where scripts/test.sh must have fetched it.
    """
    wheel = WHEEL_DIR / WHEEL_NAME
    if not wheel.is_file():
        WHEEL_DIR.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", MMAGIC_SPEC, "-d", str(WHEEL_DIR)]
        subprocess.run(cmd, capture_output=True, timeout=300, check=False)
    if not wheel.is_file():
        message = f"the oracle needs {WHEEL_NAME} in {WHEEL_DIR} (pip download --no-deps {MMAGIC_SPEC})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return wheel


class _ConvModule(nn.Module):
    """mmcv's ``ConvModule`` as SPyNet uses it: a conv (key ``conv``), then ReLU or nothing."""

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, norm_cfg=None, act_cfg=None
    ):
        super().__init__()
        assert norm_cfg is None and act_cfg in (None, {"type": "ReLU"})
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.activate = nn.ReLU() if act_cfg else nn.Identity()

    def forward(self, x):
        return self.activate(self.conv(x))


def _make_layer(block, num_blocks, **kwarg):
    return nn.Sequential(*(block(**kwarg) for _ in range(num_blocks)))


def _default_init_weights(module, scale=1):
    # The tests overwrite every weight; only the call has to exist.
    pass


class _Registry:
    def register_module(self, *args, **kwargs):
        return lambda cls: cls


def _install_stubs(root: Path) -> None:
    def module(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        if path is not None:
            mod.__path__ = [str(path)]
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    module(
        "mmengine", print_log=lambda *a, **k: None, MMLogger=types.SimpleNamespace(get_current_instance=None)
    )
    module("mmengine.model", BaseModule=nn.Module)
    module("mmengine.runner", load_checkpoint=None)
    module("mmcv")
    module("mmcv.cnn", ConvModule=_ConvModule)
    pkg = root / "mmagic"
    module("mmagic", pkg)
    module("mmagic.registry", MODELS=_Registry())
    module("mmagic.models", pkg / "models")
    module("mmagic.models.editors", pkg / "models" / "editors")
    module("mmagic.models.editors.basicvsr", pkg / "models" / "editors" / "basicvsr")
    module("mmagic.models.editors.real_basicvsr", pkg / "models" / "editors" / "real_basicvsr")
    utils = module(
        "mmagic.models.utils",
        pkg / "models" / "utils",
        make_layer=_make_layer,
        default_init_weights=_default_init_weights,
    )
    archs = module("mmagic.models.archs", pkg / "models" / "archs")
    utils.flow_warp = importlib.import_module("mmagic.models.utils.flow_warp").flow_warp
    archs.ResidualBlockNoBN = importlib.import_module("mmagic.models.archs.sr_backbone").ResidualBlockNoBN
    archs.PixelShufflePack = importlib.import_module("mmagic.models.archs.upsample").PixelShufflePack


_CACHE: dict[str, types.ModuleType] = {}


def mmagic_real_basicvsr(extract_to: Path) -> types.ModuleType:
    """mmagic's ``real_basicvsr_net`` module, its files read from the wheel into ``extract_to``."""
    if "real_basicvsr_net" in _CACHE:
        return _CACHE["real_basicvsr_net"]
    with zipfile.ZipFile(mmagic_wheel()) as wheel:
        for member in _MEMBERS:
            wheel.extract(member, extract_to)
    mine = ("mmagic", "mmengine", "mmcv")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in mine}
    try:
        _install_stubs(extract_to)
        _CACHE["real_basicvsr_net"] = importlib.import_module(
            "mmagic.models.editors.real_basicvsr.real_basicvsr_net"
        )
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in mine]:
            del sys.modules[k]
        sys.modules.update(saved)
    return _CACHE["real_basicvsr_net"]
