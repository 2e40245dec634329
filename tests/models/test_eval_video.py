"""evfsam-eval-video on tiny clips laid out like Ref-DAVIS17, Ref-YouTube-VOS and MeViS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _palette_png(index: np.ndarray, path: Path) -> None:
    img = Image.fromarray(index.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * (3 * 253))
    img.save(path)


def _layout(root: Path, split: str, videos: dict[str, int], frame_names) -> None:
    """Frames, palette annotations (object 1 a red square moving right, object 2 a blue bar) and the
    meta_expressions file, as both Ref-DAVIS17 (ReferFormer's conversion) and Ref-YouTube-VOS lay them out."""
    meta = {"videos": {}}
    for video, n in videos.items():
        (root / split / "JPEGImages" / video).mkdir(parents=True)
        (root / split / "Annotations" / video).mkdir(parents=True)
        names = [frame_names(t) for t in range(n)]
        for t, name in enumerate(names):
            img = np.full((40, 56, 3), 230, dtype=np.uint8)
            index = np.zeros((40, 56), dtype=np.uint8)
            img[8:20, 4 + 3 * t:16 + 3 * t] = (220, 30, 30)
            index[8:20, 4 + 3 * t:16 + 3 * t] = 1
            img[26:34, 10:40] = (30, 30, 220)
            index[26:34, 10:40] = 2
            Image.fromarray(img).save(root / split / "JPEGImages" / video / f"{name}.jpg", quality=95)
            if t != 1:  # one frame without annotation: not scored
                _palette_png(index, root / split / "Annotations" / video / f"{name}.png")
        meta["videos"][video] = {"frames": names, "expressions": {
            "0": {"exp": "the red square", "obj_id": "1"}, "1": {"exp": "the blue bar", "obj_id": 2}}}
    (root / "meta_expressions" / split).mkdir(parents=True)
    (root / "meta_expressions" / split / "meta_expressions.json").write_text(json.dumps(meta))


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _mevis_layout(root: Path, split: str, n: int = 4) -> dict[int, np.ndarray]:
    """A clip laid out as MeViS ships it: JPEGImages/<video>/<frame>.jpg, and next to them
    meta_expressions.json (obj_id / anno_id lists) and mask_dict.json (anno_id -> per-frame COCO RLE with
    compressed string counts, null where the object is absent). Object 0 (anno 10) is a red square moving
    right, object 1 (anno 11) a blue bar that leaves after frame 1; expression "1" refers to both, so its
    target is their union. Returns the union per frame."""
    video = "dogs_and_ball"
    (root / split / "JPEGImages" / video).mkdir(parents=True)
    square, bar, union = [], [], {}
    for t in range(n):
        img = np.full((40, 56, 3), 230, dtype=np.uint8)
        sq = np.zeros((40, 56), dtype=bool)
        sq[8:20, 4 + 3 * t:16 + 3 * t] = True
        img[sq] = (220, 30, 30)
        br = np.zeros((40, 56), dtype=bool)
        if t < 2:
            br[26:34, 10:40] = True
            img[br] = (30, 30, 220)
        Image.fromarray(img).save(root / split / "JPEGImages" / video / f"{t:05d}.jpg", quality=95)
        square.append(_rle(sq))
        bar.append(_rle(br) if br.any() else None)
        union[t] = sq | br
    frames = [f"{t:05d}" for t in range(n)]
    meta = {"videos": {video: {"frames": frames[::-1], "expressions": {  # unsorted, as the loader must cope
        "0": {"exp": "the red square", "obj_id": [0], "anno_id": [10]},
        "1": {"exp": "the square and the bar", "obj_id": [0, 1], "anno_id": [10, 11]}}}}}
    (root / split / "meta_expressions.json").write_text(json.dumps(meta))
    (root / split / "mask_dict.json").write_text(json.dumps({"10": square, "11": bar}))
    return union


def test_mevis_layout_is_read_with_union_targets_and_absent_frames(tmp_path):
    from evfsam_lightning.cli.eval_video import _ground_truth, load_sequences

    union = _mevis_layout(tmp_path / "mevis", "valid_u")
    seqs = load_sequences("mevis", tmp_path / "mevis", "valid_u")
    assert [(s["expression_id"], s["obj_id"], s["anno_id"]) for s in seqs] == [
        ("0", [0], ["10"]), ("1", [0, 1], ["10", "11"])]
    assert seqs[0]["frames"] == ["00000", "00001", "00002", "00003"]
    for t in range(4):
        both = _ground_truth(seqs[1], t, f"{t:05d}", (40, 56))
        assert both.dtype == bool and np.array_equal(both, union[t])
        only_square = _ground_truth(seqs[0], t, f"{t:05d}", (40, 56))
        assert only_square.sum() == 144 and np.array_equal(only_square, union[t] & ~np.pad(
            np.ones((8, 30), bool), ((26, 6), (10, 16))))
    assert _ground_truth(seqs[1], 3, "00003", (40, 56)).sum() == 144  # the bar is null (absent) on frame 3


def test_mevis_layout_errors_are_one_line_exit_2(tmp_path, capsys):
    from evfsam_lightning.cli.eval_video import main

    root = tmp_path / "mevis"
    _mevis_layout(root, "valid")
    (root / "valid" / "mask_dict.json").unlink()  # MeViS' valid split ships no masks
    assert main(["--checkpoint", str(tmp_path / "nope"), "--data", f"m={root}:valid"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "mask_dict.json" in err and "valid_u" in err

    _mevis_layout(tmp_path / "m2", "valid_u")
    masks = json.loads((tmp_path / "m2" / "valid_u" / "mask_dict.json").read_text())
    del masks["11"]
    (tmp_path / "m2" / "valid_u" / "mask_dict.json").write_text(json.dumps(masks))
    assert main(["--checkpoint", str(tmp_path / "nope"), "--data", f"m={tmp_path / 'm2'}:valid_u"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "anno_id 11" in err and "expression 1" in err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from evfsam_lightning.cli.predict_video import _demo

    ckpt, _ = _demo(tmp_path_factory.mktemp("demo"))
    return ckpt


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "evfsam_lightning.cli.eval_video", *args],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_eval_video_on_ref_davis17_ref_youtube_vos_and_mevis_layouts(tmp_path, checkpoint):
    davis, ytvos, mevis = tmp_path / "ref-davis", tmp_path / "ref-youtube-vos", tmp_path / "mevis"
    _layout(davis, "valid", {"bear": 3}, lambda t: f"{t:05d}")
    _layout(ytvos, "train", {"003234408d": 3}, lambda t: f"{5 * t:05d}")  # YouTube-VOS: every 5th frame
    _mevis_layout(mevis, "valid_u")
    out = tmp_path / "results.json"
    proc = _run("--checkpoint", str(checkpoint), "--data", f"ref-davis17={davis}:valid",
                f"ref-youtube-vos={ytvos}:train", f"mevis={mevis}:valid_u", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["splits"]) == {"ref-davis17", "ref-youtube-vos", "mevis"}
    for split in results["splits"].values():
        assert split["sequences"] == 2
        assert 0.0 <= split["J"] <= 1.0 and 0.0 <= split["F"] <= 1.0
        assert split["JF"] == pytest.approx((split["J"] + split["F"]) / 2)
    for s in results["sequences"]:  # MeViS scores every frame, the others skip the unannotated one
        assert s["frames_scored"] == (4 if s["split"] == "mevis" else 2)
    assert [s["obj_id"] for s in results["sequences"] if s["split"] == "mevis"] == [[0], [0, 1]]
    assert "ref-davis17" in proc.stdout and "mevis" in proc.stdout and "J&F" in proc.stdout


def test_eval_video_missing_meta_file_is_one_line_exit_2(tmp_path):
    proc = _run("--checkpoint", str(tmp_path / "nope"), "--data", f"x={tmp_path}:valid")
    assert proc.returncode == 2
    assert "meta_expressions.json" in proc.stderr and proc.stderr.strip().count("\n") == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_eval_video_on_two_ranks_equals_one_rank(tmp_path, checkpoint):
    davis = tmp_path / "ref-davis"
    _layout(davis, "valid", {"bear": 3, "camel": 2}, lambda t: f"{t:05d}")
    outs = []
    for devices in ("1", "2"):
        out = tmp_path / f"r{devices}.json"
        proc = _run("--checkpoint", str(checkpoint), "--data", f"d={davis}:valid", "--devices", devices,
                    "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(json.loads(out.read_text()))
    key = lambda r: (r["video"], r["expression_id"])  # noqa: E731
    assert sorted(outs[0]["sequences"], key=key) == sorted(outs[1]["sequences"], key=key)
    assert outs[0]["splits"] == outs[1]["splits"] and outs[0]["splits"]["d"]["sequences"] == 4
