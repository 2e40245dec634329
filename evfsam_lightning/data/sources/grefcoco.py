"""gRefCOCO (generalized referring expressions: one, several or no targets) -> referring shards.

Layout (as EVF-SAM's `G_REFER` reads it, `<root>` being its `refer_seg` folder or that folder's parent):
    <root>/grefcoco/grefs(unc).json       list of refs {ref_id, ann_id: [ids] or [-1], image_id,
                                          category_id, split, sentences: [{sent, raw, tokens, sent_id}],
                                          no_target} (`grefs(unc).p` is read first when present)
    <root>/grefcoco/instances.json        COCO images / annotations / categories
    <root>/images/mscoco/images/train2014 images (`images=` points anywhere else)

One sample per (split, image), one object per ref with a sentence: its mask is the OR of all its
annotations; a no-target ref (`ann_id == [-1]`) is an object with an all-zero mask of the image's
size and `"no_target": true` in its record. Splits train / val / testA / testB (default: every split
in the file). Source name `grefcoco_<split_by>`. The rules are the refer converter's (`refer.py`).
"""

from __future__ import annotations

from pathlib import Path

from ..convert import ConversionPlan
from . import refer
from .coco import load_json
from .common import load_pickle

DATASET = "grefcoco"


def plan(root: str | Path, *, split_by: str = "unc", splits: list[str] | None = None,
         images: str | Path | None = None, name: str | None = None) -> ConversionPlan:
    """Plan gRefCOCO. `splits` defaults to every split in the refs file; `name` overrides the source
    name `grefcoco_<split_by>`."""
    root = refer.find_root(root, DATASET)
    folder = root / DATASET
    pickled, as_json = folder / f"grefs({split_by}).p", folder / f"grefs({split_by}).json"
    if pickled.is_file():
        ref_file, refs = pickled, load_pickle(pickled)
    elif as_json.is_file():
        ref_file, refs = as_json, load_json(as_json)
    else:
        raise FileNotFoundError(f"{as_json}: refs file not found (nor {pickled.name})")
    images_dir = Path(images) if images is not None else refer.default_images_dir(root, DATASET)
    return refer.plan_refs(refs, ref_file, folder / "instances.json", images_dir, format="grefcoco",
                           source=name or f"{DATASET}_{split_by}", splits=splits,
                           meta={"dataset": DATASET, "split_by": split_by})
