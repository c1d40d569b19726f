"""The one interface between a model family and the rest of vsrkit.

Every architecture subclasses :class:`VSRModel` in its own file. The engine, the commands,
the weights cache, evaluation, training and :mod:`vsrkit.accel` learn everything they need
about a model from these attributes and methods (and from its :class:`~vsrkit.models.registry.Family`),
never from its name.

**What the engine must know** (class attributes, or properties where they depend on the config):

- ``scale``: output side / input side (4, or 1 for same-size restoration models);
- ``min_frames``: the shortest clip the model can run;
- ``pad_multiple``: the LR sides its steps need to be multiples of (the engine pads the frames,
  reflecting at the bottom and right, and crops the output);
- ``streams_exactly``: True when the engine can run the model frame by frame through the steps
  below and get the whole-clip result; False when it must run :meth:`forward` on overlapping
  windows of frames;
- ``bidirectional``: whether there is a backward branch (two passes over the clip).

**The per-frame steps** (models with ``streams_exactly``), one signature for every family:

- :meth:`flow` ``(ref, supp)``: the optical flow that brings ``supp`` onto ``ref``, fp32;
- :meth:`backward_step` ``(x, feat)`` and :meth:`forward_step` ``(x, feat, backward_feat)``:
  one step of each branch, where ``x`` is a :class:`StepInput` and ``feat`` the state
  propagated from the neighbouring frame (None at the clip's end where the branch starts);
- :meth:`reconstruct` ``(lq, forward_feat, backward_feat)``: the HR frame, fp32;
- :meth:`keyframes` and :meth:`keyframe_features`: clip-level features that some steps take
  (IconVSR's information refill); none by default;
- ``refine_passes``, :meth:`refine` and :meth:`refine_done`: passes over the whole clip that
  change the input frames before the steps run (RealBasicVSR's image cleaning, which stops on
  a clip-wide mean); none by default.

:meth:`VSRModel.propagate_clip` is the whole-clip loop over these steps (flows, backward branch,
forward branch, reconstruction, after the refine passes) that the step models' ``forward`` runs;
the streaming engine runs the same steps frame by frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ..memory import InferenceMemory
from .blocks import is_exporting


def pad_to_multiple(lqs: torch.Tensor, multiple: int, min_size: int = 0) -> torch.Tensor:
    """Pad (N, T, C, H, W) at the bottom/right so both sides are ≥ ``min_size`` and multiples.

    Frames below ``min_size`` are first replicate-padded (reflection cannot pad by more than the
    side); the rest is reflect padding, as in the references.
    """
    n, t, c, h, w = lqs.shape
    flat = lqs.reshape(n * t, c, h, w)
    if is_exporting():
        padded = _pad_to_multiple_any_size(flat, multiple, min_size)
        return padded.view(n, t, c, *padded.shape[-2:])
    if h < min_size or w < min_size:
        flat = F.pad(flat, [0, max(0, min_size - w), 0, max(0, min_size - h)], mode="replicate")
        h, w = flat.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        flat = F.pad(flat, [0, pad_w, 0, pad_h], mode=mode)
    return flat.view(n, t, c, *flat.shape[-2:])


def _pad_to_multiple_any_size(flat: torch.Tensor, multiple: int, min_size: int) -> torch.Tensor:
    """:func:`pad_to_multiple` for a traced graph that must serve every frame size.

    Both pads are always applied, by amounts computed from the symbolic size (0 where none is
    needed), instead of the eager version's branches on the size. Same result for sides of at
    least ``multiple`` pixels, where the eager version reflects too.
    """
    h, w = flat.shape[-2:]
    if min_size:
        flat = F.pad(
            flat, [0, torch.sym_max(0, min_size - w), 0, torch.sym_max(0, min_size - h)], mode="replicate"
        )
    if multiple > 1:
        h, w = flat.shape[-2:]
        flat = F.pad(
            flat,
            [0, (multiple - w % multiple) % multiple, 0, (multiple - h % multiple) % multiple],
            mode="reflect",
        )
    return flat


def spynet_flow(spynet: nn.Module, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
    """``spynet(ref, supp)`` in fp32 whatever the autocast around it.

    In bf16 a pixel offset at x≈300 is off by up to 1 px; a CPU-prepared SPyNet keeps its flow
    sums in fp32 by itself.
    """
    with torch.autocast(ref.device.type, enabled=False):
        return spynet(ref.float(), supp.float()).float()


class StepInput(NamedTuple):
    """What one propagation step of frame ``i`` sees besides the propagated state."""

    lq: torch.Tensor  #: the frame, (N, 3, H, W) in [0, 1]
    #: the frame the state comes from (i + 1 in the backward branch, i - 1 in the forward one);
    #: None where the branch starts
    neighbour: torch.Tensor | None
    #: ``flow(lq, neighbour)``: brings the neighbour (and its state) onto this frame; None where
    #: the branch starts
    flow: torch.Tensor | None
    #: the keyframe feature of this frame (see :meth:`VSRModel.keyframe_features`), else None
    keyframe: torch.Tensor | None = None


#: ``features(key, frame)``: the keyframe feature of frame ``key``; ``frame(j)`` gives frame ``j``.
KeyframeFeatureFn = Callable[[int, Callable[[int], torch.Tensor]], torch.Tensor]


class VSRModel(nn.Module):
    """Base class of every vsrkit network: see the module's documentation."""

    scale: int = 4
    min_frames: int = 1
    pad_multiple: int = 1
    streams_exactly: bool = True
    bidirectional: bool = True
    #: at most this many :meth:`refine` passes run over the clip before the steps
    refine_passes: int = 0
    #: how far (in frames, either side) :meth:`keyframe_features` reads around a keyframe
    keyframe_reach: int = 0

    # Set by :func:`vsrkit.models.build_model`.
    arch: str
    config: dict

    @property
    def title(self) -> str:
        """The family's name as the papers write it (BasicVSR++), for messages; else the class name."""
        family = getattr(type(self), "family", None)
        return family.title if family is not None else type(self).__name__

    def inference_memory(self, height: int, width: int, element_size: int = 4) -> InferenceMemory:
        """Memory of streaming one (height, width) LR tile (see :class:`InferenceMemory`).

        With ``refine_passes``, ``step`` must also cover one :meth:`refine` call on a frame of
        that size (the engine refines whole frames before the steps run).
        """
        raise NotImplementedError

    # -- per-frame steps --------------------------------------------------------------------
    def flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        """Flows (N, 2, H, W), fp32, that bring each ``supp`` frame onto its ``ref`` frame."""
        raise NotImplementedError

    def backward_step(self, x: StepInput, feat: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward_step(
        self, x: StepInput, feat: torch.Tensor | None, backward_feat: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def reconstruct(
        self, lq: torch.Tensor, forward_feat: torch.Tensor, backward_feat: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    # -- clip-level context -------------------------------------------------------------------
    def keyframes(self, num_frames: int) -> list[int]:
        """The frames whose steps take a keyframe feature."""
        return []

    def keyframe_features(self, num_frames: int, order: Sequence[int] | None = None) -> KeyframeFeatureFn:
        """A function giving keyframe features, to be called for the keys in ``order``."""
        raise NotImplementedError

    def keyframe_window(self, key: int, num_frames: int) -> list[int]:
        """The frames (indices into the clip) whose stack :meth:`keyframe_feature` takes for ``key``."""
        raise NotImplementedError

    def keyframe_feature(self, window_frames: torch.Tensor) -> torch.Tensor:
        """The feature of one keyframe from its window, (N, len(window), 3, H, W): what
        :meth:`keyframe_features` gives, without sharing work between neighbouring windows."""
        raise NotImplementedError

    def refine(self, lq: torch.Tensor) -> torch.Tensor:
        """The residue one refining pass adds to frames ``lq`` (N, 3, H, W)."""
        raise NotImplementedError

    def refine_done(self, mean_abs_residue: float) -> bool:
        """Whether refining stops after a pass whose residues had this mean absolute value."""
        return True

    # -- the whole clip -------------------------------------------------------------------------
    def refine_clip(self, lqs: torch.Tensor) -> torch.Tensor:
        """``lqs`` (N, T, 3, H, W) after the refine passes (frame-batched), as the engine runs them."""
        n, t, c, h, w = lqs.shape
        for _ in range(self.refine_passes):
            residue = self.refine(lqs.reshape(n * t, c, h, w)).view(n, t, c, h, w)
            lqs = lqs + residue
            if self.refine_done(residue.abs().mean().item()):
                break
        return lqs

    def propagate_clip(self, lqs: torch.Tensor) -> torch.Tensor:
        """(N, T, 3, H, W) in [0, 1] → (N, T, 3, scale·H, scale·W) through the per-frame steps.

        Frames are padded to ``pad_multiple`` (and the output cropped back), refined, then run
        through the flows (batched over time), the backward branch from the last frame, and the
        forward branch with the reconstruction of each frame.
        """
        n, t, c, h, w = lqs.shape
        if t < self.min_frames:
            raise ValueError(f"{type(self).__name__} needs at least {self.min_frames} frames, got {t}")
        if self.pad_multiple > 1:
            lqs = pad_to_multiple(lqs, self.pad_multiple)
        lqs = self.refine_clip(lqs)
        hp, wp = lqs.shape[-2:]
        keys = self.keyframes(t)
        keyframe_feats = {}
        if keys:
            features = self.keyframe_features(t)
            keyframe_feats = {i: features(i, lambda j: lqs[:, j]) for i in keys}
        if t > 1:
            earlier = lqs[:, :-1].reshape(-1, c, hp, wp)
            later = lqs[:, 1:].reshape(-1, c, hp, wp)
        backward_feats: list[torch.Tensor | None] = [None] * t
        if self.bidirectional:
            # flows_backward[i] brings frame i + 1 onto frame i.
            flows_backward = self.flow(earlier, later).view(n, t - 1, 2, hp, wp) if t > 1 else None
            feat = None
            for i in range(t - 1, -1, -1):
                last = i == t - 1
                x = StepInput(
                    lqs[:, i],
                    None if last else lqs[:, i + 1],
                    None if last else flows_backward[:, i],
                    keyframe_feats.get(i),
                )
                feat = self.backward_step(x, feat)
                backward_feats[i] = feat
        # flows_forward[i - 1] brings frame i - 1 onto frame i.
        flows_forward = self.flow(later, earlier).view(n, t - 1, 2, hp, wp) if t > 1 else None
        outputs = []
        feat = None
        for i in range(t):
            x = StepInput(
                lqs[:, i],
                lqs[:, i - 1] if i > 0 else None,
                flows_forward[:, i - 1] if i > 0 else None,
                keyframe_feats.get(i),
            )
            feat = self.forward_step(x, feat, backward_feats[i])
            outputs.append(self.reconstruct(lqs[:, i], feat, backward_feats[i]))
        out = torch.stack(outputs, dim=1)
        if self.pad_multiple > 1:
            out = out[..., : self.scale * h, : self.scale * w]
        return out
