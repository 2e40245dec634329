"""Acceptance (issue 18): a trained tiny EVF-SAM2 tracks the shape a sentence names through a clip where
several of the quickstart's shapes move, with J&F clearly above a text-blind control.

The released EVF-SAM2 tracks with SAM-2's memory modules as Meta trained them on video; a tiny SAM-2 has
no such weights, so the test trains its memory path too: on clips of moving shapes, the text prompts
frame 0 through BEiT-3 (the image path) and the next frame is tracked through the memory, with the
project's mask loss on every frame (plus the object score: SAM-2 gates out objects it scores absent) and
the image encoder frozen. The trained model then tracks held-out
6-frame clips through `EvfSam2Video.track` (what `evfsam-predict-video` runs), once with each clip's
sentence and once with one constant sentence (the control: the same model, blind to which shape is
meant), and J&F (training/video_metrics.py) is compared. Not reached within the CI budget yet: opt-in
(see the skip reason and BENCHMARKS.md).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from evfsam_lightning.data.sources.synthetic import COLOURS, SHAPES, shape_mask

FRAME = 48  # clip frames (FRAME x FRAME); the model reads them at its SAM-2 input size
IMAGE_SIZE = 64  # tiny-sam2 at 64: a 4x4 stride-16 grid, 16x16 low-res masks
CONTROL_TEXT = "the shape"
LR = 5e-3


def moving_clip(rng: np.random.Generator, frames: int) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Three shapes of distinct colours, one per horizontal band, each moving sideways at its own speed
    (bouncing off the edges). Returns frames (T, H, W, 3) uint8, per shape its masks (T, H, W) bool, and
    per shape a sentence naming it by colour."""
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=3, replace=False)]
    shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=3)]
    band = FRAME / 3
    r = [float(rng.uniform(0.42, 0.5) * band) for _ in range(3)]
    x0 = [float(rng.uniform(r[i] + 1, FRAME - r[i] - 1)) for i in range(3)]
    speed = [float(rng.choice([-1, 1]) * rng.uniform(2.0, 5.0)) for _ in range(3)]
    background = int(rng.integers(25, 115))
    video = np.full((frames, FRAME, FRAME, 3), background, dtype=np.uint8)
    masks = [np.zeros((frames, FRAME, FRAME), dtype=bool) for _ in range(3)]
    for t in range(frames):
        for i in range(3):
            lo, hi = r[i] + 1, FRAME - r[i] - 1
            p = (x0[i] - lo + speed[i] * t) % (2 * (hi - lo))  # bouncing off the edges
            x = lo + (p if p <= hi - lo else 2 * (hi - lo) - p)
            m = shape_mask(shapes[i], x, band * (i + 0.5), r[i], FRAME)
            video[t][m] = COLOURS[colours[i]]
            masks[i][t] = m
    templates = ("the {c} {s}", "the {c} one", "the {c} shape", "the {c} object")
    texts = [templates[int(rng.integers(len(templates)))].format(c=c, s=s) for c, s in zip(colours, shapes, strict=True)]
    return video, masks, texts


def _tokenizer(folder):
    from evfsam_lightning.data.tokenizer import build_tokenizer, load_tokenizer

    sentences = [f"the {c} {w}" for c in COLOURS for w in (*SHAPES, "one", "shape", "object")] + [CONTROL_TEXT]
    return load_tokenizer(build_tokenizer(sentences * 4, folder, vocab_size=64))


def _model():
    import dataclasses

    from evfsam_lightning.models.builders import build_model, model_config

    cfg = model_config("tiny-sam2")
    cfg.sam = dataclasses.replace(cfg.sam, image_size=IMAGE_SIZE)
    return build_model(cfg)


def optimizer(params, lr: float, steps: int, warmup: int):
    """AdamW with linear warmup over `warmup` steps, then linear decay to 0 at `steps`."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / (steps + 1)))


def optimizer_step(loss: torch.Tensor, opt, sched, params) -> float:
    """One step on `loss` with the gradient norm clipped to 1; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())


def train_tracker(model, tokenizer, steps: int, batch: int = 4, clip_frames: int = 3, seed: int = 0) -> list[float]:
    """Train `model` on random clips: text on frame 0, memory tracking on the next frames."""
    import torch.nn.functional as F

    from evfsam_lightning.data import transforms
    from evfsam_lightning.data.tokenizer import tokenize
    from evfsam_lightning.models.sam2_video import ObjectTrack, Sam2VideoTracker, video_frame_preprocess
    from evfsam_lightning.training.losses import mask_loss

    model.train()
    model.visual_model.vision_encoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optimizer(params, LR, steps, warmup=20)
    tracker = Sam2VideoTracker(model.visual_model)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        # every shape of every clip is one object (as the quickstart's several expressions per image):
        # the same frames with different sentences must give different masks
        clips = [moving_clip(rng, clip_frames) for _ in range(batch)]
        texts = [text for _, _, clip_texts in clips for text in clip_texts]
        ids, attn = tokenize(tokenizer, texts)
        beit = torch.stack([transforms.beit3_preprocess(video[0], model.beit3_image_size)
                            for video, _, clip_texts in clips for _ in clip_texts])
        track = ObjectTrack(1, 0, model.prompt_embeddings(beit, ids, attn))
        logits, targets, scores = [], [], []
        for t in range(clip_frames):
            pixels = torch.stack([video_frame_preprocess(video[t], IMAGE_SIZE) for video, _, _ in clips])
            feats = {k: v.repeat_interleave(3, dim=0) for k, v in tracker.frame_features(pixels).items()}
            r = tracker.step(feats, track, t, False, (FRAME, FRAME))
            logits.append(F.interpolate(r.low_res, size=(FRAME, FRAME), mode="bilinear", align_corners=False)[:, 0])
            targets.append(torch.from_numpy(np.stack([m[t] for _, masks, _ in clips for m in masks])).to(torch.uint8))
            scores.append(r.object_score)
        # SAM-2 gates the masks of an object it scores absent (logits -1024, no gradient): the score learns
        # that the named shape is present on every frame; the gated logits are clamped out of the loss.
        present = F.binary_cross_entropy_with_logits(torch.cat(scores), torch.ones_like(torch.cat(scores)))
        loss = mask_loss([lg.clamp_min(-20) for lg in logits], targets, bce_weight=0.5, dice_weight=2.0)["loss"] + present
        losses.append(optimizer_step(loss, opt, sched, params))
    model.eval()
    return losses


def track_jf(model, tokenizer, clips, text_of) -> float:
    """Mean J&F over clips of tracking the sentence `text_of(clip)` from frame 0, forward."""
    from evfsam_lightning.models.sam2_video import EvfSam2Video
    from evfsam_lightning.training.video_metrics import boundary_f, region_j

    video_model = EvfSam2Video(model, tokenizer)
    scores = []
    for clip in clips:
        video, target, _ = clip
        js, fs = [], []
        for t, logits in video_model.track(list(video), [text_of(clip)], 0, direction="forward"):
            pred = (logits[1] > 0).numpy()
            js.append(region_j(pred, target[t]))
            fs.append(boundary_f(pred, target[t]))
        scores.append((np.mean(js) + np.mean(fs)) / 2)
    return float(np.mean(scores))


ACCEPTANCE_ENV = "EVFSAM_VIDEO_ACCEPTANCE"


@pytest.mark.slow
def test_training_through_the_tracker_updates_the_prompt_and_memory_path(tmp_path):
    """Two steps of `train_tracker`: gradients reach BEiT-3, the projector, the decoder and the memory
    modules through a tracked frame, the frozen image encoder stays bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tokenizer = _tokenizer(tmp_path / "tokenizer")
        model = _model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = train_tracker(model, tokenizer, steps=2, batch=2, clip_frames=2)
    finally:
        torch.set_num_threads(threads)
    assert all(np.isfinite(losses))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for prefix in ("mm_extractor.", "text_hidden_fcs.", "visual_model.mask_decoder.",
                   "visual_model.video_memory.memory_attention.", "visual_model.video_memory.memory_encoder."):
        assert any(n.startswith(prefix) for n in changed), prefix
    assert not any(n.startswith("visual_model.vision_encoder.") for n in changed)


def test_moving_clip_masks_are_the_named_shapes_and_they_move():
    video, masks, texts = moving_clip(np.random.default_rng(3), 6)
    assert video.shape == (6, FRAME, FRAME, 3) and len(masks) == len(texts) == 3
    for mask, text in zip(masks, texts, strict=True):
        colour = COLOURS[text.split()[1]]
        assert all(mask[t].sum() > 40 and (video[t][mask[t]] == colour).all() for t in range(6))
        assert not np.array_equal(mask[0], mask[-1])  # it moves
    assert not (masks[0] & masks[1]).any() and not (masks[1] & masks[2]).any()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get(ACCEPTANCE_ENV) != "1", reason=(
    f"opt-in ({ACCEPTANCE_ENV}=1, steps from {ACCEPTANCE_ENV}_STEPS): trained from scratch within the CI "
    "budget (300 steps, about 120 s here) the tiny EVF-SAM2 learns foreground but not yet the sentence "
    "(J&F 0.226 with the text = 0.226 blind): at SAM-2 input 64 the tiny SAM-2 learns no colour selection "
    "in 300 steps even through the image path (the tiny SAM-1 does in 200-300); at 128 the image path starts "
    "to, training through the tracker's prompt frame does not yet; see BENCHMARKS.md"))
def test_trained_tiny_evfsam2_tracks_the_named_shape_better_than_a_text_blind_control(tmp_path):
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: on a shared CPU a second thread mostly waits (10x slower here)
    try:
        torch.manual_seed(0)
        tokenizer = _tokenizer(tmp_path / "tokenizer")
        model = _model()
        steps = int(os.environ.get(f"{ACCEPTANCE_ENV}_STEPS", "300"))
        losses = train_tracker(model, tokenizer, steps=steps, batch=2, clip_frames=2)
        trained = time.perf_counter() - start
        rng = np.random.default_rng(12345)
        clips = []
        for _ in range(8):
            video, masks, texts = moving_clip(rng, 6)
            k = int(rng.integers(3))
            clips.append((video, masks[k], texts[k]))
        text_aware = track_jf(model, tokenizer, clips, lambda c: c[2])
        blind = track_jf(model, tokenizer, clips, lambda c: CONTROL_TEXT)
    finally:
        torch.set_num_threads(threads)
    curve = [round(float(np.mean(losses[i:i + 25])), 2) for i in range(0, len(losses), 25)]
    print(f"\nloss per 25 steps {curve}\nJ&F text-aware {text_aware:.3f}, text-blind control {blind:.3f}; "
          f"{steps} steps, training {trained:.1f} s, total {time.perf_counter() - start:.1f} s")
    assert text_aware > blind + 0.2
    assert text_aware > 0.5
