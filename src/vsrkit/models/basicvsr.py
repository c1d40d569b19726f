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
from .registry import Family, register
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
    # Flows stay in fp32 under autocast: in bf16 a pixel offset at x≈300 is off by up to 1 px.
    with torch.autocast(lqs.device.type, enabled=False):
        return spynet(*pair).view(n, t - 1, 2, h, w)


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


FAMILY = register(
    Family(
        name="basicvsr", title="BasicVSR", builder=BasicVSR, is_default=True, default_weights="basicvsr_reds4"
    )
)
