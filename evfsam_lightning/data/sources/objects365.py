"""Objects365 with masks (COCO-format JSON, RLE `segmentation`) -> instance shards.

One object per annotation, text = the category name as written (no prefix), crowd annotations
skipped and counted. Default layout: `<root>/annotations/{split}.json` and `<root>/images/{split}/`
(`--ann` / `--images` override both, `{split}` allowed). See `coco.py` for the shared rules.
"""

from __future__ import annotations

from pathlib import Path

from ..convert import ConversionPlan
from . import coco

RULES = coco.CocoRules(format="objects365", task="instance")


def plan(root: str | Path | None, *, splits: list[str] | None = None, ann: str | None = None,
         images: str | None = None, name: str | None = None) -> ConversionPlan:
    """Plan Objects365 splits (default `train`)."""
    return coco.plan(root, splits=splits, ann=ann, images=images, name=name, rules=RULES,
                     default_splits=("train",), default_ann="annotations/{split}.json",
                     default_images="images/{split}")
