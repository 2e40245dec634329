"""RefCOCO / RefCOCO+ / RefCOCOg / RefCLEF (the refer toolkit layout) -> referring shards.

Layout:
    <root>/<dataset>/refs(<split_by>).p   pickle: list of refs {ref_id, ann_id, image_id, category_id,
                                          split, sentences: [{sent, sent_id, tokens, raw}], file_name}
    <root>/<dataset>/instances.json       COCO images / annotations (polygon or RLE) / categories
    <root>/images/mscoco/images/train2014 images (RefCLEF: <root>/images/saiapr_tc-12); `images=`
                                          points anywhere else

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

from ..convert import Built, ConversionPlan, Skip, WorkItem, built_or_skip
from ..schema import Sample, SampleObject, make_key
from .coco import id_order, load_json
from .common import check_image_size, decode_coco_segmentation, load_pickle, read_image

DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef")
SPLIT_BYS = ("unc", "umd", "google", "berkeley")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}
_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


def default_images_dir(root: str | Path, dataset: str) -> Path:
    """Where the refer toolkit keeps the images of `dataset` under `root`."""
    if dataset == "refclef":
        return Path(root) / "images" / "saiapr_tc-12"
    return Path(root) / "images" / "mscoco" / "images" / "train2014"


def plan(root: str | Path, *, dataset: str = "refcoco", split_by: str | None = None,
         splits: list[str] | None = None, images: str | Path | None = None,
         name: str | None = None) -> ConversionPlan:
    """Plan one refer dataset. `splits` defaults to every split in the pickle; `name` overrides the
    source name `<dataset>_<split_by>`."""
    root = Path(root)
    split_by = split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
    ref_file = root / dataset / f"refs({split_by}).p"
    ann_file = root / dataset / "instances.json"
    images_dir = Path(images) if images is not None else default_images_dir(root, dataset)
    source = name or f"{dataset}_{split_by}"

    refs = load_pickle(ref_file)
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
        if (not isinstance(ref, dict) or any(k not in ref for k in _REF_KEYS)
                or not isinstance(ref["sentences"], list)):
            rid = ref.get("ref_id", f"#{i}") if isinstance(ref, dict) else f"#{i}"
            skipped.append(Skip("bad_annotation", f"ref {rid}", f"{ref_file}: ref {rid} (entry {i}) needs "
                                                               f"{_REF_KEYS} with a list of sentences"))
        else:
            good_refs.append(ref)
    available = sorted({str(r["split"]) for r in good_refs})
    wanted = list(splits) if splits else available
    missing = [s for s in wanted if s not in available]
    if missing:
        raise ValueError(f"{ref_file}: no refs in split(s) {missing}; the pickle has {available}")

    per_image: dict[tuple[str, Any], list[dict]] = defaultdict(list)
    for ref in good_refs:
        if ref["split"] not in wanted:
            continue
        rid = f"ref {ref['ref_id']}"
        if ref["image_id"] not in images_by_id:
            skipped.append(Skip("unknown_image", rid, f"{ref_file}: ref {ref['ref_id']} image_id {ref['image_id']} "
                                                      f"is not in {ann_file}"))
        elif ref["ann_id"] not in anns_by_id:
            skipped.append(Skip("missing_annotation", rid, f"{ref_file}: ref {ref['ref_id']} ann_id "
                                                           f"{ref['ann_id']} is not in {ann_file}"))
        else:
            per_image[(ref["split"], ref["image_id"])].append(ref)

    items = []
    for (split, image_id), image_refs in sorted(per_image.items(), key=lambda kv: (kv[0][0], id_order(kv[0][1]))):
        img = images_by_id[image_id]
        objects = []
        for ref in sorted(image_refs, key=lambda r: id_order(r["ref_id"])):
            ann = anns_by_id[ref["ann_id"]]
            objects.append({
                "ref_id": ref["ref_id"], "ann_id": ref["ann_id"], "segmentation": ann.get("segmentation"),
                "category": categories.get(ann.get("category_id", ref.get("category_id"))),
                "sentences": [s.get("sent") if isinstance(s, dict) else None for s in ref["sentences"]],
            })
        items.append(WorkItem(split, make_key(source, split, image_id), {
            "file": str(images_dir / img.get("file_name", "")), "file_name": img.get("file_name"),
            "image_id": image_id, "height": img.get("height"), "width": img.get("width"),
            "ref_file": str(ref_file), "ann_file": str(ann_file), "objects": objects, "source": source,
            "meta": {"split": split, "image_id": image_id, "dataset": dataset, "split_by": split_by},
        }))
    return ConversionPlan(format="refer", source=source, task="referring", build=build, items=items,
                          splits=wanted, skipped=skipped)


def build(item: WorkItem) -> Built:
    """One (split, image) of a refer dataset -> a `Sample` with one object per ref."""
    d = item.data
    image = read_image(d["file"])
    check_image_size(image, d["file"], d["height"], d["width"], d["ann_file"])
    skips: list[Skip] = []
    objects = []
    for obj in d["objects"]:
        oid = f"ref {obj['ref_id']} / ann {obj['ann_id']}"
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
        try:
            mask = decode_coco_segmentation(obj["segmentation"], image.height, image.width)
        except Exception as e:  # pycocotools and malformed data raise many types
            skips.append(Skip("bad_annotation", f"ann {obj['ann_id']}",
                              f"{d['ann_file']}: annotation {obj['ann_id']} (ref {obj['ref_id']}): {e}"))
            continue
        if not mask.any():
            skips.append(Skip("empty_mask", f"ann {obj['ann_id']}",
                              f"{d['ann_file']}: annotation {obj['ann_id']} (ref {obj['ref_id']}): mask is empty"))
            continue
        objects.append(SampleObject(expressions, mask, category=obj["category"], id=oid))
    sample = Sample(key=item.key, source=d["source"], task="referring", image_bytes=image.data,
                    image_ext=image.ext, objects=objects, height=image.height, width=image.width,
                    image_file=d["file_name"], meta=d["meta"])
    return built_or_skip(sample, skips)
