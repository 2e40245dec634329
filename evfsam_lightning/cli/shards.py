"""`evfsam-shards`: convert a raw dataset into WebDataset shards (see docs/data.md).

    evfsam-shards refer --root data/refer_seg --dataset refcoco --out shards/refcoco
    evfsam-shards grefcoco --root data/refer_seg --out shards/grefcoco
    evfsam-shards ade20k --root data/ADEChallengeData2016 --out shards/ade20k --workers 8
    evfsam-shards jsonl --ann my_data/objects.jsonl --out shards/my_data
    evfsam-shards coco --root my_data --ann annotations.json --images images --val-fraction 0.1 --out shards/mine
    evfsam-shards synthetic --out shards/synthetic --train 4000 --val 200

Each run writes `<out>/<split>/<source>-<split>-NNNNNN.tar` + `sizes.json` per split, and
`<out>/report.json` with what was written and what was skipped (and why).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from collections.abc import Callable

from ..data.convert import ConversionPlan, convert
from ..data.schema import SampleError
from ..data.sources import (
    ade20k,
    coco,
    grefcoco,
    humanparsing,
    jsonl,
    objects365,
    partimagenet,
    pascal_part,
    refer,
    synthetic,
)
from .errors import ArgumentParser, UserError, console_script

_DEFAULT_WORKERS = max(1, min(8, os.cpu_count() or 1))


def _common(p: argparse.ArgumentParser, *, root_required: bool = True) -> None:
    p.add_argument("--root", required=root_required, help="dataset root folder")
    p.add_argument("--out", required=True, help="output folder; gets one shard folder per split and report.json")
    p.add_argument("--workers", type=int, default=_DEFAULT_WORKERS,
                   help="conversion processes (output is identical for any number; default %(default)s)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad item (missing image, undecodable annotation, empty mask, "
                        "no expression) instead of skipping and counting it")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in the output folders")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--name", help="source name stored in every sample and used in shard names "
                                   "(default: the dataset's name)")


def _val_split(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="make a validation split: about this fraction of the images (chosen by a hash of the "
                        "image file name, so stable when images are added) go to val/, the rest to train/")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the --val-fraction hash (default %(default)s)")


def _coco_family(sub, fmt: str, module, layouts: tuple[tuple[str, str], ...], default_split: str,
                 description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(fmt, help=description, description=description)
    _common(p)
    p.add_argument("--split", nargs="+", default=[default_split],
                   help="splits to convert; each fills {split} in --ann/--images (default %(default)s)")
    alternatives = "".join(f", else {ann}" for ann, _ in layouts[1:])
    p.add_argument("--ann", help=f"COCO JSON, relative to --root unless absolute; may hold {{split}} "
                                 f"(default {layouts[0][0]}{alternatives}, whichever exists)")
    p.add_argument("--images", help=f"folder the JSON's file_names are relative to; may hold {{split}} "
                                    f"(default {' / '.join(images for _, images in layouts)}, beside "
                                    "the annotation file found)")
    p.set_defaults(make_plan=lambda a: module.plan(a.root, splits=a.split, ann=a.ann, images=a.images, name=a.name))
    return p


def build_parser() -> argparse.ArgumentParser:
    """The `evfsam-shards` argument parser (one sub-command per raw format)."""
    parser = ArgumentParser(
        prog="evfsam-shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")

    p = sub.add_parser("refer", help="RefCOCO / RefCOCO+ / RefCOCOg / RefCLEF (refer toolkit layout)",
                       description=refer.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--dataset", default="refcoco", choices=refer.DATASETS, help="folder under --root")
    p.add_argument("--split-by", choices=refer.SPLIT_BYS,
                   help=f"which refs(<split-by>).p to read (default: {refer.DEFAULT_SPLIT_BY})")
    p.add_argument("--split", nargs="+", help="splits to convert, e.g. train val testA testB (default: all)")
    p.add_argument("--images", help="image folder (default <root>/images/mscoco/images/train2014, "
                                    "RefCLEF <root>/images/saiapr_tc-12)")
    p.set_defaults(make_plan=lambda a: refer.plan(a.root, dataset=a.dataset, split_by=a.split_by,
                                                  splits=a.split, images=a.images, name=a.name))

    p = sub.add_parser("grefcoco", help="gRefCOCO (multi-target and no-target expressions, G_REFER layout)",
                       description=grefcoco.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--split-by", default="unc", help="which grefs(<split-by>).json to read (default %(default)s)")
    p.add_argument("--split", nargs="+", help="splits to convert, e.g. train val testA testB (default: all)")
    p.add_argument("--images", help="image folder (default <root>/images/mscoco/images/train2014)")
    p.set_defaults(make_plan=lambda a: grefcoco.plan(a.root, split_by=a.split_by, splits=a.split,
                                                     images=a.images, name=a.name))

    p = _coco_family(sub, "coco", coco, ((coco.DEFAULT_ANN, coco.DEFAULT_IMAGES),), "train2017",
                     "any COCO instance JSON: one object per annotation, text = category name, crowd skipped")
    _val_split(p)
    p.set_defaults(make_plan=lambda a: coco.plan(a.root, splits=a.split, ann=a.ann, images=a.images, name=a.name,
                                                 val_fraction=a.val_fraction, split_seed=a.split_seed))
    _coco_family(sub, "objects365", objects365, objects365.LAYOUTS, "train",
                 "Objects365 with RLE masks (COCO JSON): instance objects, text = category name")
    _coco_family(sub, "partimagenet", partimagenet, partimagenet.LAYOUTS, "train",
                 "PartImageNet (COCO JSON): parts merged per image, '[semantic] quadruped head'")
    _coco_family(sub, "pascal_part", pascal_part, pascal_part.LAYOUTS, "train",
                 "Pascal-Part (COCO JSON, 'obj:part' names): parts merged per image, '[semantic] aeroplane body'")

    p = sub.add_parser("ade20k", help="ADE20K scene parsing (ADEChallengeData2016, 150 classes)",
                       description=ade20k.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--split", nargs="+", default=["train", "val"],
                   help="train (images/training) and/or val (images/validation) (default %(default)s)")
    p.set_defaults(make_plan=lambda a: ade20k.plan(a.root, splits=a.split, name=a.name))

    p = sub.add_parser("humanparsing", help="LIP/ATR-style 18-label human parsing PNGs (JPEGImages/, "
                                            "SegmentationClassAug/)",
                       description=humanparsing.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--split", default="train", help="output split name for this folder (default %(default)s)")
    p.add_argument("--images", default=humanparsing.DEFAULT_IMAGES,
                   help="image folder, relative to --root (default %(default)s)")
    p.add_argument("--masks", default=humanparsing.DEFAULT_MASKS,
                   help="label PNG folder, relative to --root (default %(default)s)")
    p.set_defaults(make_plan=lambda a: humanparsing.plan(a.root, split=a.split, images=a.images, masks=a.masks,
                                                         name=a.name))

    p = sub.add_parser("jsonl", help="a custom referring dataset, one JSON object per line",
                       description=jsonl.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, root_required=False)
    p.add_argument("--ann", help="the .jsonl file (or give it as --root)")
    p.add_argument("--split", nargs="+", help="splits to keep (default: every split in the file)")
    _val_split(p)
    p.set_defaults(make_plan=_jsonl_plan)

    p = sub.add_parser("synthetic", help="the embedded synthetic shapes dataset (quickstart, tests)",
                       description=synthetic.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder; gets train/, val/ and report.json")
    p.add_argument("--train", type=int, default=4000, help="training samples (default %(default)s)")
    p.add_argument("--val", type=int, default=200, help="validation samples (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default %(default)s)")
    p.add_argument("--grammar", choices=synthetic.GRAMMARS, default="colour",
                   help="'colour': colour-keyed expressions only; 'full': colour, shape and position "
                        "(default %(default)s)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="generation processes (default %(default)s)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in the output folders")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(make_plan=lambda a: synthetic.plan(a.train, a.val, image_size=a.image_size, seed=a.seed,
                                                      grammar=a.grammar), strict=False)
    return parser


def _jsonl_plan(a: argparse.Namespace) -> ConversionPlan:
    ann, root = a.ann, a.root
    if ann is None and root is not None and root.endswith(".jsonl"):
        ann, root = root, None
    if ann is None:
        raise ValueError("jsonl needs --ann FILE.jsonl (or --root FILE.jsonl)")
    return jsonl.plan(ann, root=root, splits=a.split, name=a.name, val_fraction=a.val_fraction,
                      split_seed=a.split_seed)


@console_script("evfsam-shards")
def main(argv: list[str] | None = None) -> int:
    """Entry point of `evfsam-shards`; returns 0, or 2 with one line naming what failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or args.shard_size < 1:
        parser.error("--workers and --shard-size must be >= 1")
    if not 0 <= getattr(args, "val_fraction", 0.0) < 1:
        parser.error("--val-fraction must be in [0, 1)")
    if args.format == "synthetic":
        if args.train < 0 or args.val < 0 or args.train + args.val == 0:
            parser.error(f"--train {args.train} and --val {args.val} must be 0 or more, and not both 0")
        if args.image_size < 32:
            parser.error(f"--image-size {args.image_size} must be at least 32 (room for 2-4 shapes)")

    make_plan: Callable[[argparse.Namespace], ConversionPlan] = args.make_plan
    try:
        plan = make_plan(args)
        convert(plan, args.out, workers=args.workers, shard_size=args.shard_size, strict=args.strict,
                progress=not args.no_progress, overwrite=args.overwrite)
    except (ValueError, SampleError, pickle.UnpicklingError) as e:  # OSErrors name their file: the wrapper says it
        raise UserError(f"{args.format}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
