"""evfsam-eval: gIoU and cIoU of a checkpoint on shard splits.

    evfsam-eval --checkpoint runs/quickstart/checkpoints/step-00002000.ckpt --data data/synthetic/val
    evfsam-eval --checkpoint checkpoints/evf-sam --data refcoco_val=data/shards/refcoco_unc/val \
        refcocog_test=data/shards/refcocog_umd/test --devices 2 --out results.json

Each `--data` item is `[name=]shards` (a folder of tars with sizes.json, a brace pattern, a glob).
The checkpoint is an evfsam-train checkpoint (file, or DeepSpeed/FSDP directory) or an official
EVF-SAM folder. `--shuffle-expressions` gives each object the expression of another object of
the same image: a model that reads the text scores much lower that way.
"""

from __future__ import annotations

import json
import sys
from argparse import RawDescriptionHelpFormatter
from pathlib import Path

from evfsam_lightning.cli.errors import (
    ArgumentParser,
    UserError,
    checkpoint_input,
    console_script,
    output_path,
)


def parse_data(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, _, urls = item.rpartition("=")
        if not name:
            urls = item
            p = Path(item.rstrip("/"))
            name = p.name if p.name not in ("val", "test", "train") else f"{p.parent.name}_{p.name}"
        out.append((name, urls))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UserError(f"--data: split names repeat: {names}; name them with name=shards")
    return out


def check_splits(splits: list[tuple[str, str]]) -> None:
    """Every split names shards that exist (before the model is loaded)."""
    for name, urls in splits:
        if not urls.startswith("pipe:") and not any(c in urls for c in "*?[{") and not Path(urls).exists():
            raise UserError(f"--data {name}={urls}: no such file or directory (check the path)")
        if Path(urls).is_dir() and not (any(Path(urls).glob("*.tar")) or any(Path(urls).glob("*.tar.gz"))):
            raise UserError(f"--data {name}={urls}: the folder holds no *.tar or *.tar.gz shard")
    from evfsam_lightning.data.stream import expand_urls

    for name, urls in splits:
        try:
            found = expand_urls(urls)
        except (OSError, ValueError) as e:
            raise UserError(f"--data {name}={urls}: {str(e).splitlines()[0]}") from None
        if not found:
            raise UserError(f"--data {name}={urls}: no shards match (give a folder of .tar shards, a glob or a "
                            "brace pattern)")


@console_script("evfsam-eval")
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="evfsam-eval", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", nargs="+", required=True, help="[name=]shards, one per split")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU ranks)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--batch-size", type=int, default=4, help="images per loader batch per rank")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="32", help="32 or bf16-mixed")
    p.add_argument("--shuffle-expressions", action="store_true", help="text-blind control (see above)")
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--presence-threshold", type=float, default=None,
                   help="with a presence head: 'no target' below this probability (default: the checkpoint's)")
    args = p.parse_args(argv)
    if args.presence_threshold is not None and not 0 <= args.presence_threshold <= 1:
        p.error(f"--presence-threshold {args.presence_threshold} must be in [0, 1]")
    for option in ("devices", "batch_size"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} {getattr(args, option)} must be at least 1")
    if args.workers < 0:
        p.error(f"--workers {args.workers} must be 0 or more")
    if args.precision not in ("32", "bf16-mixed", "16-mixed"):
        p.error(f"--precision {args.precision!r} is not allowed (allowed: 32, bf16-mixed, 16-mixed)")
    checkpoint_input(args.checkpoint)
    splits = parse_data(args.data)
    check_splits(splits)
    if args.out:
        output_path(args.out)

    import lightning as L

    from evfsam_lightning.data.datamodule import DataConfig, EvfDataModule, SourceConfig
    from evfsam_lightning.training.evaluation import EvalModule
    from evfsam_lightning.training.loading import load_for_inference, tokenizer_folder

    model, tokenizer = load_for_inference(args.checkpoint)
    if args.presence_threshold is not None:
        if model.presence_head is None:
            p.error(f"--presence-threshold: {args.checkpoint} has no presence head")
        model.presence_head.threshold.fill_(args.presence_threshold)
    cfg = model.config
    with tokenizer_folder(tokenizer.evfsam_files) as tok_dir:
        data = DataConfig(test_sources=[SourceConfig(n, u) for n, u in splits], tokenizer=str(tok_dir),
                          batch_size=args.batch_size, num_workers=args.workers, sam_image_size=cfg.sam.image_size,
                          sam_variant=cfg.family, beit_image_size=cfg.beit3.image_size)
        module = EvalModule(model, [n for n, _ in splits], args.shuffle_expressions)
        trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, precision=args.precision,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, use_distributed_sampler=False,
                            strategy="ddp" if args.devices > 1 else "auto")
        trainer.test(module, datamodule=EvfDataModule(data), verbose=False)
    if not trainer.is_global_zero:
        return 0
    results = {"checkpoint": str(args.checkpoint), "shuffled_expressions": args.shuffle_expressions,
               "splits": {n: module.results[n] for n, _ in splits}, "all": module.results["all"]}
    width = max(len(n) for n, _ in splits)
    print(f"{'split':<{width}}  {'gIoU':>7}  {'cIoU':>7}  expressions")
    for name, r in results["splits"].items():
        print(f"{name:<{width}}  {100 * r['giou']:7.2f}  {100 * r['ciou']:7.2f}  {r['expressions']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
