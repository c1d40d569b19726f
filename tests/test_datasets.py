"""Dataset layouts (REDS, Vimeo-90K, Vid4/UDM10, folder) built in tmp_path from real frames."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vsrkit.data.datasets import DATASETS, REDS4_CLIPS, REDSVAL4_CLIPS, Clip, list_clips, load_clip
from vsrkit.data.degradations import degrade, imresize
from vsrkit.data.video import read_all_frames
from vsrkit.errors import VsrkitError

# --------------------------------------------------------------------------- real frames


@pytest.fixture(scope="module")
def hr(shared_data: Path) -> np.ndarray:
    """7 real 720p frames (TOFlow baseball) cropped to 96x128 GT: (7, 96, 128, 3) uint8."""
    frames = []
    for i in range(1, 8):
        with Image.open(shared_data / "toflow_hr_baseball" / f"{i:02d}.png") as im:
            frames.append(np.asarray(im.convert("RGB"))[300:396, 600:728])
    return np.stack(frames)


@pytest.fixture(scope="module")
def vimeo_lr(shared_data: Path) -> np.ndarray:
    """The real Vimeo-90K LR septuplet 0625: (7, 64, 112, 3) uint8."""
    folder = shared_data / "vimeo90k_sample" / "0625"
    return np.stack([np.asarray(Image.open(folder / f"im{i}.png").convert("RGB")) for i in range(1, 8)])


def save(frames, folder: Path, names=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:08d}.png" for i in range(len(frames))]
    paths = []
    for frame, name in zip(frames, names, strict=True):
        Image.fromarray(np.asarray(frame)).save(folder / name)
        paths.append(folder / name)
    return paths


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its mtime and size: a write anywhere changes it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_mtime_ns, st.st_size)
    st = os.stat(root)
    out["."] = (st.st_mtime_ns, st.st_size)
    return out


# --------------------------------------------------------------------------- REDS


@pytest.fixture()
def reds_root(tmp_path: Path, hr: np.ndarray) -> Path:
    root = tmp_path / "REDS"
    for k, clip in enumerate(["000", "001", "002", "011", "015", "020"]):
        gt = np.roll(hr[:3], k * 5, axis=2)  # distinct clips
        save(gt, root / "train_sharp" / clip)
        save([degrade(f, "bi") for f in gt], root / "train_sharp_bicubic" / "X4" / clip)
    return root


def test_reds4_lists_the_four_test_clips_with_shipped_lr(reds_root: Path, hr: np.ndarray):
    clips = list_clips("reds4", reds_root)
    assert [c.name for c in clips] == list(REDS4_CLIPS)
    assert all(len(c.gt_frames) == 3 and len(c.lq_frames) == 3 for c in clips)
    lq, gt = load_clip(clips[0])
    assert lq.shape == (3, 24, 32, 3) and gt.shape == (3, 96, 128, 3) and lq.dtype == gt.dtype == np.uint8
    np.testing.assert_array_equal(gt, hr[:3])
    np.testing.assert_array_equal(lq, np.stack([degrade(f, "bi") for f in hr[:3]]))


def test_reds_train_split_is_everything_but_reds4(reds_root: Path):
    assert [c.name for c in list_clips("reds", reds_root, split="train")] == ["001", "002"]
    assert [c.name for c in list_clips("reds4", reds_root, split="train")] == ["001", "002"]
    assert [c.name for c in list_clips("reds", reds_root, split="test")] == list(REDS4_CLIPS)


def test_reds_bd_has_no_shipped_lr_and_is_made_on_the_fly(reds_root: Path):
    (clip,) = list_clips("reds4", reds_root, degradation="bd", clips=["015"])
    assert clip.lq_frames is None
    lq, gt = load_clip(clip, degradation="bd", max_frames=2)
    assert len(lq) == len(gt) == 2
    np.testing.assert_array_equal(lq, np.stack([degrade(f, "bd") for f in gt]))


def test_redsval4_is_the_papers_validation_clips(tmp_path: Path, hr: np.ndarray):
    # Official layout: val_sharp/000..029; REDSval4 = 000, 001, 006, 017 (BasicVSR paper, footnote 3).
    root = tmp_path / "REDS"
    for clip in ["000", "001", "002", "006", "017"]:
        save(hr[:1], root / "val_sharp" / clip)
    assert [c.name for c in list_clips("redsval4", root)] == list(REDSVAL4_CLIPS)
    assert [c.name for c in list_clips("reds", root, split="val")] == ["000", "001", "002", "006", "017"]
    assert list_clips("redsval4", root)[0].lq_frames is None
    # mmagic/BasicSR merged layout: validation clip NNN is train_sharp/(240 + NNN).
    merged = tmp_path / "merged"
    for clip in ["000", "011", "015", "020", "240", "241", "246", "257"]:
        save(hr[:1], merged / "train_sharp" / clip)
    assert [c.name for c in list_clips("redsval4", merged)] == ["240", "241", "246", "257"]


def test_standalone_reds4_layout(tmp_path: Path, hr: np.ndarray):
    # REDS4 as BasicSR and mmagic prepare it: REDS4/GT/NNN + REDS4/sharp_bicubic/NNN.
    root = tmp_path / "REDS4"
    for clip in REDS4_CLIPS:
        save(hr[:2], root / "GT" / clip)
        save([degrade(f, "bi") for f in hr[:2]], root / "sharp_bicubic" / clip)
    clips = list_clips("reds4", root)
    assert [c.name for c in clips] == list(REDS4_CLIPS) and clips[0].lq_frames is not None


def test_lr_only_reds_clip(tmp_path: Path, shared_data: Path):
    # Real REDS LR (clip 000, the BasicVSR++ demo data) with no GT beside it.
    root = tmp_path / "REDS"
    real = [
        np.asarray(Image.open(shared_data / "reds_lr_000" / f"{i:08d}.png").convert("RGB")) for i in range(3)
    ]
    save(real, root / "train_sharp_bicubic" / "X4" / "000")
    with pytest.raises(VsrkitError, match="clip '011' not found"):  # the other REDS4 clips are missing
        list_clips("reds4", root)
    (clip,) = list_clips("reds4", root, clips=["000"])
    assert clip.gt_frames is None and not clip.has_gt and clip.num_frames == 3
    lq, gt = load_clip(clip)
    assert gt is None and lq.shape == (3, 180, 320, 3)
    np.testing.assert_array_equal(lq, np.stack(real))


# --------------------------------------------------------------------------- Vimeo-90K


def make_vimeo(
    root: Path, hr: np.ndarray, vimeo_lr: np.ndarray, *, gt_dir="sequences", lq_dir="BIx4", lists=None
):
    """Two septuplets: 00001/0001 (GT = real crops) and 00001/0002 (LR = the real Vimeo sample)."""
    save(hr, root / gt_dir / "00001" / "0001", [f"im{i}.png" for i in range(1, 8)])
    # No HR exists for the sample; its GT stands in as the x4 bicubic upscale of the real LR.
    save(
        [imresize(f, 4) for f in vimeo_lr],
        root / gt_dir / "00001" / "0002",
        [f"im{i}.png" for i in range(1, 8)],
    )
    save(hr, root / gt_dir / "00002" / "0001", [f"im{i}.png" for i in range(1, 8)])  # a training septuplet
    if lq_dir:
        names = [f"im{i}.png" for i in range(1, 8)]
        save([degrade(f, "bi") for f in hr], root / lq_dir / "00001" / "0001", names)
        save(vimeo_lr, root / lq_dir / "00001" / "0002", names)
        save([degrade(f, "bi") for f in hr], root / lq_dir / "00002" / "0001", names)
    for name, text in (
        lists or {"sep_testlist.txt": "00001/0001\n00001/0002\n", "sep_trainlist.txt": "00002/0001\n"}
    ).items():
        (root / name).write_text(text)
    return root


def test_vimeo_official_layout_with_lr(tmp_path: Path, hr: np.ndarray, vimeo_lr: np.ndarray):
    root = make_vimeo(tmp_path / "vimeo", hr, vimeo_lr)
    clips = list_clips("vimeo90k-t", root)
    assert [c.name for c in clips] == ["00001/0001", "00001/0002"]
    assert [p.name for p in clips[1].lq_frames] == [f"im{i}.png" for i in range(1, 8)]
    lq, gt = load_clip(clips[1])
    np.testing.assert_array_equal(lq, vimeo_lr)
    assert gt.shape == (7, 256, 448, 3)
    assert [c.name for c in list_clips("vimeo90k", root, split="train")] == ["00002/0001"]
    assert [c.name for c in list_clips("vimeo90k", root, split="test")] == ["00001/0001", "00001/0002"]


def test_vimeo_without_lr_makes_it_from_gt(tmp_path: Path, hr: np.ndarray, vimeo_lr: np.ndarray):
    root = make_vimeo(tmp_path / "vimeo", hr, vimeo_lr, lq_dir=None)
    clip = list_clips("vimeo90k-t", root, degradation="bd", clips=["00001/0001"])[0]
    assert clip.lq_frames is None
    lq, gt = load_clip(clip, degradation="bd")
    np.testing.assert_array_equal(gt, hr)
    np.testing.assert_array_equal(lq, np.stack([degrade(f, "bd") for f in hr]))


@pytest.mark.parametrize(
    ("gt_dir", "lq_dir", "lists"),
    [
        # mmagic: GT/ + BIx4/ + meta_info_Vimeo90K_test_GT.txt
        (
            "GT",
            "BIx4",
            {"meta_info_Vimeo90K_test_GT.txt": "00001/0001 7 (256,448,3)\n00001/0002 7 (256,448,3)\n"},
        ),
        ("sequences", "sequences_BIx4", None),
    ],
)
def test_vimeo_variants(tmp_path: Path, hr, vimeo_lr, gt_dir, lq_dir, lists):
    root = make_vimeo(tmp_path / "vimeo", hr, vimeo_lr, gt_dir=gt_dir, lq_dir=lq_dir, lists=lists)
    clips = list_clips("vimeo90k-t", root)
    assert [c.name for c in clips] == ["00001/0001", "00001/0002"]
    assert all(c.lq_frames is not None and c.lq_frames[0].parts[-4] == lq_dir for c in clips)


def test_vimeo_basicsr_sibling_lr_folder(tmp_path: Path, hr, vimeo_lr):
    # BasicSR/KAIR: vimeo_septuplet/sequences + vimeo_septuplet_matlabLRx4/sequences beside it.
    root = make_vimeo(tmp_path / "vimeo_septuplet", hr, vimeo_lr, lq_dir=None)
    names = [f"im{i}.png" for i in range(1, 8)]
    save(vimeo_lr, tmp_path / "vimeo_septuplet_matlabLRx4" / "sequences" / "00001" / "0002", names)
    (clip,) = list_clips("vimeo90k-t", root, clips=["00001/0002"])
    np.testing.assert_array_equal(load_clip(clip)[0], vimeo_lr)
    with pytest.raises(VsrkitError, match="incomplete"):  # 00001/0001 has no LR there
        list_clips("vimeo90k-t", root)


def test_vimeo_errors(tmp_path: Path, hr, vimeo_lr):
    root = make_vimeo(tmp_path / "vimeo", hr, vimeo_lr, lists={"sep_trainlist.txt": "00002/0001\n"})
    with pytest.raises(VsrkitError, match="sep_testlist.txt"):
        list_clips("vimeo90k-t", root)
    (root / "sep_testlist.txt").write_text("00001/0001\n00009/0009\n")
    with pytest.raises(VsrkitError, match="1 of the 2 septuplets.*00009/0009"):
        list_clips("vimeo90k-t", root)
    with pytest.raises(VsrkitError, match="no 'val' split"):
        list_clips("vimeo90k-t", root, split="val")


# --------------------------------------------------------------------------- Vid4 / UDM10


def test_vid4_with_shipped_lr_and_udm10_on_the_fly(tmp_path: Path, hr: np.ndarray):
    vid4 = tmp_path / "Vid4"
    save(hr[:4], vid4 / "GT" / "walk")
    save(hr[2:5], vid4 / "GT" / "calendar")
    save([degrade(f, "bi") for f in hr[:4]], vid4 / "BIx4" / "walk")
    save([degrade(f, "bi") for f in hr[2:5]], vid4 / "BIx4" / "calendar")
    clips = list_clips("vid4", vid4)
    assert [(c.name, c.num_frames, c.lq_frames is not None) for c in clips] == [
        ("calendar", 3, True),
        ("walk", 4, True),
    ]
    assert list_clips("vid4", vid4, degradation="bd")[0].lq_frames is None  # no BDx4 folder

    # UDM10 names GT 0000.png and LR 000.png; pairing is by natural order.
    udm = tmp_path / "UDM10"
    save(hr[:3], udm / "GT" / "archpeople", [f"{i:04d}.png" for i in range(3)])
    save([degrade(f, "bd") for f in hr[:3]], udm / "BDx4" / "archpeople", [f"{i:03d}.png" for i in range(3)])
    (clip,) = list_clips("udm10", udm, degradation="bd")
    lq, gt = load_clip(clip, degradation="bd")
    np.testing.assert_array_equal(lq, np.stack([degrade(f, "bd") for f in hr[:3]]))
    (clip,) = list_clips("udm10", udm, degradation="bi")  # no BIx4: made on the fly
    lq, gt = load_clip(clip, degradation="bi")
    np.testing.assert_array_equal(lq, np.stack([degrade(f, "bi") for f in gt]))


def test_gt_not_divisible_by_4_is_modcropped(tmp_path: Path, hr: np.ndarray, shared_data: Path):
    with Image.open(shared_data / "toflow_hr_baseball" / "01.png") as im:
        odd = np.asarray(im.convert("RGB"))[100:199, 200:330][None]  # 99x130
    root = tmp_path / "Vid4"
    save(odd, root / "GT" / "odd")
    (clip,) = list_clips("vid4", root)
    lq, gt = load_clip(clip)
    assert gt.shape == (1, 96, 128, 3) and lq.shape == (1, 24, 32, 3)
    np.testing.assert_array_equal(gt[0], odd[0, :96, :128])  # top-left, as MATLAB modcrop
    np.testing.assert_array_equal(lq[0], degrade(odd[0, :96, :128], "bi"))
    # Shipped LR of the cropped size: GT cropped to 4x the LR.
    save([lq[0]], root / "BIx4" / "odd")
    lq2, gt2 = load_clip(list_clips("vid4", root)[0])
    np.testing.assert_array_equal(gt2, gt)
    # LR that does not match the GT at all is refused.
    save([lq[0, :, :30]], root / "BIx4" / "odd")
    with pytest.raises(VsrkitError, match="x4 would be 120x96"):
        load_clip(list_clips("vid4", root)[0])


# --------------------------------------------------------------------------- folder


def write_mp4(path: Path, frames: np.ndarray) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


@pytest.fixture(scope="module")
def bikes(shared_data: Path) -> np.ndarray:
    """4 real frames of bikes.mp4, x1/4 with the BI degradation and cropped: (4, 64, 160, 3)."""
    frames = read_all_frames(shared_data / "videos" / "bikes.mp4", max_frames=4)
    return np.stack([degrade(f, "bi")[2:66] for f in frames])


def test_folder_layout_png_and_video(tmp_path: Path, hr: np.ndarray, bikes: np.ndarray):
    root = tmp_path / "mine"
    save(hr[:3], root / "baseball")
    write_mp4(root / "bikes.mp4", bikes)
    (root / "notes").mkdir()  # a folder without images is not a clip
    (root / "README.txt").write_text("not a clip")
    clips = list_clips("folder", root)
    assert [c.name for c in clips] == ["baseball", "bikes"]
    assert clips[1].gt_video == root / "bikes.mp4" and clips[1].gt_frames is None
    assert clips[1].num_frames == 4
    lq, gt = load_clip(clips[1])
    np.testing.assert_array_equal(gt, read_all_frames(root / "bikes.mp4"))  # GT is the decoded video
    assert gt.shape == (4, 64, 160, 3) and lq.shape == (4, 16, 40, 3)
    np.testing.assert_array_equal(lq, np.stack([degrade(f, "bi") for f in gt]))
    lq, gt = load_clip(clips[0], max_frames=2)
    assert len(lq) == len(gt) == 2


def test_every_layout_is_only_read(tmp_path: Path, hr, vimeo_lr, bikes):
    roots = {"vid4": tmp_path / "Vid4", "vimeo90k-t": tmp_path / "vimeo", "folder": tmp_path / "mine"}
    save(hr[:2], roots["vid4"] / "GT" / "walk")
    make_vimeo(roots["vimeo90k-t"], hr, vimeo_lr, lq_dir=None)
    save(hr[:2], roots["folder"] / "a")
    write_mp4(roots["folder"] / "b.mp4", bikes[:2])
    for root in roots.values():
        os.utime(root, ns=(1, 1))  # an old directory mtime: a file created in it would change it
    before = snapshot(tmp_path)
    for dataset, root in roots.items():
        for degradation in ("bi", "bd"):
            for clip in list_clips(dataset, root, degradation=degradation):
                load_clip(clip, degradation=degradation)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- errors


def test_errors_are_one_line_vsrkit_errors(tmp_path: Path, hr: np.ndarray):
    with pytest.raises(VsrkitError, match="dataset root not found"):
        list_clips("vid4", tmp_path / "nope")
    with pytest.raises(VsrkitError, match="unknown dataset 'vid5'; choose one of: reds4"):
        list_clips("vid5", tmp_path)
    with pytest.raises(VsrkitError, match="no clips in"):
        list_clips("folder", tmp_path)
    with pytest.raises(VsrkitError, match="no vid4 data"):
        list_clips("vid4", tmp_path)
    save(hr[:1], tmp_path / "GT" / "walk")
    save(hr[:1], tmp_path / "GT" / "city")
    with pytest.raises(VsrkitError, match=r"unknown clip\(s\) foliage in vid4; available: city, walk") as exc:
        list_clips("vid4", tmp_path, clips=["walk", "foliage"])
    assert "\n" not in str(exc.value)
    with pytest.raises(VsrkitError, match="no 'train' split"):
        list_clips("vid4", tmp_path, split="train")
    with pytest.raises(VsrkitError, match="unknown degradation"):
        list_clips("vid4", tmp_path, degradation="bx")
    save([degrade(hr[0], "bi")], tmp_path / "BIx4" / "walk")  # LR of one clip only
    with pytest.raises(VsrkitError, match="incomplete"):
        list_clips("vid4", tmp_path)
    assert [c.name for c in list_clips("vid4", tmp_path, clips=["walk"])] == ["walk"]


def test_dataset_names_and_clip_type():
    assert DATASETS == ("reds4", "redsval4", "reds", "vimeo90k-t", "vimeo90k", "vid4", "udm10", "folder")
    clip = Clip("a", [Path("x.png")], None)
    assert clip.has_gt and clip.num_frames == 1 and clip.gt_video is None
