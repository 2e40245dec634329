"""RefCOCO / RefCOCO+ / RefCOCOg / RefCLEF (the refer toolkit layout) -> referring shards.

Layout:
    <root>/<dataset>/refs(<split_by>).p   pickle: list of refs {ref_id, ann_id, image_id, category_id,
                                          split, sentences: [{sent, sent_id, tokens, raw}], file_name}
    <root>/<dataset>/instances.json       COCO images / annotations (polygon or RLE) / categories
    <root>/images/mscoco/images/train2014 images (RefCLEF: <root>/images/saiapr_tc-12); `images=`
                                          points anywhere else
`<root>` is the folder EVF-SAM's `REFER` is given (`<base>/refer_seg`); its parent works too.

One sample per (split, image) holding every ref of that split on that image, so an evaluation split
is complete per image. One object per ref: its annotation's mask, every sentence's `sent` as an
expression (empty sentences are counted and dropped). Source name `<dataset>_<split_by>`
(e.g. `refcoco_unc`), shard folders `<out>/<split>/`. The pickle is read with a restricted
unpickler (plain containers, strings and numbers only).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..convert import Built, ConversionPlan, Skip, WorkItem, built_or_skip
from ..schema import Sample, SampleObject, make_key
from .coco import id_order, load_json
from .common import check_image_size, decode_coco_segmentation, load_pickle, merge_masks, read_image

DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef")
SPLIT_BYS = ("unc", "umd", "google", "berkeley")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}
_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


def default_images_dir(root: str | Path, dataset: str) -> Path:
    """Where the refer toolkit keeps the images of `dataset` under `root`."""
    if dataset == "refclef":
        return Path(root) / "images" / "saiapr_tc-12"
    return Path(root) / "images" / "mscoco" / "images" / "train2014"


def find_root(root: str | Path, dataset: str) -> Path:
    """The folder holding `<dataset>/`: `root` itself, or its `refer_seg/` child (EVF-SAM's loaders
    are pointed at the folder above `refer_seg`)."""
    root = Path(root)
    if not (root / dataset).is_dir() and (root / "refer_seg" / dataset).is_dir():
        return root / "refer_seg"
    return root


def plan(root: str | Path, *, dataset: str = "refcoco", split_by: str | None = None,
         splits: list[str] | None = None, images: str | Path | None = None,
         name: str | None = None) -> ConversionPlan:
    """Plan one refer dataset. `splits` defaults to every split in the pickle; `name` overrides the
    source name `<dataset>_<split_by>`."""
    root = find_root(root, dataset)
    split_by = split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
    ref_file = root / dataset / f"refs({split_by}).p"
    images_dir = Path(images) if images is not None else default_images_dir(root, dataset)
    return plan_refs(load_pickle(ref_file), ref_file, root / dataset / "instances.json", images_dir,
                     format="refer", source=name or f"{dataset}_{split_by}", splits=splits,
                     meta={"dataset": dataset, "split_by": split_by})


def _ann_ids(ref: dict) -> tuple[list, bool] | None:
    """A ref's annotation ids and whether it refers to nothing (gRefCOCO: `ann_id == [-1]`,
    `no_target: true`); None when the two disagree or the ids are malformed."""
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    no_target = ids == [-1]
    if not ids or (-1 in ids and not no_target) or (ref.get("no_target") is True and not no_target):
        return None
    return ids, no_target


def plan_refs(refs: Any, ref_file: Path, ann_file: Path, images_dir: Path, *, format: str, source: str,
              splits: list[str] | None, meta: dict) -> ConversionPlan:
    """Plan refer-style refs (RefCOCO family and gRefCOCO): one sample per (split, image), one object
    per ref with a sentence. A ref's `ann_id` may be one id or a list (its mask is the OR of them);
    `[-1]` marks a no-target ref (an all-zero mask, `no_target` set)."""
    if not isinstance(refs, list):
        raise ValueError(f"{ref_file}: expected a list of refs, got {type(refs).__name__}")
    coco = load_json(ann_file)
    try:
        images_by_id = {img["id"]: img for img in coco["images"]}
        anns_by_id = {ann["id"]: ann for ann in coco["annotations"]}
        categories = {c["id"]: c["name"] for c in coco.get("categories", [])}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{ann_file}: not a COCO instance file (missing {e})") from e

    skipped: list[Skip] = []
    good_refs = []
    for i, ref in enumerate(refs):
        ids = (_ann_ids(ref) if isinstance(ref, dict) and all(k in ref for k in _REF_KEYS)
               and isinstance(ref["sentences"], list) else None)
        if ids is None:
            rid = ref.get("ref_id", f"#{i}") if isinstance(ref, dict) else f"#{i}"
            skipped.append(Skip("bad_annotation", f"ref {rid}", f"{ref_file}: ref {rid} (entry {i}) needs "
                                                               f"{_REF_KEYS} with a list of sentences and "
                                                               "annotation ids ([-1] alone for no target)"))
        else:
            good_refs.append((ref, *ids))
    available = sorted({str(r["split"]) for r, _, _ in good_refs})
    wanted = list(splits) if splits else available
    missing = [s for s in wanted if s not in available]
    if missing:
        raise ValueError(f"{ref_file}: no refs in split(s) {missing}; the file has {available}")

    per_image: dict[tuple[str, Any], list[tuple[dict, list, bool]]] = defaultdict(list)
    for ref, ids, no_target in good_refs:
        if ref["split"] not in wanted:
            continue
        rid = f"ref {ref['ref_id']}"
        absent = [a for a in ids if a not in anns_by_id] if not no_target else []
        if ref["image_id"] not in images_by_id:
            skipped.append(Skip("unknown_image", rid, f"{ref_file}: ref {ref['ref_id']} image_id {ref['image_id']} "
                                                      f"is not in {ann_file}"))
        elif absent:
            skipped.append(Skip("missing_annotation", rid, f"{ref_file}: ref {ref['ref_id']} ann_id "
                                                           f"{absent[0]} is not in {ann_file}"))
        else:
            per_image[(ref["split"], ref["image_id"])].append((ref, ids, no_target))

    items = []
    for (split, image_id), image_refs in sorted(per_image.items(), key=lambda kv: (kv[0][0], id_order(kv[0][1]))):
        img = images_by_id[image_id]
        objects = []
        for ref, ids, no_target in sorted(image_refs, key=lambda r: id_order(r[0]["ref_id"])):
            anns = [] if no_target else [anns_by_id[a] for a in ids]
            names = list(dict.fromkeys(categories.get(a.get("category_id")) for a in anns))
            if not anns and not no_target:
                names = [categories.get(ref.get("category_id"))]
            objects.append({
                "ref_id": ref["ref_id"], "ann_ids": ids, "no_target": no_target,
                "segmentations": [a.get("segmentation") for a in anns],
                "category": ", ".join(n for n in names if n) or None,
                "sentences": [s.get("sent") if isinstance(s, dict) else None for s in ref["sentences"]],
            })
        items.append(WorkItem(split, make_key(source, split, image_id), {
            "file": str(images_dir / img.get("file_name", "")), "file_name": img.get("file_name"),
            "image_id": image_id, "height": img.get("height"), "width": img.get("width"),
            "ref_file": str(ref_file), "ann_file": str(ann_file), "objects": objects, "source": source,
            "meta": {"split": split, "image_id": image_id, **meta},
        }))
    return ConversionPlan(format=format, source=source, task="referring", build=build, items=items,
                          splits=wanted, skipped=skipped)


def _object_id(obj: dict) -> str:
    if obj["no_target"]:
        return f"ref {obj['ref_id']} / no target"
    return f"ref {obj['ref_id']} / ann {', '.join(str(a) for a in obj['ann_ids'])}"


def build(item: WorkItem) -> Built:
    """One (split, image) of refer-style refs -> a `Sample` with one object per ref."""
    d = item.data
    image = read_image(d["file"])
    check_image_size(image, d["file"], d["height"], d["width"], d["ann_file"])
    skips: list[Skip] = []
    objects = []
    for obj in d["objects"]:
        oid = _object_id(obj)
        expressions = []
        for j, sent in enumerate(obj["sentences"]):
            if isinstance(sent, str) and sent.strip():
                expressions.append(sent.strip())
            else:
                skips.append(Skip("empty_expression", f"ref {obj['ref_id']}",
                                  f"{d['ref_file']}: ref {obj['ref_id']} sentence {j} has no text"))
        if not expressions:
            skips.append(Skip("no_expression", f"ref {obj['ref_id']}",
                              f"{d['ref_file']}: ref {obj['ref_id']} has no usable sentence"))
            continue
        if obj["no_target"]:
            objects.append(SampleObject(expressions, np.zeros((image.height, image.width), np.uint8),
                                        category=None, id=oid, no_target=True))
            continue
        masks = []
        for ann_id, seg in zip(obj["ann_ids"], obj["segmentations"], strict=True):
            try:
                masks.append(decode_coco_segmentation(seg, image.height, image.width))
            except Exception as e:  # pycocotools and malformed data raise many types
                skips.append(Skip("bad_annotation", f"ann {ann_id}",
                                  f"{d['ann_file']}: annotation {ann_id} (ref {obj['ref_id']}): {e}"))
                break
        if len(masks) < len(obj["segmentations"]):  # a target missing one of its pieces would teach a wrong mask
            continue
        mask = merge_masks(masks)
        if not mask.any():
            skips.append(Skip("empty_mask", f"ann {obj['ann_ids'][0]}",
                              f"{d['ann_file']}: annotation {', '.join(map(str, obj['ann_ids']))} "
                              f"(ref {obj['ref_id']}): mask is empty"))
            continue
        objects.append(SampleObject(expressions, mask, category=obj["category"], id=oid))
    sample = Sample(key=item.key, source=d["source"], task="referring", image_bytes=image.data,
                    image_ext=image.ext, objects=objects, height=image.height, width=image.width,
                    image_file=d["file_name"], meta=d["meta"])
    return built_or_skip(sample, skips)
