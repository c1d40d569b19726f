"""SPyNet (Ranjan & Black, 2017): the coarse-to-fine flow estimator of all three models."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.warp import flow_warp
from .blocks import conv_act
from .registry import HOLYWU_URL, MMAGIC_URL, gdrive, register_weights, weights_entry

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class SpyNetLevel(nn.Module):
    """One pyramid level: 5 convs 7×7, 8→32→64→32→16→2, ReLU between them."""

    def __init__(self) -> None:
        super().__init__()
        widths = (8, 32, 64, 32, 16, 2)
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(nn.Conv2d(widths[i], widths[i + 1], 7, 1, 3))
            if i < 4:
                layers.append(nn.ReLU(inplace=True))
        # Indices 0, 2, 4, 6, 8 hold the convs, as in BasicSR checkpoints.
        self.basic_module = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = self.basic_module[::2]
        for conv in convs[:-1]:
            x = conv_act(conv, x, "relu")
        return conv_act(convs[-1], x)


class SpyNet(nn.Module):
    """``spynet(ref, supp)`` is the flow (dx, dy) in pixels that warps ``supp`` onto ``ref``."""

    num_levels = 6

    def __init__(self) -> None:
        super().__init__()
        self.basic_module = nn.ModuleList(SpyNetLevel() for _ in range(self.num_levels))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def _pyramid(self, img: torch.Tensor) -> list[torch.Tensor]:
        levels = [(img - self.mean) / self.std]
        for _ in range(self.num_levels - 1):
            levels.append(F.avg_pool2d(levels[-1], kernel_size=2, stride=2, count_include_pad=False))
        return levels[::-1]

    def compute_flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        """Flow for inputs whose sides are multiples of 32."""
        refs, supps = self._pyramid(ref), self._pyramid(supp)
        n, _, h, w = refs[0].shape
        flow = refs[0].new_zeros(n, 2, h, w)
        for level in range(self.num_levels):
            if level == 0:
                flow_up = flow
            else:
                flow_up = F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=True) * 2.0
            warped = flow_warp(supps[level], flow_up, padding_mode="border")
            flow = flow_up + self.basic_module[level](torch.cat((refs[level], warped, flow_up), dim=1))
        return flow

    def forward(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        h, w = ref.shape[-2:]
        h_up, w_up = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
        # Always resampled, even when already a multiple of 32, as the references do.
        ref = F.interpolate(ref, size=(h_up, w_up), mode="bilinear", align_corners=False)
        supp = F.interpolate(supp, size=(h_up, w_up), mode="bilinear", align_corners=False)
        flow = F.interpolate(self.compute_flow(ref, supp), size=(h, w), mode="bilinear", align_corners=False)
        # Python scalars, not a tensor made of them: an exported graph keeps them symbolic.
        return torch.cat([flow[:, :1] * (w / w_up), flow[:, 1:] * (h / h_up)], dim=1)


# -- published weights ------------------------------------------------------------------------

register_weights(
    weights_entry(
        "spynet", "spynet", {}, "spynet_sintel_final-3d2a1287.pth", "basicsr",
        (gdrive("1VZz1cikwTRVX7zXoD247DB7n5Tj_LQpF"),), "Sintel final (SPyNet)", None, scale=1,
        sha256="3d2a1287666aa71752ebaedc06999212886ef476f77d691a1b0006107088e714",
        notes="BasicSR's SPyNet (flownet/spynet_sintel_final); used to initialise BasicVSR/IconVSR "
        "training. Holds the mean/std buffers.",
    ),
    weights_entry(
        "spynet_mmagic", "spynet", {}, "spynet_20210409-c6c1bd09.pth", "mmagic",
        (MMAGIC_URL + "basicvsr/spynet_20210409-c6c1bd09.pth", HOLYWU_URL + "spynet_20210409-c6c1bd09.pth"),
        "Sintel final (SPyNet)", None, scale=1,
        notes="mmagic's SPyNet for BasicVSR/IconVSR/BasicVSR++ training. Plain SPyNet keys without "
        "the 'generator.' prefix and without the mean/std buffers.",
    ),
)  # fmt: skip
