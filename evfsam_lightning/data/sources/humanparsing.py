"""Human parsing (LIP/ATR-style 18-label PNGs, EVF-SAM's `humanparsing` folder) -> semantic shards.

Layout (as EVF-SAM's loader reads it): `<root>/JPEGImages/*.jpg` and `<root>/SegmentationClassAug/*.png`,
paired by file stem; `<root>` may also be the folder above `humanparsing/`. `images=` / `masks=`
point elsewhere (relative to the resolved root, or absolute). Labels and text follow the reference:
left/right are named from the viewer's side (the left of the picture), as RefCOCO names them:
0 background, 1 hat, 2 hair, 3 sunglasses, 4 upper clothes, 5 skirt, 6 pants, 7 dress, 8 belt,
9 right shoe, 10 left shoe, 11 face, 12 right leg, 13 left leg, 14 right arm, 15 left arm, 16 bag,
17 scarf. Every label present, background included, is one object with text `"[semantic] " + name`
("[semantic] background", "[semantic] left arm"); 255 (boundary/void in some releases) makes no
object. The folder holds one split, written to `<out>/<split>/` (default `train`).
"""

from __future__ import annotations

from pathlib import Path

from ..convert import Built, ConversionPlan, Skip, WorkItem
from .common import build_label_map_sample, pair_files

# Label value -> name, viewer-side left/right (EVF-SAM's humanparsing_dataset.py swaps the dataset's own).
CLASS_NAMES = dict(enumerate((
    "background", "hat", "hair", "sunglasses", "upper clothes", "skirt", "pants", "dress", "belt",
    "right shoe", "left shoe", "face", "right leg", "left leg", "right arm", "left arm", "bag", "scarf",
)))
DEFAULT_IMAGES = "JPEGImages"
DEFAULT_MASKS = "SegmentationClassAug"


def find_root(root: str | Path) -> Path:
    """The folder holding `JPEGImages/`: `root` itself or its `humanparsing/` child."""
    root = Path(root)
    if not (root / DEFAULT_IMAGES).is_dir() and (root / "humanparsing" / DEFAULT_IMAGES).is_dir():
        return root / "humanparsing"
    return root


def plan(root: str | Path, *, split: str = "train", images: str = DEFAULT_IMAGES, masks: str = DEFAULT_MASKS,
         name: str | None = None) -> ConversionPlan:
    """Plan one human-parsing folder as output split `split`."""
    root = find_root(root)
    source = name or "humanparsing"
    items: list[WorkItem] = []
    skipped: list[Skip] = []
    pair_files(root / images, root / masks, split, source, items, skipped)
    return ConversionPlan(format="humanparsing", source=source, task="semantic", build=build, items=items,
                          splits=[split], skipped=skipped)


def build(item: WorkItem) -> Built:
    """One person image -> a `Sample` with one object per label present (background included)."""
    return build_label_map_sample(item, CLASS_NAMES, ignore=(255,))
