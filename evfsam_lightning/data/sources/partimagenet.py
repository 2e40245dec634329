"""PartImageNet (COCO-format JSON) -> part shards.

Layout (as EVF-SAM's loader reads it): `<root>/PartImageNet/annotations/{split}/{split}.json`, images
`<root>/PartImageNet/images/{split}/` (default split `train`); `<root>` may also be the
`PartImageNet` folder itself. All annotations of one part name in an image merge into one mask
clipped to 0/1; text `"[semantic] " + name` lower-cased, as the reference ("Quadruped Head" ->
"[semantic] quadruped head"). See `coco.py`.
"""

from __future__ import annotations

from pathlib import Path

from ..convert import ConversionPlan
from . import coco

RULES = coco.CocoRules(format="partimagenet", task="part", merge_per_category=True, skip_crowd=False,
                       semantic_prefix=True, lower=True)
LAYOUTS = (("PartImageNet/annotations/{split}/{split}.json", "PartImageNet/images/{split}"),
           ("annotations/{split}/{split}.json", "images/{split}"))


def plan(root: str | Path | None, *, splits: list[str] | None = None, ann: str | None = None,
         images: str | None = None, name: str | None = None) -> ConversionPlan:
    """Plan PartImageNet splits (default `train`)."""
    return coco.plan(root, splits=splits, ann=ann, images=images, name=name, rules=RULES,
                     default_splits=("train",), layouts=LAYOUTS)
