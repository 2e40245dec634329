"""evfsam-export: write a checkpoint in the official EVF-SAM layout, and consolidate sharded ones.

    evfsam-export --checkpoint runs/quickstart/checkpoints/step-00002000.ckpt --out exported/quickstart
    evfsam-export --checkpoint runs/big/checkpoints/step-00010000.ckpt --consolidate-only --out full.ckpt

The exported folder (config.json, model.safetensors under the official key names, tokenizer files)
loads in the reference inference code and in `evfsam-predict` / `evfsam-eval`. DeepSpeed and FSDP
checkpoint directories are consolidated first; `--consolidate-only` writes that single-file
checkpoint (loadable without the strategy) instead of exporting. A run directory (`runs/<name>`)
exports its best checkpoint. LoRA fine-tunes are merged into plain weights: the exported folder
is an ordinary EVF-SAM checkpoint.
"""

from __future__ import annotations

import sys
from argparse import RawDescriptionHelpFormatter

from evfsam_lightning.cli.errors import ArgumentParser, checkpoint_input, console_script, output_path

_DTYPES = {"float32": "float32", "fp32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


@console_script("evfsam-export")
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="evfsam-export", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="dtype of the exported weights")
    p.add_argument("--consolidate-only", action="store_true", help="sharded checkpoint -> one .ckpt file")
    args = p.parse_args(argv)
    checkpoint_input(args.checkpoint)
    output_path(args.out, folder=not args.consolidate_only)

    import torch

    from evfsam_lightning.models.checkpoints import export_reference
    from evfsam_lightning.models.lora import merge_lora
    from evfsam_lightning.training.loading import (
        consolidate,
        is_sharded,
        load_for_inference,
        tokenizer_folder,
    )

    if args.consolidate_only:
        if not is_sharded(args.checkpoint):
            p.error(f"{args.checkpoint} is not a DeepSpeed or FSDP checkpoint directory")
        print(f"consolidated -> {consolidate(args.checkpoint, args.out)}")
        return 0
    model, tokenizer = load_for_inference(args.checkpoint)
    merged = merge_lora(model)
    if merged:
        print(f"merged the LoRA updates of {merged} layers into their weights")
    with tokenizer_folder(tokenizer.evfsam_files) as tok_dir:
        out = export_reference(model, args.out, tokenizer_dir=tok_dir, dtype=getattr(torch, _DTYPES[args.dtype]))
    print(f"exported -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
