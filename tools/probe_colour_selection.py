#!/usr/bin/env python
"""Does a tiny model learn to segment the shape a sentence names, through the image path, from scratch?

    python tools/probe_colour_selection.py --model tiny-sam2 --image-size 64 --steps 300 [--lr 1e-3]

The video acceptance test (tests/models/test_video_tracking_acceptance.py) needs a tiny EVF-SAM2 that
reads the colour in a sentence; this probe measures the image half of that alone, on the test's own
frames (frame 0 of `moving_clip`: three shapes of distinct colours, one per band). Every weight trains
(`EvfSam.forward`, the reference mask loss as the test weighs it, AdamW, warm-up 50 steps, linear decay),
8 frames x 3 sentences per step. Every `--every` steps it prints the mean training loss and J on 16
held-out frames x 3 shapes, once with each shape's sentence and once with "the shape" for all three (a
model that ignores the text scores the same on both). One torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evfsam_lightning.data import transforms  # noqa: E402
from evfsam_lightning.data.tokenizer import tokenize  # noqa: E402
from evfsam_lightning.models.builders import build_model, model_config  # noqa: E402
from evfsam_lightning.training.losses import mask_loss  # noqa: E402
from evfsam_lightning.training.video_metrics import region_j  # noqa: E402
from tests.models.test_video_tracking_acceptance import (  # noqa: E402
    CONTROL_TEXT,
    FRAME,
    _tokenizer,
    moving_clip,
    optimizer,
    optimizer_step,
    torch_default_init,
)


def _batch(model, tokenizer, frames: list[np.ndarray], texts_per_frame: list[list[str]]) -> dict:
    sam, resize_hw = zip(*[model.visual_model.preprocess(f) for f in frames], strict=True)
    ids, attn = tokenize(tokenizer, [t for texts in texts_per_frame for t in texts])
    counts = torch.tensor([len(texts) for texts in texts_per_frame])
    return {"sam_pixel_values": torch.stack(sam),
            "beit_pixel_values": torch.stack([transforms.beit3_preprocess(f, model.beit3_image_size) for f in frames]),
            "input_ids": ids, "attention_mask": attn,
            "image_index": torch.arange(len(frames)).repeat_interleave(counts),
            "resize_hw": torch.tensor(resize_hw), "original_hw": torch.tensor([[FRAME, FRAME]] * len(frames))}


@torch.no_grad()
def held_out_j(model, tokenizer) -> tuple[float, float]:
    """Mean J with each shape's sentence, and with the control sentence, on 16 held-out frames."""
    rng = np.random.default_rng(12345)
    aware, blind = [], []
    model.eval()
    for _ in range(16):
        video, masks, texts = moving_clip(rng, 1)
        logits = model(_batch(model, tokenizer, [video[0]], [[*texts, CONTROL_TEXT]])).logits[0]
        for k in range(3):
            aware.append(region_j((logits[k] > 0).numpy(), masks[k][0]))
            blind.append(region_j((logits[3] > 0).numpy(), masks[k][0]))
    model.train()
    return float(np.mean(aware)), float(np.mean(blind))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-sam2", help="named size (models/builders.py)")
    parser.add_argument("--image-size", type=int, default=64, help="SAM input size")
    parser.add_argument("--prompt-dim", type=int, default=None, help="SAM prompt/decoder width (default: the size's)")
    parser.add_argument("--torch-init", action="store_true", help="re-initialise the image encoder with torch's defaults (the video acceptance test's)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=100, help="report every N steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    tokenizer = _tokenizer(Path(tempfile.mkdtemp()))
    cfg = model_config(args.model)
    cfg.sam = dataclasses.replace(cfg.sam, image_size=args.image_size)
    if args.prompt_dim:
        cfg.sam = dataclasses.replace(cfg.sam, prompt_dim=args.prompt_dim)
    model = build_model(cfg).train()
    if args.torch_init:
        for encoder in model.visual_model.image_encoder():
            torch_default_init(encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = args.steps
    opt, sched = optimizer(params, args.lr, steps, warmup=50)
    rng = np.random.default_rng(args.seed)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        clips = [moving_clip(rng, 1) for _ in range(8)]
        out = model(_batch(model, tokenizer, [video[0] for video, _, _ in clips], [texts for _, _, texts in clips]))
        targets = [torch.from_numpy(np.stack([m[0] for m in masks])).to(torch.uint8) for _, masks, _ in clips]
        loss = mask_loss(out.logits, targets, bce_weight=0.5, dice_weight=2.0)["loss"]
        losses.append(optimizer_step(loss, opt, sched, params))
        if (step + 1) % args.every == 0 or step + 1 == steps:
            aware, blind = held_out_j(model, tokenizer)
            print(f"{args.model}@{args.image_size} step {step + 1}: loss {np.mean(losses[-args.every:]):.3f}, "
                  f"J with the sentence {aware:.3f}, with {CONTROL_TEXT!r} {blind:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
