"""evfsam-export: write a checkpoint in the official EVF-SAM layout, and consolidate sharded ones.

    evfsam-export --checkpoint runs/quickstart/checkpoints/step-00002000.ckpt --out exported/quickstart
    evfsam-export --checkpoint runs/big/checkpoints/step-00010000.ckpt --consolidate-only --out full.ckpt
    evfsam-export --checkpoint runs/mine --out exported/mine --push-to-hub me/evf-sam-mine [--private] [--dry-run]
    evfsam-export --checkpoint exported/quickstart --format onnx --out exported/quickstart-onnx

The exported folder (config.json, model.safetensors under the official key names, tokenizer files,
and a model card README.md with the Hub's metadata and the evaluation results found in the run)
loads in the reference inference code and in `evfsam-predict` / `evfsam-eval`. DeepSpeed and FSDP
checkpoint directories are consolidated first; `--consolidate-only` writes that single-file
checkpoint (loadable without the strategy) instead of exporting. A run directory (`runs/<name>`)
exports its best checkpoint. LoRA fine-tunes are merged into plain weights: the exported folder
is an ordinary EVF-SAM checkpoint.
"""

from __future__ import annotations

import sys
from argparse import RawDescriptionHelpFormatter
from pathlib import Path

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
    p.add_argument("--license", default="apache-2.0", help="license in the model card (README.md) written beside "
                   "the weights")
    p.add_argument("--results", nargs="+", default=[], metavar="JSON", help="evfsam-eval --out files for the model "
                   "card's results, besides those found in the checkpoint's run directory")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the exported folder to this Hub repository "
                   "(created if absent; token from HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--dry-run", action="store_true", help="with --push-to-hub: list what would be uploaded, send nothing")
    p.add_argument("--format", default="official", choices=["official", "onnx"],
                   help="official: the EVF-SAM folder layout; onnx: image_encoder.onnx + text_decoder.onnx "
                        "with the tokenizer, for evfsam_lightning.deploy.onnx.OnnxPredictor (float32)")
    args = p.parse_args(argv)
    if args.format == "onnx" and _DTYPES[args.dtype] != "float32":
        p.error("--dtype applies to the official layout; the ONNX graphs are exported in float32")
    if args.format == "onnx" and args.push_to_hub:
        p.error("--push-to-hub uploads the official layout; export that (without --format onnx) to push")
    from evfsam_lightning.hub import parse_hub_id

    missing = [f for f in args.results if not Path(f).is_file()]
    if missing:
        p.error(f"--results: no such file {missing[0]}")
    if (args.private or args.dry_run) and not args.push_to_hub:
        p.error("--private and --dry-run go with --push-to-hub ORG/NAME")
    if args.push_to_hub and (parse_hub_id(args.push_to_hub) is None or "@" in args.push_to_hub):
        p.error(f"--push-to-hub {args.push_to_hub!r}: expected a Hub repository id ORG/NAME")
    checkpoint_input(args.checkpoint)
    output_path(args.out, folder=not args.consolidate_only)

    import torch

    from evfsam_lightning.hub import model_card, push_folder
    from evfsam_lightning.models.checkpoints import export_reference
    from evfsam_lightning.models.lora import merge_lora
    from evfsam_lightning.training.loading import (
        consolidate,
        is_sharded,
        load_for_inference,
        tokenizer_folder,
        verify_if_marked,
    )

    if args.consolidate_only:
        if not is_sharded(args.checkpoint):
            p.error(f"{args.checkpoint} is not a DeepSpeed or FSDP checkpoint directory")
        verify_if_marked(args.checkpoint)
        print(f"consolidated -> {consolidate(args.checkpoint, args.out)}")
        return 0
    if args.format == "onnx":
        from evfsam_lightning.deploy.onnx import check_export_available

        check_export_available()  # a missing extra is a config error before the model is loaded
    model, tokenizer = load_for_inference(args.checkpoint)
    merged = merge_lora(model)
    if merged:
        print(f"merged the LoRA updates of {merged} layers into their weights")
    if args.format == "onnx":
        return _export_onnx(model, tokenizer, args.out)
    with tokenizer_folder(tokenizer.evfsam_files) as tok_dir:
        card = model_card(args.checkpoint, Path(args.out).name, license=args.license, results=args.results,
                          repo_id=args.push_to_hub)
        out = export_reference(model, args.out, tokenizer_dir=tok_dir, dtype=getattr(torch, _DTYPES[args.dtype]),
                               extra_files={"README.md": str(card)})
    print(f"exported -> {out} (with a model card, README.md)")
    if args.push_to_hub:
        files = push_folder(out, args.push_to_hub, private=args.private, dry_run=args.dry_run)
        verb = "would upload" if args.dry_run else "uploaded"
        print(f"{verb} to https://huggingface.co/{args.push_to_hub}{' (private)' if args.private else ''}:")
        print("\n".join(f"  {f}" for f in files))
    return 0


def _export_onnx(model, tokenizer, out: str) -> int:
    from evfsam_lightning.deploy.onnx import export_onnx
    from evfsam_lightning.training.loading import tokenizer_folder

    with tokenizer_folder(tokenizer.evfsam_files) as tok_dir:
        folder = export_onnx(model, out, tokenizer_dir=tok_dir)
    print(f"exported ONNX -> {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
