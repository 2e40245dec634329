"""COCO-format instance JSON -> shards (format `coco`; also the engine of `objects365`,
`partimagenet` and `pascal_part`).

Input: a COCO JSON (`images` with `id`, `file_name`, `height`, `width`; `annotations` with `id`,
`image_id`, `category_id`, `segmentation` as polygons or RLE (compressed or not), `iscrowd`;
`categories` with `id`, `name`) and a folder the `file_name`s are relative to.
Default layout: `<root>/annotations/instances_{split}.json` and `<root>/{split}/` (COCO 2017).

Instance rules (`coco`, `objects365`): one object per annotation, text = the category name;
`coco` skips and counts `iscrowd` annotations (a crowd region is not one object), `objects365`
keeps them, as EVF-SAM's loader does.
Part rules (`partimagenet`, `pascal_part`): the annotations of one category name in one image are
merged into one mask clipped to 0/1 (crowd ones included: they are still that part), text
`"[semantic] " + name`. One sample per image; images without a usable annotation are counted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..convert import Built, ConversionPlan, Skip, WorkItem, built_or_skip, hash_split
from ..schema import Sample, SampleObject, make_key
from .common import (
    check_image_size,
    clean_name,
    decode_coco_segmentation,
    merge_masks,
    read_image,
    semantic_expression,
)

DEFAULT_ANN = "annotations/instances_{split}.json"
DEFAULT_IMAGES = "{split}"


@dataclass(frozen=True)
class CocoRules:
    """How a COCO-format dataset becomes samples: the task, whether a category's annotations in an
    image merge into one part mask, and how category names become text."""

    format: str
    task: str
    merge_per_category: bool = False
    skip_crowd: bool = True
    semantic_prefix: bool = False
    separators: str = ""
    lower: bool = False

    def text(self, name: str) -> str:
        cleaned = clean_name(name, separators=self.separators, lower=self.lower)
        return semantic_expression(cleaned) if self.semantic_prefix and cleaned else cleaned


COCO_RULES = CocoRules(format="coco", task="instance")


def load_json(path: str | Path) -> Any:
    """A JSON file, with errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def resolve_template(template: str | Path, root: str | Path | None, split: str) -> Path:
    """`template` with `{split}` filled in, relative to `root` unless absolute."""
    path = Path(str(template).replace("{split}", split))
    return path if path.is_absolute() or root is None else Path(root) / path


def id_order(value: Any) -> tuple:
    """Sort key for dataset ids: integers numerically, then anything else as text."""
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


def _plan_split(ann_file: Path, images_dir: Path, split: str, source: str, rules: CocoRules,
                items: list[WorkItem], skipped: list[Skip]) -> None:
    coco = load_json(ann_file)
    try:
        images = {img["id"]: img for img in coco["images"]}
        categories = {c["id"]: c["name"] for c in coco["categories"]}
        annotations = coco["annotations"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{ann_file}: not a COCO instance file (missing {e})") from e

    per_image: dict[Any, list[dict]] = defaultdict(list)
    for i, ann in enumerate(annotations):
        ann_id = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        where = f"{ann_file}: annotation {ann_id}"
        if not isinstance(ann, dict) or "segmentation" not in ann or "image_id" not in ann:
            skipped.append(Skip("bad_annotation", f"ann {ann_id}", f"{where}: lacks image_id or segmentation"))
        elif ann["image_id"] not in images:
            skipped.append(Skip("unknown_image", f"ann {ann_id}", f"{where}: image_id {ann['image_id']} not in images"))
        elif ann.get("category_id") not in categories:
            skipped.append(Skip("unknown_category", f"ann {ann_id}",
                                f"{where}: category_id {ann.get('category_id')} not in categories"))
        elif ann.get("iscrowd", 0) and rules.skip_crowd:
            skipped.append(Skip("crowd", f"ann {ann_id}", f"{where}: iscrowd annotation", error=False))
        else:
            per_image[ann["image_id"]].append(
                {"id": ann_id, "segmentation": ann["segmentation"], "category_id": ann["category_id"]})

    for image_id in sorted(images, key=id_order):
        img = images[image_id]
        anns = per_image.get(image_id)
        key = make_key(source, split, image_id)
        if not anns:
            skipped.append(Skip("no_object", key, f"{ann_file}: image {image_id} ({img.get('file_name')}) "
                                                  "has no usable annotation", error=False))
            continue
        if rules.merge_per_category:
            # Keyed by name, as the reference merges: two category ids of one name are one part.
            groups: dict[str, list[dict]] = defaultdict(list)
            for ann in sorted(anns, key=lambda a: id_order(a["category_id"])):
                groups[categories[ann["category_id"]]].append(ann)
            objects = [{"category": n, "text": rules.text(n), "anns": g,
                        "id": "category " + ", ".join(str(c) for c in dict.fromkeys(a["category_id"] for a in g))}
                       for n, g in groups.items()]
        else:
            objects = [{"category": categories[a["category_id"]], "text": rules.text(categories[a["category_id"]]),
                        "anns": [a], "id": f"ann {a['id']}"} for a in anns]
        items.append(WorkItem(split, key, {
            "file": str(images_dir / img.get("file_name", "")), "file_name": img.get("file_name"),
            "image_id": image_id, "height": img.get("height"), "width": img.get("width"),
            "ann_file": str(ann_file), "objects": objects, "source": source, "task": rules.task,
        }))


def plan_coco_json(ann_files: dict[str, Path], images_dirs: dict[str, Path], *, source: str,
                   rules: CocoRules = COCO_RULES, val_fraction: float = 0.0, split_seed: int = 0) -> ConversionPlan:
    """A plan over COCO JSON files, one per output split (`{split: json}`, `{split: image folder}`).
    With `val_fraction`, the one file is split into `train` and `val` by a hash of each image's
    `file_name` (`convert.hash_split`: stable when images are added)."""
    items: list[WorkItem] = []
    skipped: list[Skip] = []
    for split in sorted(ann_files):
        _plan_split(Path(ann_files[split]), Path(images_dirs[split]), split, source, rules, items, skipped)
    splits = sorted(ann_files)
    if val_fraction:
        if len(ann_files) != 1:
            raise ValueError(f"--val-fraction splits one annotation file, but {len(ann_files)} splits were given")
        items = [replace(it, split=s, key=make_key(source, s, it.data["image_id"]))
                 for it in items for s in [hash_split(str(it.data["file_name"]), val_fraction, split_seed)]]
        splits = ["train", "val"]
    return ConversionPlan(format=rules.format, source=source, task=rules.task, build=build, items=items,
                          splits=splits, skipped=skipped)


def choose_layout(root: str | Path | None, layouts: tuple[tuple[str, str], ...], split: str) -> tuple[str, str]:
    """The first (annotation, images) template pair whose annotation file exists under `root` for
    `split`; the first pair when none does (its error then names the expected file)."""
    if root is not None:
        for layout in layouts:
            if resolve_template(layout[0], root, split).is_file():
                return layout
    return layouts[0]


def plan(root: str | Path | None, *, splits: list[str] | None = None, ann: str | None = None,
         images: str | None = None, name: str | None = None, rules: CocoRules = COCO_RULES,
         default_splits: tuple[str, ...] = ("train2017",),
         layouts: tuple[tuple[str, str], ...] = ((DEFAULT_ANN, DEFAULT_IMAGES),),
         val_fraction: float = 0.0, split_seed: int = 0) -> ConversionPlan:
    """Plan a COCO-format dataset. `ann` and `images` are paths (absolute or relative to `root`)
    that may hold `{split}`; by default the first of `layouts` (annotation, images templates) whose
    annotation file exists, e.g. `<root>/annotations/instances_{split}.json` and `<root>/{split}/`.
    `name` is the source name (default: the format)."""
    splits = list(splits or default_splits)
    default_ann, default_images = choose_layout(root, layouts, splits[0])
    ann_template = ann or default_ann
    if len(splits) > 1 and "{split}" not in ann_template:
        raise ValueError(f"annotation file {ann_template} is one file but {len(splits)} splits were asked: "
                         "give --ann with {split} in it")
    ann_files = {s: resolve_template(ann_template, root, s) for s in splits}
    images_dirs = {s: resolve_template(images or default_images, root, s) for s in splits}
    return plan_coco_json(ann_files, images_dirs, source=name or rules.format, rules=rules,
                          val_fraction=val_fraction, split_seed=split_seed)


def build(item: WorkItem) -> Built:
    """One image of a COCO-format file -> a `Sample` (objects whose masks fail are skipped)."""
    d = item.data
    image = read_image(d["file"])
    check_image_size(image, d["file"], d["height"], d["width"], d["ann_file"])
    skips: list[Skip] = []
    objects = []
    for obj in d["objects"]:
        where = f"{d['ann_file']}: image {d['image_id']}, {obj['id']}"
        if not obj["text"]:
            skips.append(Skip("no_expression", obj["id"], f"{where}: empty category name"))
            continue
        masks = []
        for ann in obj["anns"]:
            try:
                masks.append(decode_coco_segmentation(ann["segmentation"], image.height, image.width))
            except Exception as e:  # pycocotools and malformed data raise many types
                # Counted and left out; a part keeps its other annotations, as the reference does.
                skips.append(Skip("bad_annotation", f"ann {ann['id']}",
                                  f"{d['ann_file']}: annotation {ann['id']} (image {d['image_id']}): {e}"))
        if not masks:
            continue
        mask = merge_masks(masks)
        if not mask.any():
            skips.append(Skip("empty_mask", obj["id"], f"{where}: mask is empty"))
            continue
        objects.append(SampleObject([obj["text"]], mask, category=obj["category"], id=obj["id"]))
    sample = Sample(key=item.key, source=d["source"], task=d["task"], image_bytes=image.data,
                    image_ext=image.ext, objects=objects, height=image.height, width=image.width,
                    image_file=d["file_name"], meta={"split": item.split, "image_id": d["image_id"]})
    return built_or_skip(sample, skips)
