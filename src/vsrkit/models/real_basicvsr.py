"""RealBasicVSR (Chan et al., CVPR 2022): an image-cleaning module in front of BasicVSR.

Real-world degradations (noise, blur, compression) are first removed from each LR frame by
a stack of residual blocks that predicts a residue, ``lq ← lq + cleaning(lq)``. The cleaning
is repeated, at most three times, until the mean absolute residue over the whole clip falls
below ``dynamic_refine_thres / 255`` (Sec. 3.2, "dynamic refinement"). BasicVSR then
super-resolves the cleaned frames.

The network and its weights are mmagic's ``RealBasicVSRNet``; ``dynamic_refine_thres`` is on
mmagic's 0–255 scale. Its default, 5, is what mmagic tests the GAN model with (the model
trained without the GAN is tested with 1.5).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .basicvsr import BasicVSR
from .blocks import ConvResidualBlocks, conv3x3, is_exporting
from .registry import Family, StateDict, WeightsEntry, register


class RealBasicVSR(BasicVSR):
    #: at most three cleaning passes, "determined empirically" by the authors
    refine_passes = 3

    def __init__(
        self,
        mid_channels: int = 64,
        num_blocks: int = 20,
        num_cleaning_blocks: int = 20,
        dynamic_refine_thres: float = 5.0,
    ) -> None:
        super().__init__(mid_channels=mid_channels, num_blocks=num_blocks)
        self.dynamic_refine_thres = dynamic_refine_thres
        self.image_cleaning = nn.Sequential(
            ConvResidualBlocks(3, mid_channels, num_cleaning_blocks), conv3x3(mid_channels, 3)
        )

    def refine(self, lq: torch.Tensor) -> torch.Tensor:
        """The residue one cleaning pass adds to frames ``lq`` (N, 3, H, W)."""
        return self.image_cleaning(lq)

    def refine_done(self, mean_abs_residue: float) -> bool:
        return mean_abs_residue < self.dynamic_refine_thres / 255

    def refine_clip(self, lqs: torch.Tensor) -> torch.Tensor:
        """The cleaned clip (N, T, 3, H, W): ``VSRModel``'s passes, which stop on the clip-wide mean.

        ``forward`` is the inherited whole-clip loop, which runs this before the steps.
        """
        if not is_exporting():
            return super().refine_clip(lqs)
        # torch.export cannot branch on a tensor's value: every pass runs, and those after the
        # stop add their residue times zero.
        n, t, c, h, w = lqs.shape
        frames = lqs.reshape(n * t, c, h, w)
        keep = frames.new_ones(())
        for _ in range(self.refine_passes):
            residues = self.refine(frames)
            frames = frames + keep * residues
            keep = keep * (residues.abs().mean() >= self.dynamic_refine_thres / 255).to(frames.dtype)
        return frames.view(n, t, c, h, w)


def _count_blocks(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"main\.2\.(\d+)\.")
    found = [int(m.group(1)) for key in sd if (m := pattern.match(key))]
    return max(found) + 1 if found else 0


def infer_config(sd: StateDict) -> dict[str, Any] | None:
    """The options giving this native-layout state dict's shapes; None if it has no cleaning module."""
    if "image_cleaning.1.weight" not in sd or "forward_trunk.main.0.weight" not in sd:
        return None
    return {
        "mid_channels": sd["forward_trunk.main.0.weight"].shape[0],
        "num_blocks": _count_blocks(sd, "forward_trunk."),
        "num_cleaning_blocks": _count_blocks(sd, "image_cleaning.0."),
    }


# mmagic nests its BasicVSRNet under ``basicvsr.``; natively BasicVSR's keys are at the top level
# (so that a RealBasicVSR state dict is a BasicVSR one plus ``image_cleaning.*``, which mmagic
# and vsrkit lay out alike). Each rule is anchored on ``basicvsr.`` and so applies whether it runs
# before or after the shared renames; the SPyNet rule accepts the ConvModule's ``.conv.`` or not.
MMAGIC_KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    *(
        (
            re.compile(rf"^basicvsr\.spynet\.basic_module\.(\d+)\.basic_module\.{level}(?:\.conv)?\."),
            rf"spynet.basic_module.\1.basic_module.{2 * level}.",
        )
        for level in range(5)
    ),
    (re.compile(r"^basicvsr\.(backward|forward)_resblocks\."), r"\1_trunk."),
    (re.compile(r"^basicvsr\.upsample([12])\.upsample_conv\."), r"upconv\1."),
    (re.compile(r"^basicvsr\."), ""),
)

# The inverse, native → mmagic, for writing mmagic's layout: complete in itself (the shared
# renames, anchored on ``spynet.``/``upconv``, then find nothing left to do).
NATIVE_KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    *(
        (
            re.compile(rf"^spynet\.basic_module\.(\d+)\.basic_module\.{2 * level}\."),
            rf"basicvsr.spynet.basic_module.\1.basic_module.{level}.conv.",
        )
        for level in range(5)
    ),
    (re.compile(r"^(backward|forward)_trunk\."), r"basicvsr.\1_resblocks."),
    (re.compile(r"^upconv([12])\."), r"basicvsr.upsample\1.upsample_conv."),
    (re.compile(r"^(?!image_cleaning\.|basicvsr\.)"), "basicvsr."),
)

_CONFIG: dict[str, Any] = {"mid_channels": 64, "num_blocks": 20, "num_cleaning_blocks": 20}
_MMAGIC_URL = "https://download.openmmlab.com/mmediting/restorers/real_basicvsr/"
_NO_PSNR_NOTE = (
    "Trained on REDS with the real-world degradations of the paper (blur, noise, resizing, JPEG "
    "and video compression); RealBasicVSR has no ground truth to score PSNR against, so mmagic "
    "publishes no-reference metrics only."
)


def _entry(name: str, filename: str, threshold: float, notes: str) -> WeightsEntry:
    return WeightsEntry(
        name=name,
        arch="real_basicvsr",
        config={**_CONFIG, "dynamic_refine_thres": threshold},
        urls=(_MMAGIC_URL + filename,),
        filename=filename,
        layout="mmagic",
        training_data="REDS",
        degradation="real",
        sha256_prefix=filename.removesuffix(".pth").rsplit("-", 1)[1],  # OpenMMLab's sha256 prefix
        notes=notes,
    )


WEIGHTS = (
    _entry(
        "realbasicvsr_reds",
        "realbasicvsr_c64b20_1x30x8_lr5e-5_150k_reds_20211104-52f77c2c.pth",
        5.0,
        "mmagic's GAN model, tested with dynamic_refine_thres=5. "
        + _NO_PSNR_NOTE
        + " mmagic's metafile (REDS, Y): NIQE 3.7662, BRISQUE 29.03, PI 3.8593, NRQM 6.0477.",
    ),
    _entry(
        "realbasicvsr_wogan_reds",
        "realbasicvsr_wogan_c64b20_2x30x8_lr1e-4_300k_reds_20211027-0e2ff207.pth",
        1.5,
        "mmagic's model trained without the GAN loss (the GAN model's starting point), tested "
        "with dynamic_refine_thres=1.5. " + _NO_PSNR_NOTE + " mmagic's metafile lists no metrics for it.",
    ),
)

FAMILY = register(
    Family(
        name="real_basicvsr",
        title="RealBasicVSR",
        builder=RealBasicVSR,
        aliases=("realbasicvsr",),
        weights=WEIGHTS,
        default_weights="realbasicvsr_reds",
        infer_config=infer_config,
        mmagic_key_rules=MMAGIC_KEY_RULES,
        native_key_rules=NATIVE_KEY_RULES,
    )
)
