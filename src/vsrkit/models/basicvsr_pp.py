"""BasicVSR++ (Chan et al., CVPR 2022): second-order grid propagation, flow-guided deformable alignment.

Four propagation branches run in the order backward_1, forward_1, backward_2, forward_2; each
sees the frame's spatial feature and the outputs of all earlier branches. Each step aligns the
state of the previous frame (and, second order, of the frame before it) with a modulated
deformable conv whose offsets are residuals on top of the optical flow.

Ablation switches: ``second_order=False`` zeroes the second-order inputs (same weights);
``alignment="flow"`` replaces the deformable alignment by plain flow warping (no
``deform_align`` weights).

Small frames: SPyNet's flows here need LR sides of at least 64 px (the references assert it);
smaller clips are replicate-padded to 64 and the output cropped back.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..memory import InferenceMemory
from ..ops.deform_conv import deform_conv2d_from_logits
from ..ops.warp import flow_warp
from .base import VSRModel, pad_to_multiple, spynet_flow
from .basicvsr import pairwise_flows
from .blocks import (
    ConvResidualBlocks,
    add_upsample_tail,
    conv3x3,
    conv_act,
    is_exporting,
    run_upsample_tail,
    upsample_tail_memory,
)
from .registry import Family, register
from .spynet import SpyNet

BRANCHES = ("backward_1", "forward_1", "backward_2", "forward_2")
MIN_FLOW_SIZE = 64


class SecondOrderDeformableAlignment(nn.Module):
    """Modulated DCN (2C → C, 3×3, 16 groups) with offsets = flow + bounded learnt residual."""

    def __init__(
        self, channels: int = 64, deform_groups: int = 16, max_residue_magnitude: float = 10
    ) -> None:
        super().__init__()
        self.max_residue_magnitude = max_residue_magnitude
        self.weight = nn.Parameter(torch.empty(channels, 2 * channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.conv_offset = nn.Sequential(
            conv3x3(3 * channels + 4, channels),
            nn.LeakyReLU(0.1, inplace=True),
            conv3x3(channels, channels),
            nn.LeakyReLU(0.1, inplace=True),
            conv3x3(channels, channels),
            nn.LeakyReLU(0.1, inplace=True),
            conv3x3(channels, 27 * deform_groups),
        )
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        # Zero residuals at the start of training: alignment begins as pure flow warping.
        nn.init.zeros_(self.conv_offset[-1].weight)
        nn.init.zeros_(self.conv_offset[-1].bias)

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor, flow_1: torch.Tensor, flow_2: torch.Tensor
    ) -> torch.Tensor:
        out = torch.cat([condition, flow_1.to(condition.dtype), flow_2.to(condition.dtype)], 1)
        convs = self.conv_offset[::2]
        for conv in convs[:-1]:
            out = conv_act(conv, out, "leaky_relu", 0.1)
        out = conv_act(convs[-1], out)
        # offset = max_residue_magnitude * tanh(the first two thirds of out) + the flows as
        # (dy, dx), flow_1 for the first half of the deform groups (the previous frame's state),
        # flow_2 for the second; mask = sigmoid(the last third).
        return deform_conv2d_from_logits(
            x,
            out,
            self.weight,
            self.bias,
            padding=1,
            offset_scale=self.max_residue_magnitude,
            flows=(flow_1, flow_2),
        )


class BasicVSRPlusPlus(VSRModel):
    #: The values each text option accepts (checked before building, see ``vsrkit.models``).
    OPTION_CHOICES = {"alignment": ("deformable", "flow")}
    #: Four interleaved branches have no cheap exact per-frame decomposition: the engine runs
    #: :meth:`forward` on overlapping windows of frames.
    streams_exactly = False

    def __init__(
        self,
        mid_channels: int = 64,
        num_blocks: int = 7,
        max_residue_magnitude: float = 10,
        is_low_res_input: bool = True,
        second_order: bool = True,
        alignment: str = "deformable",
    ) -> None:
        super().__init__()
        if alignment not in self.OPTION_CHOICES["alignment"]:
            raise ValueError(f"alignment must be 'deformable' or 'flow', got {alignment!r}")
        self.mid_channels = mid_channels
        self.is_low_res_input = is_low_res_input
        self.second_order = second_order
        self.alignment = alignment
        c = mid_channels
        self.spynet = SpyNet()
        if is_low_res_input:
            self.feat_extract = ConvResidualBlocks(3, c, 5)
        else:
            self.feat_extract = nn.Sequential(
                conv3x3(3, c, stride=2),
                nn.LeakyReLU(0.1, inplace=True),
                conv3x3(c, c, stride=2),
                nn.LeakyReLU(0.1, inplace=True),
                ConvResidualBlocks(c, c, 5),
            )
        if alignment == "deformable":
            self.deform_align = nn.ModuleDict(
                {name: SecondOrderDeformableAlignment(c, 16, max_residue_magnitude) for name in BRANCHES}
            )
        self.backbone = nn.ModuleDict(
            {name: ConvResidualBlocks((2 + i) * c, c, num_blocks) for i, name in enumerate(BRANCHES)}
        )
        self.reconstruction = ConvResidualBlocks(5 * c, c, 5)
        add_upsample_tail(self, c)

    @property
    def scale(self) -> int:
        return 4 if self.is_low_res_input else 1

    @property
    def pad_multiple(self) -> int:
        """Same-size input is downsampled ×4 by strided convs: tiles are multiples of 4."""
        return 1 if self.is_low_res_input else 4

    def flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        return spynet_flow(self.spynet, ref, supp)

    def inference_memory(self, height: int, width: int, element_size: int = 4) -> InferenceMemory:
        """Memory of a window forward on one (height, width) LR tile, per frame of the window."""
        if not self.is_low_res_input:
            height, width = max(height // 4, 1), max(width // 4, 1)
        h, w = max(height, MIN_FLOW_SIZE), max(width, MIN_FLOW_SIZE)
        pixels = h * w
        c = self.mid_channels
        # Kept per frame: the spatial feature and the four branches' outputs, two flows, and the
        # HR output (in the list and in the stacked result).
        frame_state = 5 * c * element_size * pixels + 4 * 4 * pixels + 2 * 48 * 4 * pixels
        # A step: the deformable alignment's im2col (2C channels × 9 samples) and its offsets
        # and masks (27 per deform group), or the ×4 tail.
        dcn = (2 * c * 9 + 27 * 16 * 2 + 6 * c) * element_size * pixels
        return InferenceMemory(step=max(dcn, upsample_tail_memory(h, w)), frame_state=frame_state)

    @staticmethod
    def is_mirror_extended(lqs: torch.Tensor) -> bool:
        """True for clips whose second half is the first half reversed (Vimeo-90K testing)."""
        t = lqs.shape[1]
        if t % 2:
            return False
        return bool(torch.equal(lqs[:, : t // 2], lqs[:, t // 2 :].flip(1)))

    def _align(
        self,
        name: str,
        state: torch.Tensor,
        state_n2: torch.Tensor | None,
        flows: torch.Tensor,
        step: int,
        flow_index: list[int],
        spatial: torch.Tensor,
    ) -> torch.Tensor:
        flow_n1 = flows[:, flow_index[step]]
        cond_n1 = flow_warp(state, flow_n1)
        if self.alignment == "flow":
            return cond_n1
        if state_n2 is not None and self.second_order:
            # Compose the two one-frame flows into one that reaches two frames back.
            flow_n2 = flow_n1 + flow_warp(flows[:, flow_index[step - 1]], flow_n1)
            cond_n2 = flow_warp(state_n2, flow_n2)
        else:
            state_n2 = torch.zeros_like(state)
            flow_n2 = torch.zeros_like(flow_n1)
            cond_n2 = torch.zeros_like(cond_n1)
        condition = torch.cat([cond_n1, spatial, cond_n2], dim=1)
        return self.deform_align[name](torch.cat([state, state_n2], dim=1), condition, flow_n1, flow_n2)

    def propagate(self, feats: dict[str, list[torch.Tensor]], flows: torch.Tensor, name: str) -> None:
        """Run branch ``name`` over the clip, appending its per-frame outputs to ``feats[name]``."""
        t = len(feats["spatial"])
        frames = list(range(t))
        # flow_index[k]: the flow that brings step k-1's frame onto step k's frame.
        flow_index = [-1, *range(t - 1)]
        if name.startswith("backward"):
            frames = frames[::-1]
            flow_index = frames
        earlier = [k for k in feats if k not in ("spatial", name)]
        outputs: list[torch.Tensor] = []
        state = None
        for step, idx in enumerate(frames):
            spatial = feats["spatial"][idx]
            if state is None:
                state = torch.zeros_like(spatial)
            else:
                state_n2 = outputs[-2] if step > 1 else None
                state = self._align(name, state, state_n2, flows, step, flow_index, spatial)
            branch_input = torch.cat([spatial, *(feats[k][idx] for k in earlier), state], dim=1)
            state = state + self.backbone[name](branch_input)
            outputs.append(state)
        feats[name] = outputs[::-1] if name.startswith("backward") else outputs

    def forward(self, lqs: torch.Tensor) -> torch.Tensor:
        """(N, T, 3, H, W) in [0, 1] → (N, T, 3, 4H, 4W) (same size if ``is_low_res_input=False``)."""
        n, t, c, h, w = lqs.shape
        if self.is_low_res_input:
            lqs = pad_to_multiple(lqs, 1, MIN_FLOW_SIZE)
            lqs_flow = lqs
        else:
            lqs = pad_to_multiple(lqs, 4, 4 * MIN_FLOW_SIZE)
            hp, wp = lqs.shape[-2:]
            lqs_flow = F.interpolate(lqs.reshape(-1, c, hp, wp), scale_factor=0.25, mode="bicubic")
            lqs_flow = lqs_flow.view(n, t, c, hp // 4, wp // 4)

        spatial = self.feat_extract(lqs.reshape(-1, c, *lqs.shape[-2:]))
        spatial = spatial.view(n, t, *spatial.shape[1:])
        feats: dict[str, list[torch.Tensor]] = {"spatial": [spatial[:, i] for i in range(t)]}

        flows_backward = pairwise_flows(self.spynet, lqs_flow, "backward")
        # An exported graph cannot branch on the pixels; it computes the forward flows, the same
        # values (see below).
        if not is_exporting() and self.is_mirror_extended(lqs):
            # Exact, not an approximation: on a mirrored clip the forward flows are the
            # backward flows read in reverse.
            flows_forward = flows_backward.flip(1)
        else:
            flows_forward = pairwise_flows(self.spynet, lqs_flow, "forward")
        for name in BRANCHES:
            self.propagate(feats, flows_backward if name.startswith("backward") else flows_forward, name)

        outputs = []
        for i in range(t):
            hr = self.reconstruction(torch.cat([feats[k][i] for k in ("spatial", *BRANCHES)], dim=1))
            outputs.append(run_upsample_tail(self, hr, lqs[:, i], upscale_base=self.is_low_res_input))
        out = torch.stack(outputs, dim=1)
        scale = 4 if self.is_low_res_input else 1
        return out[..., : scale * h, : scale * w]


FAMILY = register(
    Family(
        name="basicvsr_pp",
        title="BasicVSR++",
        builder=BasicVSRPlusPlus,
        default_weights="basicvsr_pp_reds4",
        aliases=("basicvsrpp", "basicvsr++"),
    )
)
