"""IconVSR (Chan et al., CVPR 2021): BasicVSR plus information-refill and coupled propagation.

- *Information-refill*: at keyframes (every ``keyframe_stride`` frames, and the last frame), an
  EDVR-M feature of the frame and its ``temporal_padding`` neighbours on each side is fused
  into the propagated state by a 3×3 conv, after warping and before the residual blocks.
- *Coupled propagation*: the forward branch also takes the backward branch's output, and feeds
  the upsampling tail directly (no ``fusion`` conv).

Ablation switches: ``refill=False`` drops the EDVR-M module and the fusion convs;
``coupled=False`` gives BasicVSR's uncoupled branches and ``fusion``; ``keyframe_stride``
changes the keyframe spacing at inference (Fig. 10).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..memory import InferenceMemory
from ..ops.warp import flow_warp
from .base import StepInput, VSRModel, spynet_flow
from .basicvsr import PAPER_CONFIG, split_segments
from .blocks import (
    ConvResidualBlocks,
    add_upsample_tail,
    conv3x3,
    run_upsample_tail,
    upsample_tail_memory,
)
from .edvr import EDVRFeatureExtractor
from .registry import (
    BASICSR_SCORES_NOTE,
    MMAGIC_URL,
    TRUNK_MMAGIC_RULES,
    TRUNK_NATIVE_RULES,
    Family,
    Score,
    StateDict,
    WeightsEntry,
    count_blocks,
    gdrive,
    register,
    score_row,
    weights_entry,
)
from .spynet import SpyNet

# The references pad the EDVR-M window at the clip ends with these frames (not a mirror).
_TEMPORAL_PAD = {2: ([4, 3], [-4, -5]), 3: ([6, 5, 4], [-5, -6, -7])}


def keyframe_indices(num_frames: int, stride: int) -> list[int]:
    """Every ``stride``-th frame from 0, plus the last frame."""
    if stride <= 0:
        return []
    keys = list(range(0, num_frames, stride))
    if keys[-1] != num_frames - 1:
        keys.append(num_frames - 1)
    return keys


class IconVSR(VSRModel):
    #: The values each option with a fixed set accepts (checked before building, see ``vsrkit.models``).
    OPTION_CHOICES = {"temporal_padding": tuple(_TEMPORAL_PAD)}

    def __init__(
        self,
        mid_channels: int = 64,
        num_blocks: int = 30,
        keyframe_stride: int = 5,
        temporal_padding: int = 2,
        refill: bool = True,
        coupled: bool = True,
        num_segments: int = 1,
        edvr_channels: int = 64,
    ) -> None:
        super().__init__()
        if temporal_padding not in _TEMPORAL_PAD:
            raise ValueError(f"temporal_padding must be 2 (REDS) or 3 (Vimeo-90K), got {temporal_padding}")
        self.mid_channels = mid_channels
        self.edvr_channels = edvr_channels
        self.keyframe_stride = keyframe_stride
        self.temporal_padding = temporal_padding
        self.refill = refill
        self.coupled = coupled
        self.num_segments = num_segments
        c = mid_channels
        self.spynet = SpyNet()
        if refill:
            self.edvr = EDVRFeatureExtractor(2 * temporal_padding + 1, edvr_channels)
            self.backward_fusion = conv3x3(c + edvr_channels, c)
            self.forward_fusion = conv3x3(c + edvr_channels, c)
        self.backward_trunk = ConvResidualBlocks(c + 3, c, num_blocks)
        self.forward_trunk = ConvResidualBlocks((2 * c if coupled else c) + 3, c, num_blocks)
        if not coupled:
            self.fusion = nn.Conv2d(2 * c, c, 1)
        add_upsample_tail(self, c)

    #: PCD's two stride-2 levels need sides that are multiples of 4.
    pad_multiple = 4

    @property
    def keyframe_reach(self) -> int:
        """The frames the EDVR-M windows read around a frame (with the references' end padding)."""
        return 2 * self.temporal_padding + 2

    @property
    def min_frames(self) -> int:
        """The EDVR-M window's end padding reads frame ``2p``: clips need ``2p + 1`` frames."""
        return 2 * self.temporal_padding + 1 if self.refill else 1

    def inference_memory(self, height: int, width: int, element_size: int = 4) -> InferenceMemory:
        """Memory of streaming one (height, width) LR tile (see :class:`InferenceMemory`)."""
        pixels = height * width
        c, e = self.mid_channels, self.edvr_channels
        trunk = (6 * c + 6) * element_size * pixels + 8 * pixels
        # EDVR-M at a keyframe: PCD's deformable convs (9 samples per channel) and TSA's stack of
        # 2p+1 aligned features; measured at about 66 maps of edvr_channels at 64 channels.
        edvr = 70 * e * element_size * pixels if self.refill else 0
        step = max(trunk, edvr + upsample_tail_memory(height, width))
        # Kept for the pass: the frame pyramids of a keyframe window (levels 1 + 1/4 + 1/16) and
        # the refill features in flight.
        windows = (2 * self.temporal_padding + 1 + self.keyframe_stride) if self.refill else 0
        clip_state = int(windows * e * element_size * pixels * 1.34) + (2 * e * element_size * pixels)
        return InferenceMemory(step=step, frame_state=c * element_size * pixels, clip_state=clip_state)

    # -- steps ---------------------------------------------------------------------------
    def flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        return spynet_flow(self.spynet, ref, supp)

    def keyframes(self, num_frames: int) -> list[int]:
        return keyframe_indices(num_frames, self.keyframe_stride) if self.refill else []

    def keyframe_window(self, index: int, num_frames: int) -> list[int]:
        """Frame indices of the EDVR-M input for keyframe ``index`` (centre in the middle)."""
        before, after = _TEMPORAL_PAD[self.temporal_padding]
        p = self.temporal_padding
        padded = [num_frames + k if k < 0 else k for k in before]
        padded += list(range(num_frames))
        padded += [num_frames + k for k in after]
        return padded[index : index + 2 * p + 1]

    def keyframe_feature(self, window_frames: torch.Tensor) -> torch.Tensor:
        """EDVR-M feature from (N, 2p+1, 3, H, W) frames (H, W multiples of 4)."""
        return self.edvr(window_frames)

    def keyframe_features(self, num_frames: int, order: Sequence[int] | None = None) -> KeyframeFeatures:
        """The keyframes' EDVR-M features, visited in ``order`` (default: ascending), each
        frame's pyramid computed once for the windows that share it."""
        return KeyframeFeatures(self, num_frames, self.keyframes(num_frames) if order is None else order)

    def _propagate_step(
        self,
        trunk: nn.Module,
        fusion: nn.Module | None,
        lq: torch.Tensor,
        feat: torch.Tensor | None,
        flow: torch.Tensor | None,
        refill: torch.Tensor | None,
        coupled_feat: torch.Tensor | None,
    ) -> torch.Tensor:
        if feat is None:
            n, _, h, w = lq.shape
            feat = lq.new_zeros(n, self.mid_channels, h, w)
        elif flow is not None:
            feat = flow_warp(feat, flow)
        if refill is not None:
            feat = fusion(torch.cat([feat, refill], dim=1))
        inputs = [lq, feat] if coupled_feat is None else [lq, coupled_feat, feat]
        return trunk(torch.cat(inputs, dim=1))

    def backward_step(self, x: StepInput, feat: torch.Tensor | None) -> torch.Tensor:
        """One backward step; ``x.keyframe`` is the refill feature at keyframes."""
        fusion = self.backward_fusion if self.refill else None
        return self._propagate_step(self.backward_trunk, fusion, x.lq, feat, x.flow, x.keyframe, None)

    def forward_step(
        self, x: StepInput, feat: torch.Tensor | None, backward_feat: torch.Tensor | None
    ) -> torch.Tensor:
        """One forward step; coupled, it also takes this frame's backward state."""
        fusion = self.forward_fusion if self.refill else None
        coupled = backward_feat if self.coupled else None
        return self._propagate_step(self.forward_trunk, fusion, x.lq, feat, x.flow, x.keyframe, coupled)

    def reconstruct(
        self, lq: torch.Tensor, forward_feat: torch.Tensor, backward_feat: torch.Tensor
    ) -> torch.Tensor:
        if self.coupled:
            feat = forward_feat
        else:
            feat = F.leaky_relu(self.fusion(torch.cat([backward_feat, forward_feat], dim=1)), 0.1)
        return run_upsample_tail(self, feat, lq)

    # -- whole clip ----------------------------------------------------------------------
    def forward(self, lqs: torch.Tensor) -> torch.Tensor:
        """(N, T, 3, H, W) in [0, 1] → (N, T, 3, 4H, 4W); T ≥ 2·temporal_padding + 1."""
        parts = split_segments(lqs.shape[1], self.num_segments)
        return torch.cat([self._forward_clip(lqs[:, p.start : p.stop]) for p in parts], dim=1)

    def _forward_clip(self, lqs: torch.Tensor) -> torch.Tensor:
        t = lqs.shape[1]
        if t < self.min_frames:
            raise ValueError(
                f"IconVSR with temporal_padding={self.temporal_padding} needs at least "
                f"{self.min_frames} frames, got {t}"
            )
        return self.propagate_clip(lqs)


class KeyframeFeatures:
    """IconVSR's keyframe features, each frame's EDVR-M pyramid computed once.

    Keyframe windows share frames: at the clip's ends (the references pad the window with
    frames that the neighbouring windows also read) and, with ``temporal_padding=3``, between
    every pair of neighbours (7-frame windows, 5 frames apart). A pyramid is kept until the
    last keyframe in ``order`` that reads it; windows are local, so only a few are held at once.
    The feature equals :meth:`IconVSR.keyframe_feature` of the stacked window, to the rounding
    of a conv's batch size.
    """

    def __init__(self, model: IconVSR, num_frames: int, order: Sequence[int]) -> None:
        self.model = model
        self.num_frames = num_frames
        self._position = {key: pos for pos, key in enumerate(order)}
        self._last_use = {
            j: pos for pos, key in enumerate(order) for j in model.keyframe_window(key, num_frames)
        }
        self._pyramids: dict[int, list[torch.Tensor]] = {}

    def __call__(self, key: int, frame: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """The feature of keyframe ``key``; ``frame(j)`` gives frame ``j`` as (N, 3, H, W)."""
        window = self.model.keyframe_window(key, self.num_frames)
        missing = [j for j in dict.fromkeys(window) if j not in self._pyramids]
        if missing:
            frames = [frame(j) for j in missing]
            n = frames[0].shape[0]
            batch = torch.cat(frames, dim=0)  # frame-major: (len * N, 3, H, W)
            levels = self.model.edvr.pyramid(batch)
            for m, j in enumerate(missing):
                self._pyramids[j] = [level[m * n : (m + 1) * n] for level in levels]
        feature = self.model.edvr.align_and_fuse([self._pyramids[j] for j in window])
        # Drop the pyramids that no later key in `order` reads.
        done = self._position.get(key, -1)
        self._pyramids = {j: p for j, p in self._pyramids.items() if self._last_use.get(j, -1) > done}
        return feature


# -- published weights ------------------------------------------------------------------------

# mmagic's retest of its released checkpoints, one row per checkpoint.
_MM_SCORES: dict[str, dict[str, Score]] = {
    "iconvsr_reds4": score_row(
        (31.6926, 0.8951), (36.4983, 0.9416), (27.4809, 0.8354),
        (35.3377, 0.9471), (34.4299, 0.9287), (25.2110, 0.7732),
    ),
    "iconvsr_vimeo90k_bi": score_row(
        (30.3452, 0.8659), (37.3729, 0.9467), (27.4238, 0.8297),
        (34.2595, 0.9398), (34.5548, 0.9295), (24.6666, 0.7491),
    ),
    "iconvsr_vimeo90k_bd": score_row(
        (29.0150, 0.8465), (34.6780, 0.9339), (26.3109, 0.8028),
        (40.0640, 0.9697), (37.7573, 0.9517), (28.2464, 0.8612),
    ),
}  # fmt: skip

# Table 2 of the BasicVSR/IconVSR paper: each model on the test sets of its own degradation.
_PAPER: dict[str, dict[str, Score]] = {
    "iconvsr_reds4": {"REDS4 BI": (31.67, 0.8948)},
    "iconvsr_vimeo90k_bi": {"Vimeo-90K-T BI": (37.47, 0.9476), "Vid4 BI": (27.39, 0.8279)},
    "iconvsr_vimeo90k_bd": {
        "UDM10 BD": (40.03, 0.9694),
        "Vimeo-90K-T BD": (37.84, 0.9524),
        "Vid4 BD": (28.04, 0.8570),
    },
}

_RETRAINED_NOTE = (
    "The released IconVSR weights were retrained after the paper; expect +-0.1-0.2 dB against paper_scores."
)

_WEIGHTS: list[WeightsEntry] = []
# BasicSR's files (Google Drive only). The full digests come from a third-party model registry
# that mirrors these exact files; each starts with BasicSR's own prefix.
for _name, _fname, _gid, _sha, _data, _deg, _pad in (
    ("iconvsr_reds4", "IconVSR_REDS-aaa5367f.pth", "1b8ir754uIAFUSJ8YW_cmPzqer19AR7Hz",
     "aaa5367f64c6fc1e5839e13d65e596fc012608f0d22b02477324e6fe4edf99ad", "REDS", "BI", 2),
    ("iconvsr_vimeo90k_bi", "IconVSR_Vimeo90K_BIx4-35fec07c.pth", "1lWUB36ERjFbAspr-8UsopJ6xwOuWjh2g",
     "35fec07c2bc278e2b9f7180cf6d2aada49d6ed216da09803235ffd07de561771", "Vimeo-90K", "BI", 3),
    ("iconvsr_vimeo90k_bd", "IconVSR_Vimeo90K_BDx4-cfcb7e00.pth", "13lp55s-YTd-fApx8tTy24bbHsNIGXdAH",
     "cfcb7e002dbd89b5e0e3c06c122da033e21d43698a6a819c22f9ab3cf4c91dcd", "Vimeo-90K", "BD", 3),
):  # fmt: skip
    _WEIGHTS.append(
        weights_entry(
            _name, "iconvsr", {**PAPER_CONFIG, "temporal_padding": _pad}, _fname, "basicsr",
            (gdrive(_gid),), _data, _deg, sha256=_sha, scores=_MM_SCORES[_name],
            paper_scores=_PAPER[_name],
            notes="Official BasicSR release (Google Drive only). " + BASICSR_SCORES_NOTE + " "
            + _RETRAINED_NOTE,
        )
    )  # fmt: skip
# mmagic / MMEditing's files. Only the name's digest prefix is known.
for _name, _rel, _data, _deg, _pad in (
    ("iconvsr_reds4", "iconvsr/iconvsr_reds4_20210413-9e09d621.pth", "REDS", "BI", 2),
    ("iconvsr_vimeo90k_bi", "iconvsr/iconvsr_vimeo90k_bi_20210413-7c7418dc.pth", "Vimeo-90K", "BI", 3),
    ("iconvsr_vimeo90k_bd", "iconvsr/iconvsr_vimeo90k_bd_20210414-5f38cb34.pth", "Vimeo-90K", "BD", 3),
):
    _WEIGHTS.append(
        weights_entry(
            f"{_name}_mmagic", "iconvsr", {**PAPER_CONFIG, "temporal_padding": _pad},
            _rel.rsplit("/", 1)[1], "mmagic", (MMAGIC_URL + _rel,), _data, _deg,
            scores=_MM_SCORES[_name], paper_scores=_PAPER[_name],
            notes="Official mmagic/MMEditing release. " + _RETRAINED_NOTE,
        )
    )  # fmt: skip


def infer_config(sd: StateDict) -> dict[str, object] | None:
    """The options that give this native state dict's shapes, if it can be an IconVSR's."""
    trunk = sd.get("forward_trunk.main.0.weight")
    if trunk is None:
        return None
    blocks = count_blocks(sd, "forward_trunk.")
    config: dict[str, object] = {"mid_channels": trunk.shape[0], "num_blocks": blocks}
    if "edvr.fusion.feat_fusion.weight" in sd and "edvr.conv_first.weight" in sd:
        edvr_channels = sd["edvr.conv_first.weight"].shape[0]
        num_frames = sd["edvr.fusion.feat_fusion.weight"].shape[1] // max(edvr_channels, 1)
        config["temporal_padding"] = (num_frames - 1) // 2
        config["edvr_channels"] = edvr_channels
    else:
        config["refill"] = False
    if "fusion.weight" in sd:
        config["coupled"] = False
    return config


FAMILY = register(
    Family(
        name="iconvsr",
        title="IconVSR",
        builder=IconVSR,
        weights=tuple(_WEIGHTS),
        default_weights="iconvsr_reds4",
        infer_config=infer_config,
        mmagic_key_rules=TRUNK_MMAGIC_RULES,
        native_key_rules=TRUNK_NATIVE_RULES,
    )
)
