"""evfsam-eval-video on tiny clips laid out like Ref-DAVIS17 and Ref-YouTube-VOS."""

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
def test_eval_video_on_ref_davis17_and_ref_youtube_vos_layouts(tmp_path, checkpoint):
    davis, ytvos = tmp_path / "ref-davis", tmp_path / "ref-youtube-vos"
    _layout(davis, "valid", {"bear": 3}, lambda t: f"{t:05d}")
    _layout(ytvos, "train", {"003234408d": 3}, lambda t: f"{5 * t:05d}")  # YouTube-VOS: every 5th frame
    out = tmp_path / "results.json"
    proc = _run("--checkpoint", str(checkpoint), "--data", f"ref-davis17={davis}:valid",
                f"ref-youtube-vos={ytvos}:train", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["splits"]) == {"ref-davis17", "ref-youtube-vos"}
    for split in results["splits"].values():
        assert split["sequences"] == 2
        assert 0.0 <= split["J"] <= 1.0 and 0.0 <= split["F"] <= 1.0
        assert split["JF"] == pytest.approx((split["J"] + split["F"]) / 2)
    assert all(s["frames_scored"] == 2 for s in results["sequences"])
    assert "ref-davis17" in proc.stdout and "J&F" in proc.stdout


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
