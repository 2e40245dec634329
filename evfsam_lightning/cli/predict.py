"""evfsam-predict: segment what a sentence refers to in one image.

    evfsam-predict --checkpoint CHECKPOINT --image photo.jpg --text "the dog on the left" \
        --out mask.png [--overlay overlay.png]
    evfsam-predict --demo --out demo/mask.png     # tiny random model on a generated image, no files needed

CHECKPOINT is an evfsam-train checkpoint (`.ckpt`, or a DeepSpeed/FSDP directory) or an EVF-SAM
folder in the official layout (config.json, model.safetensors or pytorch_model.bin,
sentencepiece.bpe.model), as released or as written by evfsam-export.
"""

from __future__ import annotations

import sys
from argparse import RawDescriptionHelpFormatter
from pathlib import Path

import numpy as np

from evfsam_lightning.cli.errors import (
    ArgumentParser,
    UserError,
    checkpoint_input,
    console_script,
    existing_path,
)

DEMO_TEXT = "the red circle"


def _demo_checkpoint(folder: Path) -> tuple[Path, np.ndarray]:
    """A tiny randomly initialised model exported in the official layout, and a generated image."""
    import torch

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


def _read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from evfsam_lightning.data.schema import image_to_rgb

    existing_path(path, "--image")
    try:
        with Image.open(path) as im:
            return image_to_rgb(im)
    except (UnidentifiedImageError, ValueError, OSError) as e:
        raise UserError(f"--image {path}: cannot read the image ({str(e).splitlines()[0]})") from None


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
            raise UserError(f"--device {device}: {build} (use --device cpu)")
    elif device not in ("cpu", "mps"):
        raise UserError(f"--device {device!r} is not a device (use cpu or cuda[:N])")


@console_script("evfsam-predict")
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="evfsam-predict", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="training checkpoint or EVF-SAM folder")
    p.add_argument("--image", help="input image (any format Pillow reads)")
    p.add_argument("--text", help="the referring expression")
    p.add_argument("--out", required=True, help="where to write the binary mask (PNG, 0/255)")
    p.add_argument("--overlay", help="also write the image with the mask drawn over it")
    p.add_argument("--logits", help="also save the raw logits (.npy)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    p.add_argument("--demo", action="store_true", help="tiny random model + generated image (smoke test)")
    p.add_argument("--presence-threshold", type=float, default=None,
                   help="with a presence head: 'no target' (empty mask) below this presence probability "
                        "(default: the one stored with the checkpoint)")
    args = p.parse_args(argv)
    if args.presence_threshold is not None and not 0 <= args.presence_threshold <= 1:
        raise UserError(f"--presence-threshold {args.presence_threshold} must be in [0, 1]")

    if args.text is not None and not args.text.strip():
        raise UserError("--text is empty (give the referring expression, e.g. --text \"the dog on the left\")")
    if not args.demo:
        missing = [f"--{n}" for n in ("checkpoint", "image", "text") if not getattr(args, n)]
        if missing:
            p.error(f"missing {', '.join(missing)} (or use --demo)")
        checkpoint_input(args.checkpoint)
        image = _read_image(args.image)
    out = Path(args.out)
    for target in filter(None, (args.out, args.overlay, args.logits)):
        if Path(target).is_dir():
            raise UserError(f"{target} is a directory: give a file name to write")
        try:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. a part of the path is an existing file
            raise UserError(f"{target}: cannot create its folder ({e.strerror}, {e.filename})") from None
    import torch
    from PIL import Image

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    if args.demo:
        ckpt, image = _demo_checkpoint(out.parent / "demo_checkpoint")
        text = args.text or DEMO_TEXT
    else:
        ckpt, text = args.checkpoint, args.text.strip()
    from evfsam_lightning.training.loading import load_for_inference

    model, tokenizer = load_for_inference(ckpt, device)
    if args.presence_threshold is not None:
        if model.presence_head is None:
            raise UserError(f"--presence-threshold: {ckpt} has no presence head (train with model.presence_head=true)")
        model.presence_head.threshold.fill_(args.presence_threshold)
    logits, score = model.predict(image, text, tokenizer, return_presence=True)
    logits = logits.float().cpu()
    mask = (logits > 0).numpy()
    Image.fromarray(mask.astype(np.uint8) * 255).save(out)
    if args.overlay:
        from evfsam_lightning.training.visualize import overlay

        Image.fromarray(overlay(image, mask)).save(args.overlay)
    if args.logits:
        np.save(args.logits, logits.numpy())
    if score is not None and score < float(model.presence_head.threshold):
        print(f"{text!r}: no target (presence {score:.3f} < threshold {float(model.presence_head.threshold):.3f}): "
              f"empty mask -> {out}")
        return 0
    presence = f", presence {score:.3f}" if score is not None else ""
    print(f"{text!r}: {int(mask.sum())} of {mask.size} pixels ({mask.mean():.1%}){presence} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
