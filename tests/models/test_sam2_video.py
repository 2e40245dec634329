"""EVF-SAM2 on video: parity with the reference video path (fixture V2A), and the tracker's behaviour
(directions, several objects, frames without the object, bounded memory, frame sources)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from evfsam_lightning.config import ConfigError
from evfsam_lightning.models.builders import build_model
from evfsam_lightning.models.sam2_video import (
    NO_OBJ_SCORE,
    EvfSam2Video,
    ObjectPrompt,
    ObjectTrack,
    Sam2VideoTracker,
    fill_holes,
    processing_order,
    video_frame_preprocess,
)
from evfsam_lightning.models.video_io import FolderFrames, as_frame_source

REPO = Path(__file__).resolve().parents[2]
V2A = REPO.parent / "shared" / "fixtures" / "evfsam2_video_a"


def _run_parity(fixture: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "tools" / "check_parity.py"), str(fixture)],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_video_parity_tool_passes_on_v2a():
    if not V2A.exists():
        pytest.skip(f"{V2A} not present")
    proc = _run_parity(V2A)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "family sam2 video" in proc.stdout
    for t in range(6):
        assert f"frame{t}.low_res_logits_prefill" in proc.stdout
        assert f"frame{t}.video_res_logits" in proc.stdout


@pytest.mark.slow
def test_video_parity_tool_fails_on_a_perturbed_memory_attention_weight(tmp_path):
    """The fixture's own sensitivity probe: one memory-attention weight changes every tracked frame."""
    if not V2A.exists():
        pytest.skip(f"{V2A} not present")
    fixture = tmp_path / "v2a"
    shutil.copytree(V2A, fixture)
    weights = load_file(str(fixture / "weights.safetensors"))
    weights["visual_model.memory_attention.layers.0.cross_attn_image.v_proj.weight"][0, 0] += 0.5
    save_file(weights, str(fixture / "weights.safetensors"))
    proc = _run_parity(fixture)
    assert proc.returncode == 1
    assert "frame0.video_res_logits" in proc.stdout
    failed = [line.split()[0] for line in proc.stdout.splitlines() if line.endswith("FAIL")]
    assert "frame1.low_res_logits_prefill" in failed and not any(f.startswith("frame0.") for f in failed)


# -- pieces ---------------------------------------------------------------------------------------
def test_fill_holes_fills_background_components_up_to_the_area_only():
    mask = torch.full((1, 1, 12, 12), 2.0)
    mask[0, 0, 2:4, 2:6] = -1.0  # 8 background pixels, enclosed: filled
    mask[0, 0, 7:10, 7:10] = -0.5  # 9 pixels: kept
    mask[0, 0, 0, 11] = 0.0  # a single pixel at exactly 0 counts as background: filled
    mask[0, 0, 5, 0] = -3.0
    mask[0, 0, 6, 1] = -3.0  # two diagonal pixels form one 8-connected component of 2: filled
    out = fill_holes(mask)
    assert torch.equal(out[0, 0, 2:4, 2:6], torch.full((2, 4), 0.1))
    assert torch.equal(out[0, 0, 7:10, 7:10], torch.full((3, 3), -0.5))
    assert out[0, 0, 0, 11] == pytest.approx(0.1) and out[0, 0, 5, 0] == pytest.approx(0.1)
    assert out[0, 0, 6, 1] == pytest.approx(0.1)
    assert torch.equal(out[mask > 0], mask[mask > 0])
    # an all-background mask (no object: NO_OBJ_SCORE everywhere) is one large component: unchanged
    empty = torch.full((1, 1, 8, 8), NO_OBJ_SCORE)
    assert torch.equal(fill_holes(empty), empty)


def test_processing_order_matches_the_reference_passes():
    assert processing_order(6, 0, False) == [0, 1, 2, 3, 4, 5]
    assert processing_order(6, 3, True) == [3, 2, 1, 0]
    assert processing_order(6, 0, True) == []  # the reference yields nothing backward from frame 0


# -- the tracker on a tiny random EVF-SAM2 ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("tiny-sam2").eval()
    return model


def _clip(n: int = 9, h: int = 48, w: int = 64) -> list[np.ndarray]:
    frames = []
    for t in range(n):
        img = np.full((h, w, 3), 40, dtype=np.uint8)
        img[10:30, 5 + 4 * t:25 + 4 * t] = (230, 40, 40)
        img[30:44, 40 - 2 * t:54 - 2 * t] = (40, 40, 230)
        frames.append(img)
    return frames


def _prompt(model, seed: int, frame: int, obj_id: int = 1) -> ObjectPrompt:
    g = torch.Generator().manual_seed(seed)
    return ObjectPrompt(obj_id, frame, torch.randn(1, 1, model.visual_model.prompt_dim, generator=g))


def _run(video, frames, prompts, direction):
    return [(t, {k: v.clone() for k, v in out.items()}) for t, out in video.track(frames, prompts=prompts,
                                                                                   direction=direction)]


def test_backward_tracking_is_forward_tracking_of_the_reversed_clip(tiny):
    video = EvfSam2Video(tiny)
    frames = _clip()
    n = len(frames)
    fwd = _run(video, frames[::-1], [_prompt(tiny, 1, 0)], "forward")
    bwd = _run(video, frames, [_prompt(tiny, 1, n - 1)], "backward")
    assert [t for t, _ in bwd] == list(range(n - 1, -1, -1))
    assert [t for t, _ in fwd] == list(range(n))
    for (tf, of), (tb, ob) in zip(fwd, bwd, strict=True):
        assert tb == n - 1 - tf
        assert torch.equal(of[1], ob[1])


def test_both_directions_yield_every_frame_once_and_start_at_the_prompt(tiny):
    video = EvfSam2Video(tiny)
    frames = _clip()
    out = _run(video, frames, [_prompt(tiny, 2, 4)], "both")
    assert [t for t, _ in out] == [4, 5, 6, 7, 8, 3, 2, 1, 0]
    forward_only = dict(_run(video, frames, [_prompt(tiny, 2, 4)], "forward"))
    for t, logits in out:
        assert logits[1].shape == (48, 64)
        if t >= 4:
            assert torch.equal(logits[1], forward_only[t][1])  # the backward pass does not redo them


def test_several_objects_in_one_pass_equal_each_object_alone(tiny):
    video = EvfSam2Video(tiny)
    frames = _clip()
    a, b = _prompt(tiny, 3, 0, obj_id=1), _prompt(tiny, 4, 2, obj_id=2)
    both = dict(_run(video, frames, [a, b], "forward"))
    alone_a = dict(_run(video, frames, [a], "forward"))
    alone_b = dict(_run(video, frames, [b], "forward"))
    assert sorted(both) == list(range(9))
    for t in range(9):
        assert torch.equal(both[t][1], alone_a[t][1])
        if t < 2:  # before its prompt frame, object 2 has no mask
            assert bool((both[t][2] == NO_OBJ_SCORE).all())
        else:
            assert torch.equal(both[t][2], alone_b[t][2])


def test_a_batch_of_objects_in_one_tracker_step_equals_each_object_alone(tiny):
    """A trainer steps several objects at once, each on its own clip: object i must read clip i's
    features, on the prompt frame and through the memory (all read clip 0's once, and training stalled)."""
    tracker = Sam2VideoTracker(tiny.visual_model)
    clips = [_clip(2), [np.ascontiguousarray(f[::-1, ::-1]) for f in _clip(2)]]
    prompts = [_prompt(tiny, 5, 0).prompt, _prompt(tiny, 6, 0).prompt]
    batched = ObjectTrack(1, 0, torch.cat(prompts))
    alone = [ObjectTrack(1, 0, p) for p in prompts]
    with torch.no_grad():
        for t in range(2):
            feats = tracker.frame_features(torch.stack([video_frame_preprocess(c[t], tiny.visual_model.image_size)
                                                        for c in clips]))
            together = tracker.step(feats, batched, t, False, (48, 64))
            for i in range(2):
                single = tracker.step({k: v[i:i + 1] for k, v in feats.items()}, alone[i], t, False, (48, 64))
                torch.testing.assert_close(together.low_res_ungated[i], single.low_res_ungated[0], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(together.object_score[i], single.object_score[0], atol=1e-4, rtol=1e-4)
    # a training clip's last frame: the same mask, no memory entry encoded
    last = tracker.step(feats, batched, 2, False, (48, 64), store_memory=False)
    assert 2 not in batched.non_cond and last.low_res_ungated.shape == together.low_res_ungated.shape


def test_frames_without_the_object_give_empty_masks_and_no_object_pointers(tiny):
    model = build_model("tiny-sam2").eval()
    model.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        model.visual_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(-50.0)
    video = EvfSam2Video(model)
    out = _run(video, _clip(5), [_prompt(model, 5, 0)], "forward")
    assert all(bool((o[1] == NO_OBJ_SCORE).all()) for _, o in out)
    track = video.tracks[0]
    no_obj = model.visual_model.video_memory.no_obj_ptr
    assert all(torch.allclose(e["obj_ptr"], no_obj) for e in [*track.cond.values(), *track.non_cond.values()])


@pytest.mark.slow
def test_memory_is_bounded_by_the_window_not_the_clip(tiny):
    video = EvfSam2Video(tiny)
    frames = _clip(40, 32, 32)
    for _t, _ in video.track(frames, prompts=[_prompt(tiny, 6, 0)], direction="forward"):
        track = video.tracks[0]
        kept = sorted(track.non_cond)
        assert len(kept) <= 2 * 16  # the pointer window behind, plus entries near the prompt frame
    assert max(kept) == 39 and min(kept) < 16  # the newest, and those a backward pass would read


# -- frame sources --------------------------------------------------------------------------------
def test_frame_folder_is_ordered_by_frame_number(tmp_path):
    frames = _clip(3)
    for i, name in enumerate(["2.jpg", "10.jpg", "1.jpg"]):
        Image.fromarray(frames[i]).save(tmp_path / name)
    source = FolderFrames(tmp_path)
    assert [p.name for p in source.files] == ["1.jpg", "2.jpg", "10.jpg"]
    assert source.video_hw == (48, 64) and len(source) == 3
    with pytest.raises(ConfigError, match="no frames"):
        FolderFrames(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_video_file_frames_decode_in_order_and_backwards(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    frames = _clip(6, 48, 64)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    source = as_frame_source(path)
    assert len(source) == 6 and source.video_hw == (48, 64)
    forward = [source.rgb(i).astype(int) for i in range(6)]
    backward = [source.rgb(i).astype(int) for i in range(5, -1, -1)][::-1]
    for i in range(6):
        assert np.array_equal(forward[i], backward[i])
        # the red square moves right by 4 pixels a frame (lossy codec: compare its centre)
        assert forward[i][20, 15 + 4 * i, 0] > 150
    assert json.dumps(source.video_hw)


# -- evfsam-predict-video -------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "evfsam_lightning.cli.predict_video", "--no-progress", *args],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_predict_video_demo_writes_one_indexed_png_per_frame_and_an_overlay(tmp_path):
    pytest.importorskip("av")
    proc = _cli("--demo", "--out", str(tmp_path / "run"), "--text", "the red square", "--text", "the blue circle",
                "--prompt-frame", "3", "--both", "--overlay", str(tmp_path / "overlay.mp4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted((tmp_path / "run" / "masks").glob("*.png"))
    assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(8)]
    img = Image.open(pngs[3])
    assert img.mode == "P" and img.size == (96, 72)
    assert set(np.unique(np.asarray(img))) <= {0, 1, 2}
    assert (tmp_path / "overlay.mp4").stat().st_size > 0
    assert "'the red square': present on" in proc.stdout


def test_predict_video_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = _cli("--checkpoint", str(tmp_path / "nope"), "--video", str(tmp_path / "missing.mp4"),
                "--text", "x", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing.mp4" in proc.stderr
    frames = _empty(tmp_path)
    Image.fromarray(_clip(1)[0]).save(frames / "00000.jpg")
    proc = _cli("--checkpoint", str(tmp_path / "nope"), "--video", str(frames), "--text", "a", "--text", "b",
                "--prompt-frame", "0", "--prompt-frame", "1", "--prompt-frame", "2", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "2 --text but 3 --prompt-frame" in proc.stderr
