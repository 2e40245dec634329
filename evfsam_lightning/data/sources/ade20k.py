"""ADE20K scene parsing (ADEChallengeData2016) -> semantic shards.

Layout (`root` is the ADEChallengeData2016 folder, or its parent; EVF-SAM calls it `<base>/ade20k`):
    images/training/*.jpg        annotations/training/*.png     (split "train")
    images/validation/*.jpg      annotations/validation/*.png   (split "val")
Label maps are uint8 PNGs: 0 = other/unlabelled (makes no object), 1..150 = the classes below.
One object per class present: mask = (label == class), 0/1 as in the reference (unlabelled pixels
are background, not ignore); text `"[semantic] " + name`. Images without a label map (and label
maps without an image) are counted, not converted.
"""

from __future__ import annotations

from pathlib import Path

from ..convert import Built, ConversionPlan, Skip, WorkItem
from .common import build_label_map_sample, pair_files

# The 150 ADE20K scene-parsing classes (label value = position + 1), first name of each synonym list.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
    "flag",
)
CLASS_NAMES = {i + 1: name for i, name in enumerate(ADE20K_CLASSES)}
SPLIT_DIRS = {"train": "training", "val": "validation"}


def _split_name(split: str) -> str:
    # Accept the dataset's own folder names too ("training" -> "train").
    by_dir = {v: k for k, v in SPLIT_DIRS.items()}
    if split in SPLIT_DIRS:
        return split
    if split in by_dir:
        return by_dir[split]
    raise ValueError(f"ade20k split {split!r}: use one of {sorted(SPLIT_DIRS)} (or {sorted(by_dir)})")


def find_root(root: str | Path) -> Path:
    """The ADEChallengeData2016 folder: `root` itself, its child of that name, or its `ade20k/` child
    (the name EVF-SAM's loader gives it)."""
    root = Path(root)
    for child in ("ADEChallengeData2016", "ade20k"):
        if not (root / "images").is_dir() and (root / child / "images").is_dir():
            return root / child
    return root


def plan(root: str | Path, *, splits: list[str] | None = None, name: str | None = None) -> ConversionPlan:
    """Plan ADE20K splits (default both, `train` and `val`)."""
    root = find_root(root)
    wanted = sorted({_split_name(s) for s in (splits or SPLIT_DIRS)})
    source = name or "ade20k"
    items: list[WorkItem] = []
    skipped: list[Skip] = []
    for split in wanted:
        pair_files(root / "images" / SPLIT_DIRS[split], root / "annotations" / SPLIT_DIRS[split], split,
                   source, items, skipped)
    return ConversionPlan(format="ade20k", source=source, task="semantic", build=build, items=items,
                          splits=wanted, skipped=skipped)


def build(item: WorkItem) -> Built:
    """One ADE20K image -> a `Sample` with one object per class present."""
    return build_label_map_sample(item, CLASS_NAMES, ignore=(0,))
