"""PartImageNet (COCO-format JSON) -> part shards.

Layout: `<root>/annotations/{split}.json`, images `<root>/images/{split}/`. All annotations of one
part category in an image merge into one mask clipped to 0/1; text `"[semantic] " + name` with the
name lower-cased ("Quadruped Head" -> "[semantic] quadruped head"). See `coco.py`.
"""

from __future__ import annotations

from pathlib import Path

from ..convert import ConversionPlan
from . import coco

RULES = coco.CocoRules(format="partimagenet", task="part", merge_per_category=True, semantic_prefix=True,
                       separators="_", lower=True)


def plan(root: str | Path | None, *, splits: list[str] | None = None, ann: str | None = None,
         images: str | None = None, name: str | None = None) -> ConversionPlan:
    """Plan PartImageNet splits (default `train`)."""
    return coco.plan(root, splits=splits, ann=ann, images=images, name=name, rules=RULES,
                     default_splits=("train",), default_ann="annotations/{split}.json",
                     default_images="images/{split}")
