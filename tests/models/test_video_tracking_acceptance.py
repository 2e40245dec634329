"""Acceptance (issue 18): a trained tiny EVF-SAM2 tracks the shape a sentence names through a clip where
several of the quickstart's shapes move, with J&F clearly above a text-blind control.

The model is a test-local `tiny-sam2` (SAM-2 input 128, decoder width 64, BEiT-3 input 64, the image encoder
at torch's default init). A tiny SAM-2 has no trained weights, so the test trains every part it runs,
through the tracker (`Sam2VideoTracker.step`, the code `evfsam-predict-video` runs), in two phases on
clips of moving shapes:
1. the prompt frame alone (text through BEiT-3, the same computation as the image path `EvfSam.forward`
   on the frames as the tracker preprocesses them), every weight trained: the model learns to segment
   the shape the sentence names;
2. the prompt frame and the next one, tracked through the memory, with the image encoder, BEiT-3 and the
   projector frozen: the memory modules and the decoder learn to carry that mask to the next frame.
The mask loss is the project's, on the decoder's masks before the object-score gating (a gated mask is a
constant); the object score learns that the named shape is present. The trained model then tracks
held-out 6-frame clips through `EvfSam2Video.track`, once with each clip's sentence and once with one
constant sentence (the control: the same model, blind to which shape is meant), and J&F
(training/video_metrics.py) is compared. Figures (four seeds) in BENCHMARKS.md, "Video acceptance".
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from evfsam_lightning.data.sources.synthetic import COLOURS, SHAPES, shape_mask
from tests.conftest import one_torch_thread

FRAME = 48  # clip frames (FRAME x FRAME); the model reads them at its SAM-2 input size
IMAGE_SIZE = 128  # tiny-sam2 at 128: an 8x8 stride-16 grid (at 64 its 4x4 grid learns no colour selection)
BEIT3_SIZE = 64  # BEiT-3 reads the frame at 64 (16 patches): half the cost of a step at its 128
PROMPT_DIM = 64  # tiny-sam2's 32 gives the decoder 4-channel mask features; 64 gives 8, as the tiny SAM-1's
CONTROL_TEXT = "the shape"
#: (steps, learning rate, clips per step, frames per clip) of the two training phases
PROMPT_PHASE = (250, 2e-3, 8, 1)
MEMORY_PHASE = (150, 5e-3, 4, 2)
#: frozen in the memory phase: what phase 1 taught to read the sentence stays as it is
MEMORY_PHASE_FROZEN = ("visual_model.vision_encoder.", "mm_extractor.", "text_hidden_fcs.")


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
    cfg.sam = dataclasses.replace(cfg.sam, image_size=IMAGE_SIZE, prompt_dim=PROMPT_DIM)
    cfg.beit3 = dataclasses.replace(cfg.beit3, image_size=BEIT3_SIZE)
    model = build_model(cfg)
    torch_default_init(model.visual_model.vision_encoder)
    return model


def torch_default_init(module: torch.nn.Module) -> None:
    """Re-initialise every layer of `module` with torch's defaults: transformers' std-0.02 init leaves a
    random Hiera's features at ~0.02 beside position encodings of ~0.5, the colours all but invisible."""
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


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


def train_tracker(model, tokenizer, steps: int, lr: float, batch: int, clip_frames: int,
                  frozen: tuple[str, ...] = (), seed: int = 0) -> list[float]:
    """Train `model` on random clips through the tracker: text on frame 0, memory tracking on the next
    `clip_frames - 1` frames; parameters whose names start with a `frozen` prefix stay fixed."""
    import torch.nn.functional as F

    from evfsam_lightning.data import transforms
    from evfsam_lightning.data.tokenizer import tokenize
    from evfsam_lightning.models.sam2_video import ObjectTrack, Sam2VideoTracker, video_frame_preprocess
    from evfsam_lightning.training.losses import mask_loss

    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optimizer(params, lr, steps, warmup=min(50, steps // 4 + 1))
    tracker = Sam2VideoTracker(model.visual_model)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        # every shape of every clip is one object (as the quickstart's several expressions per image):
        # the same frames with different sentences must give different masks
        clips = [moving_clip(rng, clip_frames) for _ in range(batch)]
        texts = [text for _, _, clip_texts in clips for text in clip_texts]
        ids, attn = tokenize(tokenizer, texts)
        beit = torch.stack([transforms.beit3_preprocess(video[0], model.beit3_image_size) for video, _, _ in clips])
        track = ObjectTrack(1, 0, model.prompt_embeddings(beit.repeat_interleave(3, dim=0), ids, attn))
        logits, targets, scores = [], [], []
        for t in range(clip_frames):
            pixels = torch.stack([video_frame_preprocess(video[t], IMAGE_SIZE) for video, _, _ in clips])
            feats = {k: v.repeat_interleave(3, dim=0) for k, v in tracker.frame_features(pixels).items()}
            # the clip's last frame has no next frame to remember it for
            r = tracker.step(feats, track, t, False, (FRAME, FRAME), store_memory=t + 1 < clip_frames)
            logits.append(F.interpolate(r.low_res_ungated, size=(FRAME, FRAME), mode="bilinear",
                                        align_corners=False)[:, 0])
            targets.append(torch.from_numpy(np.stack([m[t] for _, masks, _ in clips for m in masks])).to(torch.uint8))
            scores.append(r.object_score)
        # the tracker empties the mask of an object it scores absent: the score learns the named shape is there
        score = torch.cat(scores)
        present = F.binary_cross_entropy_with_logits(score, torch.ones_like(score))
        loss = mask_loss(logits, targets, bce_weight=0.5, dice_weight=2.0)["loss"] + present
        losses.append(optimizer_step(loss, opt, sched, params))
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses


def train_and_track(folder, seed: int = 0, clips: int = 8) -> dict:
    """Both training phases from a fresh model (`seed`), then J&F on `clips` held-out 6-frame clips with
    each clip's sentence and with the control sentence. One torch thread."""
    start = time.perf_counter()
    with one_torch_thread():
        torch.manual_seed(seed)
        tokenizer = _tokenizer(folder)
        model = _model()
        prompt_losses = train_tracker(model, tokenizer, *PROMPT_PHASE, seed=seed)
        memory_losses = train_tracker(model, tokenizer, *MEMORY_PHASE, frozen=MEMORY_PHASE_FROZEN, seed=seed + 1)
        trained = time.perf_counter() - start
        rng = np.random.default_rng(12345)
        held_out = []
        for _ in range(clips):
            video, masks, texts = moving_clip(rng, 6)
            k = int(rng.integers(3))
            held_out.append((video, masks[k], texts[k]))
        text_aware = track_jf(model, tokenizer, held_out, lambda c: c[2])
        blind = track_jf(model, tokenizer, held_out, lambda c: CONTROL_TEXT)
    return {"text_aware": text_aware, "blind": blind, "prompt_losses": prompt_losses,
            "memory_losses": memory_losses, "trained_s": trained, "total_s": time.perf_counter() - start}


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


@pytest.mark.slow
def test_training_through_the_tracker_updates_the_prompt_and_memory_path(tmp_path):
    """Two steps of `train_tracker`: gradients reach BEiT-3, the projector, the decoder and the memory
    modules through a tracked frame, the frozen image encoder stays bit-identical."""
    with one_torch_thread():
        torch.manual_seed(0)
        tokenizer = _tokenizer(tmp_path / "tokenizer")
        model = _model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = train_tracker(model, tokenizer, steps=2, lr=MEMORY_PHASE[1], batch=2, clip_frames=2,
                               frozen=("visual_model.vision_encoder.",))
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
def test_trained_tiny_evfsam2_tracks_the_named_shape_better_than_a_text_blind_control(tmp_path):
    """J&F with the sentence above 0.5 and more than 0.1 above the control's. Seeds 0-3 gave 0.54-0.78 and
    gaps 0.125-0.51 (this seed 0.651, gap 0.263; BENCHMARKS.md); a tracker blind to the text has a gap of 0."""
    r = train_and_track(tmp_path / "tokenizer")
    curves = {phase: [round(float(np.mean(r[phase][i:i + 25])), 2) for i in range(0, len(r[phase]), 25)]
              for phase in ("prompt_losses", "memory_losses")}
    print(f"\nloss per 25 steps {curves}\nJ&F text-aware {r['text_aware']:.3f}, text-blind control "
          f"{r['blind']:.3f}; training {r['trained_s']:.1f} s, total {r['total_s']:.1f} s")
    assert r["text_aware"] > r["blind"] + 0.1
    assert r["text_aware"] > 0.5
