"""Seeded random full-size weights and tokenizer in the released file formats, for the full-size
smoke test (tests/models/test_full_size.py) and benchmarks, without downloading anything:

- `sam_vit_h_4b8939.pth`: SAM's own plain state dict (`image_encoder.*`, `prompt_encoder.*`,
  `mask_decoder.*`), as segment-anything ships it;
- `beit3_large_patch16_224.pth`: `{"model": {"beit3.*": ...}}`, as BEiT-3 ships it;
- `beit3_tokenizer/`: `sentencepiece.bpe.model` with 64000 pieces, so that the XLM-R tokenizer has
  64002 entries (`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, pieces from 4, `<mask>` 64001), and
  `added_tokens.json` with `[semantic]` = 64002: the released layout inside the 64010-row table.

The weights are drawn cheaply (the model is built on the meta device, then every tensor is filled
from one seeded generator: matrices ~ N(0, 1/fan_in), norms 1, biases 0), which takes seconds where
the modules' own initialisation of 1.3B parameters takes minutes.

    python -m evfsam_lightning.testing.fullsize OUT_DIR [--size evf-sam] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

SAM_FILE = "sam_vit_h_4b8939.pth"
BEIT3_FILE = "beit3_large_patch16_224.pth"
TOKENIZER_DIR = "beit3_tokenizer"
#: sentencepiece pieces of BEiT-3's `beit3.spm` (XLM-R's layout adds 4 specials around them, minus <unk>'s slot).
SPM_PIECES = 64000


@torch.no_grad()
def seeded_model(size: str = "evf-sam", seed: int = 0):
    """An `EvfSam` of `size` with seeded random weights, built without running its initialisers."""
    from evfsam_lightning.models.builders import build_model

    model = build_model(size, device="meta").to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point():
            continue
        if t.dim() >= 2:
            t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]), generator=g)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.fill_(1.0)
    return model


def write_released_weights(model, out_dir: str | Path) -> tuple[Path, Path]:
    """SAM and BEiT-3 parts of `model` as `sam_vit_h_*.pth` and BEiT-3 `.pth` files (their own layouts)."""
    from evfsam_lightning.models.checkpoints import to_reference

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = to_reference(model, model.state_dict())
    sam = {k[len("visual_model."):]: v for k, v in state.items() if k.startswith("visual_model.")}
    beit3 = {k[len("mm_extractor."):]: v for k, v in state.items() if k.startswith("mm_extractor.")}
    torch.save(sam, out_dir / SAM_FILE)
    torch.save({"model": beit3}, out_dir / BEIT3_FILE)
    return out_dir / SAM_FILE, out_dir / BEIT3_FILE


def write_released_tokenizer(out_dir: str | Path, sentences: list[str] | None = None) -> Path:
    """A tokenizer folder with the released vocabulary's layout (see the module docstring): a small
    sentencepiece model trained on `sentences`, padded with never-used pieces to 64000."""
    from sentencepiece import sentencepiece_model_pb2

    from evfsam_lightning.data.tokenizer import SEMANTIC_TOKEN, SPM_FILE, build_tokenizer, load_tokenizer

    out_dir = Path(out_dir)
    sentences = sentences or [f"the {c} {s} on the {w}" for c in ("red", "blue", "green", "small", "large")
                              for s in ("circle", "square", "man", "dog", "car") for w in ("left", "right", "top")]
    build_tokenizer(sentences, out_dir, vocab_size=128)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((out_dir / SPM_FILE).read_bytes())
    known = {p.piece for p in proto.pieces}
    lowest = min(p.score for p in proto.pieces) - 1.0
    i = 0
    while len(proto.pieces) < SPM_PIECES:  # never chosen over the trained pieces: they score lowest
        piece, i = f"\u2581filler{i:05d}", i + 1
        if piece not in known:
            proto.pieces.add(piece=piece, score=lowest)
    (out_dir / SPM_FILE).write_bytes(proto.SerializeToString())
    (out_dir / "added_tokens.json").unlink(missing_ok=True)
    tok = load_tokenizer(out_dir)
    tok.add_tokens([SEMANTIC_TOKEN], special_tokens=True)
    (out_dir / "added_tokens.json").write_text(f'{{"{SEMANTIC_TOKEN}": {tok.convert_tokens_to_ids(SEMANTIC_TOKEN)}}}')
    return out_dir


def write_released_files(out_dir: str | Path, size: str = "evf-sam", seed: int = 0) -> dict[str, Path]:
    """All three (see the module docstring) under `out_dir`; returns their paths by recipe key."""
    out_dir = Path(out_dir)
    sam, beit3 = write_released_weights(seeded_model(size, seed), out_dir)
    tokenizer = write_released_tokenizer(out_dir / TOKENIZER_DIR)
    return {"model.sam_checkpoint": sam, "model.beit3_checkpoint": beit3, "model.tokenizer": tokenizer}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evfsam_lightning.testing.fullsize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--size", default="evf-sam")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, path in write_released_files(args.out_dir, args.size, args.seed).items():
        print(f"{key}={path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
