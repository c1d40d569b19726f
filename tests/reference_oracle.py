"""Load BasicSR 1.4.2's architecture files as a test oracle, without its package ``__init__``.

BasicSR's ``__init__`` imports a torchvision module that no longer exists, and its compiled
deformable-conv extension is not built. So the packages ``basicsr``, ``basicsr.archs`` and the
helpers the arch files import are replaced by small stand-ins, and the arch files themselves are
loaded from the installed package unchanged. The stand-in for ``basicsr.ops.dcn`` runs
``torchvision.ops.deform_conv2d``, which BasicSR itself uses whenever torchvision ≥ 0.9.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision
from torch import nn


@functools.cache
def _find_basicsr() -> Path | None:
    # Looked up once: later, sys.modules["basicsr"] may be a stand-in without a spec.
    spec = importlib.util.find_spec("basicsr")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def basicsr_root() -> Path:
    """The installed basicsr package's folder, or skip the test if basicsr is absent."""
    root = _find_basicsr()
    if root is None:
        pytest.skip("basicsr==1.4.2 is not installed (pip install --no-deps basicsr==1.4.2): no oracle")
    return root


def load_basicsr_file(relpath: str, module_name: str | None = None) -> types.ModuleType:
    """Execute one file of the installed basicsr (e.g. ``utils/matlab_functions.py``) as a
    module, without the package ``__init__``; its imports must already resolve."""
    path = basicsr_root() / relpath
    name = module_name or "_oracle_" + relpath.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _ModulatedDeformConv(nn.Module):
    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deformable_groups=1,
        bias=True,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.deformable_groups = groups, deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.uniform_(self.weight, -1 / math.sqrt(in_channels * 9), 1 / math.sqrt(in_channels * 9))


class _ModulatedDeformConvPack(_ModulatedDeformConv):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        k = self.kernel_size[0]
        self.conv_offset = nn.Conv2d(
            self.in_channels, self.deformable_groups * 3 * k * k, k, self.stride, self.padding, self.dilation
        )


def _modulated_deform_conv(x, offset, mask, weight, bias, stride, padding, dilation, groups, dg):
    return torchvision.ops.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)


def _install_stubs(root: Path) -> None:
    def package(name: str, path: Path | None = None) -> types.ModuleType:
        module = types.ModuleType(name)
        if path is not None:
            module.__path__ = [str(path)]
        sys.modules[name] = module
        return module

    package("basicsr", root)
    package("basicsr.archs", root / "archs")
    utils = package("basicsr.utils")
    utils.get_root_logger = lambda *a, **k: logging.getLogger("basicsr")
    registry = package("basicsr.utils.registry")

    class _Registry:
        def register(self, obj=None):
            return obj if obj is not None else (lambda o: o)

    registry.ARCH_REGISTRY = _Registry()
    package("basicsr.ops")
    dcn = package("basicsr.ops.dcn")
    dcn.ModulatedDeformConvPack = _ModulatedDeformConvPack
    dcn.modulated_deform_conv = _modulated_deform_conv


_CACHE: dict[str, types.ModuleType] = {}


def basicsr_arch(name: str) -> types.ModuleType:
    """``basicsr.archs.<name>`` (e.g. ``basicvsr_arch``), or skip the test if basicsr is absent."""
    if name in _CACHE:
        return _CACHE[name]
    root = basicsr_root()
    saved = {k: v for k, v in sys.modules.items() if k == "basicsr" or k.startswith("basicsr.")}
    try:
        _install_stubs(root)
        for dep in ("arch_util", "spynet_arch", "edvr_arch", "basicvsr_arch", "basicvsrpp_arch"):
            _CACHE[dep] = importlib.import_module(f"basicsr.archs.{dep}")
    finally:
        for k in [k for k in sys.modules if k == "basicsr" or k.startswith("basicsr.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return _CACHE[name]


def reference_basicvsrpp(**kwargs) -> nn.Module:
    """BasicSR's BasicVSR++ with its alignment modules built (BasicSR only builds them with CUDA)."""
    module = basicsr_arch("basicvsrpp_arch")
    with mock.patch.object(module.torch.cuda, "is_available", return_value=True):
        model = module.BasicVSRPlusPlus(**kwargs)
    return model
