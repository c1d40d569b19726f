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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..memory import InferenceMemory


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

    def inference_memory(self, height: int, width: int, element_size: int = 4) -> InferenceMemory:
        """Memory of streaming one (height, width) LR tile (see :class:`InferenceMemory`)."""
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

    def refine(self, lq: torch.Tensor) -> torch.Tensor:
        """The residue one refining pass adds to frames ``lq`` (N, 3, H, W)."""
        raise NotImplementedError

    def refine_done(self, mean_abs_residue: float) -> bool:
        """Whether refining stops after a pass whose residues had this mean absolute value."""
        return True
