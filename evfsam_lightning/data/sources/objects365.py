"""Objects365 with masks (EVF-SAM's `o365_res_instances.json`, COCO format) -> instance shards.

Layout (as EVF-SAM's loader reads it): `<root>/Object365/raw/Objects365_v1/2019-08-02/o365_res_instances.json`,
images `<root>/Object365/raw/Objects365_v1/2019-08-02/{split}/` (split `train`); `<root>` may also be
the `2019-08-02` folder itself. `--ann` / `--images` override both (`{split}` allowed).
`segmentation` is a list holding one RLE (any COCO form is read, list pieces OR-ed). One object per
annotation, text = the category name as written (no prefix); crowd annotations are kept, as the
reference trains on them. See `coco.py` for the shared rules.
"""

from __future__ import annotations

from pathlib import Path

from ..convert import ConversionPlan
from . import coco

RULES = coco.CocoRules(format="objects365", task="instance", skip_crowd=False)
_BASE = "Object365/raw/Objects365_v1/2019-08-02"
LAYOUTS = ((f"{_BASE}/o365_res_instances.json", f"{_BASE}/{{split}}"), ("o365_res_instances.json", "{split}"))


def plan(root: str | Path | None, *, splits: list[str] | None = None, ann: str | None = None,
         images: str | None = None, name: str | None = None) -> ConversionPlan:
    """Plan Objects365 (default split `train`)."""
    return coco.plan(root, splits=splits, ann=ann, images=images, name=name, rules=RULES,
                     default_splits=("train",), layouts=LAYOUTS)
