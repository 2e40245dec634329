"""Pascal-Part (VLPart's COCO-format JSON, categories named `object:part`) -> part shards.

Layout (as EVF-SAM's loader reads it, `<root>` being its `vlpart/pascal_part` folder):
`<root>/{split}.json` (default split `train`), images `<root>/VOCdevkit/VOC2010/JPEGImages/`;
`<root>` may also be the folder above `vlpart/`. `--ann` / `--images` override. All annotations of
one part name in an image merge into one mask clipped to 0/1; text `"[semantic] " + name` with ':'
turned into a space and the rest kept as written, as the reference (`aeroplane:body` ->
"[semantic] aeroplane body", `bus:license plate` -> "[semantic] bus license plate").
"""

from __future__ import annotations

from pathlib import Path

from ..convert import ConversionPlan
from . import coco

RULES = coco.CocoRules(format="pascal_part", task="part", merge_per_category=True, skip_crowd=False,
                       semantic_prefix=True, separators=":")
_IMAGES = "VOCdevkit/VOC2010/JPEGImages"
LAYOUTS = (("{split}.json", _IMAGES), ("vlpart/pascal_part/{split}.json", f"vlpart/pascal_part/{_IMAGES}"))


def plan(root: str | Path | None, *, splits: list[str] | None = None, ann: str | None = None,
         images: str | None = None, name: str | None = None) -> ConversionPlan:
    """Plan Pascal-Part splits (default `train`)."""
    return coco.plan(root, splits=splits, ann=ann, images=images, name=name, rules=RULES,
                     default_splits=("train",), layouts=LAYOUTS)
