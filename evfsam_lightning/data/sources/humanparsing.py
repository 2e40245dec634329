"""Human parsing (LIP/ATR-style 18-label PNGs) -> semantic shards.

Layout: `<root>/images/*.jpg` and `<root>/masks/*.png`, paired by file stem (`images=` / `masks=`
point elsewhere, relative to `root` or absolute). Labels: 0 background (no object), 1 hat, 2 hair,
3 sunglasses, 4 upper-clothes, 5 skirt, 6 pants, 7 dress, 8 belt, 9 left-shoe, 10 right-shoe,
11 face, 12 left-leg, 13 right-leg, 14 left-arm, 15 right-arm, 16 bag, 17 scarf; 255 (boundary/void
in some releases) makes no object. Left/right are named from the viewer's side, as labelled. Text
`"[semantic] " + name` with '-' as a space ("[semantic] left shoe"). The folder holds one split,
written to `<out>/<split>/` (default `train`).
"""

from __future__ import annotations

from pathlib import Path

from ..convert import Built, ConversionPlan, Skip, WorkItem
from .common import build_label_map_sample, clean_name, pair_files

HUMANPARSING_LABELS = (
    "background", "hat", "hair", "sunglasses", "upper-clothes", "skirt", "pants", "dress", "belt",
    "left-shoe", "right-shoe", "face", "left-leg", "right-leg", "left-arm", "right-arm", "bag", "scarf",
)
CLASS_NAMES = {i: clean_name(n, separators="-_") for i, n in enumerate(HUMANPARSING_LABELS) if i > 0}


def plan(root: str | Path, *, split: str = "train", images: str = "images", masks: str = "masks",
         name: str | None = None) -> ConversionPlan:
    """Plan one human-parsing folder as output split `split`."""
    root = Path(root)
    source = name or "humanparsing"
    items: list[WorkItem] = []
    skipped: list[Skip] = []
    pair_files(root / images, root / masks, split, source, items, skipped)
    return ConversionPlan(format="humanparsing", source=source, task="semantic", build=build, items=items,
                          splits=[split], skipped=skipped)


def build(item: WorkItem) -> Built:
    """One person image -> a `Sample` with one object per body part / garment present."""
    return build_label_map_sample(item, CLASS_NAMES, ignore=(0, 255))
