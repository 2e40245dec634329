"""A custom referring dataset in JSON Lines -> referring shards.

One line per object (blank lines are ignored):

    {"image": "images/0001.jpg",                  # JPEG or PNG, stored unchanged
     "expressions": ["the dog on the left", ...],  # or "expression": "the dog on the left"
     "mask": "masks/0001_dog.png",                 # a mask file: any pixel > 0 is the object
          | {"polygon": [[x1, y1, x2, y2, ...], ...]}   # COCO polygons in pixels (one flat list is
                                                         # one polygon)
          | {"polygon": [[x1, y1], [x2, y2], ...]}      # or point lists (LabelMe, shapely); a list
                                                         # of point lists is several polygons
          | {"rle": {"size": [h, w], "counts": "..."}}, # COCO RLE, compressed string or list
                                                         # counts, or a list of RLEs (OR-ed)
     "split": "train",                             # optional, default "train" (or, with
                                                   # val_fraction, train/val by a hash of "image")
     "category": "dog",                            # optional, stored as the object's category
     "id": "dog-1"}                                # optional object id, default "line N"

Relative paths are resolved against `root` (default: the JSONL file's folder). Lines with the same
image and split become one sample (objects in line order); each split goes to `<out>/<split>/`.
Task `referring`; expressions are used as written (whitespace-trimmed). Lines that are not valid
JSON or lack `image`/`mask` are skipped and counted with their line number.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..convert import Built, ConversionPlan, Skip, WorkItem, built_or_skip, hash_split
from ..schema import Sample, SampleObject, make_key
from .common import decode_coco_segmentation, read_image

DEFAULT_SPLIT = "train"


def _resolve(base: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p


def plan(ann: str | Path, *, root: str | Path | None = None, splits: list[str] | None = None,
         name: str | None = None, val_fraction: float = 0.0, split_seed: int = 0) -> ConversionPlan:
    """Plan a JSONL file. `splits` keeps only those splits (default: every split in the file);
    `name` is the source name (default: the file's stem). With `val_fraction`, images whose lines
    have no `split` go to `val` or `train` by a hash of their path (`convert.hash_split`)."""
    ann = Path(ann)
    if not ann.is_file():
        raise FileNotFoundError(f"{ann}: JSONL file not found")
    base = Path(root) if root is not None else ann.parent
    source = name or make_key(ann.stem)
    skipped: list[Skip] = []
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    with open(ann, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{ann}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append(Skip("bad_annotation", f"line {n}", f"{where}: not valid JSON ({e})"))
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or "mask" not in rec:
                skipped.append(Skip("bad_annotation", f"line {n}", f"{where}: needs \"image\" (a path) and \"mask\""))
                continue
            if "split" in rec:
                split = str(rec["split"])
            else:
                split = hash_split(rec["image"], val_fraction, split_seed) if val_fraction else DEFAULT_SPLIT
            if splits and split not in splits:
                continue
            groups[(split, rec["image"])].append({"line": n, "rec": rec})
    found = sorted({split for split, _ in groups})
    wanted = list(splits) if splits else sorted(set(found) | ({"train", "val"} if val_fraction else set())) \
        or [DEFAULT_SPLIT]
    items = []
    for (split, image), lines in sorted(groups.items()):
        # Stem for readability, a hash of the path as written so that a/x.jpg and b/x.jpg differ.
        digest = hashlib.sha1(image.encode("utf-8")).hexdigest()[:10]
        items.append(WorkItem(split, make_key(source, split, Path(image).stem, digest), {
            "image": str(_resolve(base, image)), "image_name": image, "base": str(base), "ann": str(ann),
            "objects": lines, "source": source,
        }))
    return ConversionPlan(format="jsonl", source=source, task="referring", build=build, items=items,
                          splits=wanted, skipped=skipped)


def _expressions(rec: dict) -> list[Any]:
    if "expressions" in rec:
        exprs = rec["expressions"]
        return exprs if isinstance(exprs, list) else [exprs]
    return [rec.get("expression")]


def _mask(spec: Any, base: Path, height: int, width: int) -> np.ndarray:
    if isinstance(spec, str):
        path = _resolve(base, spec)
        if not path.is_file():
            raise FileNotFoundError(f"mask file {path} not found")
        with Image.open(io.BytesIO(path.read_bytes())) as im:
            arr = np.asarray(im if im.mode in ("L", "P", "1", "I", "I;16") else im.convert("L"))
        if arr.shape != (height, width):
            raise ValueError(f"mask {path} is {arr.shape}, image is {(height, width)}")
        return (arr > 0).astype(np.uint8)
    if isinstance(spec, dict) and "polygon" in spec:
        return decode_coco_segmentation(_flat_polygons(spec["polygon"]), height, width)
    if isinstance(spec, dict) and "rle" in spec:
        return decode_coco_segmentation(spec["rle"], height, width)
    raise ValueError("mask must be a file path, {\"polygon\": ...} or {\"rle\": ...}")


def _is_point(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)


def _flat_polygons(polygons: Any) -> list:
    """`{"polygon": ...}` as COCO's flat polygons: one flat list `[x1, y1, ...]`, a list of them, one
    point list `[[x, y], ...]` (LabelMe, shapely), or a list of point lists."""
    if not isinstance(polygons, list) or not polygons:
        return polygons if isinstance(polygons, list) else [polygons]
    if not isinstance(polygons[0], list):  # one flat polygon
        return [polygons]
    if all(_is_point(p) for p in polygons):  # one point list (a 2-value flat polygon has no area anyway)
        return [[v for point in polygons for v in point]]
    return [[v for point in poly for v in point] if poly and all(_is_point(p) for p in poly) else poly
            for poly in polygons]


def build(item: WorkItem) -> Built:
    """One image's lines -> a `Sample` with one object per line."""
    d = item.data
    image = read_image(d["image"])
    skips: list[Skip] = []
    objects = []
    for entry in d["objects"]:
        n, rec = entry["line"], entry["rec"]
        oid = str(rec.get("id", f"line {n}"))
        where = f"{d['ann']}:{n}"
        exprs = [e.strip() for e in _expressions(rec) if isinstance(e, str) and e.strip()]
        if not exprs:
            skips.append(Skip("no_expression", f"line {n}", f"{where}: no non-empty expression"))
            continue
        try:
            mask = _mask(rec["mask"], Path(d["base"]), image.height, image.width)
        except Exception as e:  # PIL, pycocotools and malformed data raise many types
            reason = "missing_mask" if isinstance(e, FileNotFoundError) else "bad_annotation"
            skips.append(Skip(reason, f"line {n}", f"{where}: {e}"))
            continue
        if not mask.any():
            skips.append(Skip("empty_mask", f"line {n}", f"{where}: mask is empty"))
            continue
        category = rec.get("category") if isinstance(rec.get("category"), str) else None
        objects.append(SampleObject(exprs, mask, category=category, id=oid))
    sample = Sample(key=item.key, source=d["source"], task="referring", image_bytes=image.data,
                    image_ext=image.ext, objects=objects, height=image.height, width=image.width,
                    image_file=d["image_name"], meta={"split": item.split})
    return built_or_skip(sample, skips)
