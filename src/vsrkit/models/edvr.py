"""EDVR-M's feature extractor (Wang et al., 2019), IconVSR's information-refill module.

Pyramid features → PCD alignment (pyramid, cascading, deformable) of each neighbour onto the
centre frame → TSA fusion (temporal and spatial attention). No reconstruction trunk: the output
is a C-channel feature of the centre frame. Key names follow BasicSR.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.deform_conv import deform_conv2d_from_logits
from .blocks import ResidualBlockNoBN, conv3x3, conv_act
from .registry import MMAGIC_URL, gdrive, register_weights, weights_entry


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.1)


def _conv_lrelu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``leaky_relu(conv(x), 0.1)``, fused into the conv on prepared CPU models."""
    return conv_act(conv, x, "leaky_relu", 0.1)


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class DCNv2Pack(nn.Module):
    """Modulated deformable conv whose offsets and masks come from a separate feature.

    ``conv_offset`` yields ``3·G·9`` channels: the first two thirds are the offsets, used raw,
    the last third the masks, through a sigmoid.
    """

    def __init__(self, channels: int = 64, deform_groups: int = 8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.conv_offset = conv3x3(channels, deform_groups * 3 * 9)
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        # offset = the first two thirds of conv_offset(feat), mask = sigmoid(the last third).
        return deform_conv2d_from_logits(x, self.conv_offset(feat), self.weight, self.bias, padding=1)


class PCDAlignment(nn.Module):
    def __init__(self, channels: int = 64, deform_groups: int = 8) -> None:
        super().__init__()
        self.offset_conv1 = nn.ModuleDict()
        self.offset_conv2 = nn.ModuleDict()
        self.offset_conv3 = nn.ModuleDict()
        self.dcn_pack = nn.ModuleDict()
        self.feat_conv = nn.ModuleDict()
        for i in (3, 2, 1):
            level = f"l{i}"
            self.offset_conv1[level] = conv3x3(channels * 2, channels)
            if i == 3:
                self.offset_conv2[level] = conv3x3(channels, channels)
            else:
                self.offset_conv2[level] = conv3x3(channels * 2, channels)
                self.offset_conv3[level] = conv3x3(channels, channels)
            self.dcn_pack[level] = DCNv2Pack(channels, deform_groups)
            if i < 3:
                self.feat_conv[level] = conv3x3(channels * 2, channels)
        self.cas_offset_conv1 = conv3x3(channels * 2, channels)
        self.cas_offset_conv2 = conv3x3(channels, channels)
        self.cas_dcnpack = DCNv2Pack(channels, deform_groups)

    def forward(self, neighbour: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
        """Align a neighbour's 3-level pyramid (finest first) onto the reference's."""
        up_offset = up_feat = None
        for i in (3, 2, 1):
            level = f"l{i}"
            pair = torch.cat([neighbour[i - 1], reference[i - 1]], dim=1)
            offset = _conv_lrelu(self.offset_conv1[level], pair)
            if i == 3:
                offset = _conv_lrelu(self.offset_conv2[level], offset)
            else:
                offset = _conv_lrelu(self.offset_conv2[level], torch.cat([offset, up_offset], dim=1))
                offset = _conv_lrelu(self.offset_conv3[level], offset)
            feat = self.dcn_pack[level](neighbour[i - 1], offset)
            if i < 3:
                feat = self.feat_conv[level](torch.cat([feat, up_feat], dim=1))
            if i > 1:
                feat = _lrelu(feat)
                # Offsets are in pixels of their level: doubling the resolution doubles them.
                up_offset = _upsample2(offset) * 2
                up_feat = _upsample2(feat)
        offset = _conv_lrelu(self.cas_offset_conv1, torch.cat([feat, reference[0]], dim=1))
        offset = _conv_lrelu(self.cas_offset_conv2, offset)
        return _lrelu(self.cas_dcnpack(feat, offset))


class TSAFusion(nn.Module):
    def __init__(self, channels: int = 64, num_frames: int = 5, center: int = 2) -> None:
        super().__init__()
        self.center = center
        c = channels
        self.temporal_attn1 = conv3x3(c, c)
        self.temporal_attn2 = conv3x3(c, c)
        self.feat_fusion = nn.Conv2d(num_frames * c, c, 1)
        self.spatial_attn1 = nn.Conv2d(num_frames * c, c, 1)
        self.spatial_attn2 = nn.Conv2d(c * 2, c, 1)
        self.spatial_attn3 = conv3x3(c, c)
        self.spatial_attn4 = nn.Conv2d(c, c, 1)
        self.spatial_attn5 = conv3x3(c, c)
        self.spatial_attn_l1 = nn.Conv2d(c, c, 1)
        self.spatial_attn_l2 = conv3x3(c * 2, c)
        self.spatial_attn_l3 = conv3x3(c, c)
        self.spatial_attn_add1 = nn.Conv2d(c, c, 1)
        self.spatial_attn_add2 = nn.Conv2d(c, c, 1)

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.max_pool2d(x, 3, 2, 1), F.avg_pool2d(x, 3, 2, 1, count_include_pad=True)], dim=1)

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        """(N, T, C, H, W) aligned features → (N, C, H, W)."""
        n, t, c, h, w = aligned.shape
        embedding_ref = self.temporal_attn1(aligned[:, self.center])
        embedding = self.temporal_attn2(aligned.reshape(-1, c, h, w)).view(n, t, c, h, w)
        # Each frame is weighted per pixel by its embedding's correlation with the centre's.
        corr = torch.sigmoid((embedding * embedding_ref.unsqueeze(1)).sum(dim=2))  # (N, T, H, W)
        weighted = (aligned * corr.unsqueeze(2)).reshape(n, t * c, h, w)

        feat = _conv_lrelu(self.feat_fusion, weighted)
        attn = _conv_lrelu(self.spatial_attn1, weighted)
        attn = _conv_lrelu(self.spatial_attn2, self._pool(attn))
        attn_level = _conv_lrelu(self.spatial_attn_l1, attn)
        attn_level = _conv_lrelu(self.spatial_attn_l2, self._pool(attn_level))
        attn_level = _upsample2(_conv_lrelu(self.spatial_attn_l3, attn_level))
        attn = _conv_lrelu(self.spatial_attn3, attn) + attn_level
        attn = _upsample2(_conv_lrelu(self.spatial_attn4, attn))
        attn = self.spatial_attn5(attn)
        attn_add = self.spatial_attn_add2(_conv_lrelu(self.spatial_attn_add1, attn))
        return feat * torch.sigmoid(attn) * 2 + attn_add


class EDVRFeatureExtractor(nn.Module):
    """EDVR-M up to its fusion: (N, T, 3, H, W) with T = 2p+1 → feature of the centre frame.

    H and W must be multiples of 4 (two stride-2 pyramid levels).
    """

    def __init__(self, num_frames: int = 5, channels: int = 64, deform_groups: int = 8) -> None:
        super().__init__()
        self.center = num_frames // 2
        self.conv_first = conv3x3(3, channels)
        self.feature_extraction = nn.Sequential(*(ResidualBlockNoBN(channels) for _ in range(5)))
        self.conv_l2_1 = conv3x3(channels, channels, stride=2)
        self.conv_l2_2 = conv3x3(channels, channels)
        self.conv_l3_1 = conv3x3(channels, channels, stride=2)
        self.conv_l3_2 = conv3x3(channels, channels)
        self.pcd_align = PCDAlignment(channels, deform_groups)
        self.fusion = TSAFusion(channels, num_frames, self.center)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        n, t, c, h, w = frames.shape
        levels = [level.view(n, t, *level.shape[1:]) for level in self.pyramid(frames.reshape(-1, c, h, w))]
        return self.align_and_fuse([[level[:, i] for level in levels] for i in range(t)])

    def pyramid(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) frames → their 3-level feature pyramids, finest first (each frame's own).

        A frame's pyramid does not depend on the window it is in: IconVSR computes it once for
        the keyframe windows that share the frame.
        """
        l1 = self.feature_extraction(_conv_lrelu(self.conv_first, frames))
        l2 = _conv_lrelu(self.conv_l2_2, _conv_lrelu(self.conv_l2_1, l1))
        l3 = _conv_lrelu(self.conv_l3_2, _conv_lrelu(self.conv_l3_1, l2))
        return [l1, l2, l3]

    def align_and_fuse(self, pyramids: list[list[torch.Tensor]]) -> torch.Tensor:
        """The window's T pyramids (each finest first, levels (N, C, h, w)) → (N, C, H, W)."""
        reference = pyramids[self.center]
        aligned = [self.pcd_align(pyramid, reference) for pyramid in pyramids]
        return self.fusion(torch.stack(aligned, dim=1))


# -- published weights: the EDVR-M feature extractors of IconVSR -------------------------------

for _name, _fname, _gid, _sha, _data, _frames in (
    ("edvrm_reds", "EDVR_REDS_pretrained_for_IconVSR-f62a2f1e.pth", "1ShfwddugTmT3_kB8VL6KpCMrIpEO5sBi",
     "f62a2f1ea25dfa0d38d82b58beef3888edcc5433b8d39ae599bc4e1d1b261e15", "REDS", 5),
    ("edvrm_vimeo90k", "EDVR_Vimeo90K_pretrained_for_IconVSR-ee48ee92.pth",
     "16vR262NDVyVv5Q49xp2Sb-Llu05f63tt",
     "ee48ee9240055f86a1c55cf3fbe8d7802bf017409fda9f9ea2ca09cfb57bcfe7", "Vimeo-90K", 7),
):  # fmt: skip
    register_weights(
        weights_entry(
            _name, "edvrm", {"num_frames": _frames}, _fname, "basicsr", (gdrive(_gid),), _data, None,
            scale=1, sha256=_sha,
            notes=f"BasicSR's EDVR-M feature extractor for IconVSR ({_frames} frames); initialises "
            "IconVSR training.",
        )
    )  # fmt: skip
for _name, _fname, _data, _frames in (
    ("edvrm_reds_mmagic", "edvrm_reds_20210413-3867262f.pth", "REDS", 5),
    ("edvrm_vimeo90k_mmagic", "edvrm_vimeo90k_20210413-e40e99a8.pth", "Vimeo-90K", 7),
):
    register_weights(
        weights_entry(
            _name, "edvrm", {"num_frames": _frames}, _fname, "mmagic", (MMAGIC_URL + "iconvsr/" + _fname,),
            _data, None, scale=1,
            notes=f"mmagic's EDVR-M for IconVSR ({_frames} frames); initialises IconVSR training.",
        )
    )  # fmt: skip
