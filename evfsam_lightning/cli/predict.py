"""evfsam-predict: segment what a sentence refers to in one image.

    evfsam-predict --checkpoint CHECKPOINT --image photo.jpg --text "the dog on the left" \
        --out mask.png [--overlay overlay.png]
    evfsam-predict --demo --out demo/mask.png     # tiny random model on a generated image, no files needed

CHECKPOINT is an evfsam-train checkpoint (`.ckpt`, or a DeepSpeed/FSDP directory) or an EVF-SAM
folder in the official layout (config.json, model.safetensors or pytorch_model.bin,
sentencepiece.bpe.model), as released or as written by evfsam-export.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEMO_TEXT = "the red circle"


def _demo_checkpoint(folder: Path) -> tuple[Path, np.ndarray]:
    """A tiny randomly initialised model exported in the official layout, and a generated image."""
    from evfsam_lightning.data.tokenizer import build_tokenizer
    from evfsam_lightning.models.builders import build_model
    from evfsam_lightning.models.checkpoints import export_reference

    torch.manual_seed(0)
    tok_dir = build_tokenizer([DEMO_TEXT, "the blue square", "the green triangle on the left"] * 10,
                              folder / "tokenizer", vocab_size=48)
    ckpt = export_reference(build_model("tiny"), folder / "tiny-random", tokenizer_dir=tok_dir)
    yy, xx = np.mgrid[:96, :128]
    image = np.full((96, 128, 3), 235, dtype=np.uint8)
    image[(yy - 48) ** 2 + (xx - 40) ** 2 < 20**2] = (220, 30, 30)
    image[30:70, 80:115] = (30, 60, 220)
    return ckpt, image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evfsam-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="training checkpoint or EVF-SAM folder")
    p.add_argument("--image", help="input image (any format Pillow reads)")
    p.add_argument("--text", help="the referring expression")
    p.add_argument("--out", required=True, help="where to write the binary mask (PNG, 0/255)")
    p.add_argument("--overlay", help="also write the image with the mask drawn over it")
    p.add_argument("--logits", help="also save the raw logits (.npy)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--demo", action="store_true", help="tiny random model + generated image (smoke test)")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.demo:
        ckpt, image = _demo_checkpoint(out.parent / "demo_checkpoint")
        text = args.text or DEMO_TEXT
    else:
        missing = [f"--{n}" for n in ("checkpoint", "image", "text") if not getattr(args, n)]
        if missing:
            p.error(f"missing {', '.join(missing)} (or use --demo)")
        ckpt, text = args.checkpoint, args.text
        try:
            image = np.asarray(Image.open(args.image).convert("RGB"))
        except OSError as e:
            p.error(f"cannot read image {args.image}: {e}")
    from evfsam_lightning.config import ConfigError
    from evfsam_lightning.training.loading import load_for_inference

    try:  # a Hub id that cannot be resolved (offline, unknown repository) is a user error
        model, tokenizer = load_for_inference(ckpt, args.device)
    except ConfigError as e:
        print(f"evfsam-predict: error: {e}", file=sys.stderr)
        return 2
    logits = model.predict(image, text, tokenizer).float().cpu()
    mask = (logits > 0).numpy()
    Image.fromarray(mask.astype(np.uint8) * 255).save(out)
    if args.overlay:
        from evfsam_lightning.training.visualize import overlay

        Image.fromarray(overlay(image, mask)).save(args.overlay)
    if args.logits:
        np.save(args.logits, logits.numpy())
    print(f"{text!r}: {int(mask.sum())} of {mask.size} pixels ({mask.mean():.1%}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
