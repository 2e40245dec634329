"""Pascal-Part (COCO-format JSON, categories named `object:part`) -> part shards.

Layout: `<root>/annotations/{split}.json`, images `<root>/images/{split}/` (`--ann` / `--images`
override, e.g. `--images VOCdevkit/VOC2010/JPEGImages`). All annotations of one part in an image
merge into one mask clipped to 0/1; text `"[semantic] " + name` with ':' and '_' turned into spaces
and the part token otherwise kept as written (`aeroplane:body` -> "[semantic] aeroplane body").
"""

from __future__ import annotations

from pathlib import Path

from ..convert import ConversionPlan
from . import coco

RULES = coco.CocoRules(format="pascal_part", task="part", merge_per_category=True, semantic_prefix=True,
                       separators=":_")


def plan(root: str | Path | None, *, splits: list[str] | None = None, ann: str | None = None,
         images: str | None = None, name: str | None = None) -> ConversionPlan:
    """Plan Pascal-Part splits (default `train`)."""
    return coco.plan(root, splits=splits, ann=ann, images=images, name=name, rules=RULES,
                     default_splits=("train",), default_ann="annotations/{split}.json",
                     default_images="images/{split}")
