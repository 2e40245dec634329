"""Rules every converter shares, kept in one place: the text rules of the SPEC (section 4), COCO
polygon/RLE decoding, part-mask merging, label maps (pairing, reading, one object per class), image
reading and safe pickles.

Text rules:
- referring data: the sentence as annotated (`sent` in the refer pickles);
- instance data (COCO, Objects365): the category name as written, whitespace normalised;
- semantic and part data: `"[semantic] " + name`, where the name has its separators
  (':' and '_' for Pascal-Part, '-' for HumanParsing) turned into spaces.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..convert import Built, Skip, WorkItem, built_or_skip
from ..schema import Sample, SampleError, SampleObject, make_key

SEMANTIC_PREFIX = "[semantic] "
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def clean_name(name: str, *, separators: str = "", lower: bool = False) -> str:
    """A class name as text: each character of `separators` becomes a space, runs of whitespace
    collapse to one, optionally lower-cased (e.g. `clean_name("aeroplane:body", separators=":_")`
    -> "aeroplane body")."""
    for sep in separators:
        name = name.replace(sep, " ")
    name = " ".join(name.split())
    return name.lower() if lower else name


def semantic_expression(name: str) -> str:
    """The expression for a semantic or part class: `"[semantic] " + name`."""
    return SEMANTIC_PREFIX + name


def merge_masks(masks: Iterable[np.ndarray]) -> np.ndarray:
    """The union of 0/1 masks, clipped to 0/1 (the reference summed parts past 1)."""
    out = None
    for m in masks:
        out = (m > 0) if out is None else (out | (m > 0))
    if out is None:
        raise ValueError("merge_masks needs at least one mask")
    return out.astype(np.uint8)


def _decode_rle(rle: Any, height: int, width: int) -> np.ndarray:
    """One RLE dict (compressed or uncompressed counts) of the image's size -> (H, W) 0/1 mask."""
    from pycocotools import mask as mask_utils

    if not (isinstance(rle, dict) and "counts" in rle and "size" in rle):
        raise ValueError(f"RLE piece of type {type(rle).__name__} lacks 'size' and 'counts'")
    size = [int(v) for v in rle["size"]]
    if size != [height, width]:
        raise ValueError(f"RLE size {size} differs from the image size {[height, width]}")
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
    elif isinstance(counts, (str, bytes)):
        rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"RLE counts of type {type(counts).__name__}")
    return mask_utils.decode(rle)


def _decode_polygons(polygons: list, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    polygons = [[float(v) for v in poly] for poly in polygons]
    # Pieces under 3 points have no area; pycocotools would even read a 4-value first piece as a box.
    valid = [p for p in polygons if len(p) >= 6 and len(p) % 2 == 0]
    if not valid:
        raise ValueError(f"polygon lengths {[len(p) for p in polygons]}: none is an even count >= 6")
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(valid, height, width)))


def decode_coco_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Any COCO `segmentation` as an (H, W) uint8 0/1 mask: a list of polygons (flat
    `[x1, y1, x2, y2, ...]` lists), a bare RLE dict, or a list of RLE dicts (RefCLEF, Objects365),
    the pieces OR-ed; RLE counts compressed (string) or uncompressed (list). An empty list covers
    nothing. The one decoder of every COCO-based converter. Raises ValueError saying what is wrong."""
    if isinstance(segmentation, dict):
        mask = _decode_rle(segmentation, height, width)
    elif isinstance(segmentation, list):
        if not segmentation:  # an annotation without polygons covers nothing
            return np.zeros((height, width), np.uint8)
        if all(isinstance(piece, dict) for piece in segmentation):
            mask = merge_masks(_decode_rle(piece, height, width) for piece in segmentation)
        elif all(isinstance(piece, list) for piece in segmentation):
            mask = _decode_polygons(segmentation, height, width)
        else:
            kinds = sorted({type(piece).__name__ for piece in segmentation})
            raise ValueError(f"segmentation list mixes or holds {kinds}: expected polygons (lists) or RLE dicts")
    else:
        raise ValueError(f"segmentation of type {type(segmentation).__name__} is neither polygons nor RLE")
    if mask.shape != (height, width):
        raise ValueError(f"decoded mask is {mask.shape}, image is {(height, width)}")
    return np.ascontiguousarray(mask > 0, dtype=np.uint8)


@dataclass(frozen=True)
class ImageFile:
    """An image as stored: its original bytes, member extension (jpg/png) and size."""

    data: bytes
    ext: str
    height: int
    width: int


_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png"}


def read_image(path: str | Path) -> ImageFile:
    """Read an image file without re-encoding it; fully decodes it once to catch truncated files.
    Raises `SampleError` ("missing_image" or "bad_image") naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SampleError("missing_image", f"{path}: image file not found")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
            width, height = im.size
    except Exception as e:  # PIL raises many types for corrupt data
        raise SampleError("bad_image", f"{path}: image does not decode ({e})") from e
    if fmt not in _FORMAT_EXT:
        raise SampleError("bad_image", f"{path}: {fmt} image; shards hold JPEG or PNG bytes unchanged")
    return ImageFile(data, _FORMAT_EXT[fmt], height, width)


def check_image_size(image: ImageFile, path: str, height: int | None, width: int | None, where: str) -> None:
    """Raise `SampleError("size_mismatch")` when an annotation file (`where`) gives the image a size
    other than its real one (masks would not line up); a missing size is not checked."""
    if (height, width) not in ((image.height, image.width), (None, None)):
        raise SampleError("size_mismatch", f"{path}: image is {image.height}x{image.width}, "
                                           f"{where} says {height}x{width}")


def read_label_map(path: str | Path) -> np.ndarray:
    """A PNG label map as an (H, W) integer array of class indices (mode L, P (palette indices),
    I or I;16). Raises `SampleError` ("missing_label_map" or "bad_label_map") naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SampleError("missing_label_map", f"{path}: label map not found")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"mode {im.mode} is not a single-channel label map")
            return np.asarray(im).astype(np.int64)
    except Exception as e:
        raise SampleError("bad_label_map", f"{path}: label map does not decode ({e})") from e


def semantic_objects(labels: np.ndarray, names: dict[int, str], *, ignore: Iterable[int],
                     where: str) -> list[SampleObject]:
    """One object per class present in a label map: mask = (labels == value), expression
    `"[semantic] " + name`. Values in `ignore` make no object; any other unknown value raises
    `SampleError("bad_label_map")`."""
    present = set(np.unique(labels).tolist())
    unknown = present - set(names) - set(ignore)
    if unknown:
        raise SampleError("bad_label_map", f"{where}: label values {sorted(unknown)[:10]} are not classes "
                                           f"(known: {min(names)}..{max(names)})")
    return [SampleObject([semantic_expression(names[v])], (labels == v).astype(np.uint8),
                         category=names[v], id=f"label {v}")
            for v in sorted(present & set(names))]


def pair_files(images_dir: Path, labels_dir: Path, split: str, source: str, items: list[WorkItem],
               skipped: list[Skip], label_suffix: str = ".png") -> None:
    """Pair `images_dir/<stem>.<jpg|png>` with `labels_dir/<stem>.png` into work items; unpaired
    files are counted as skips. Shared by the label-map formats (ADE20K, HumanParsing)."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: image folder not found")
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"{labels_dir}: label folder not found")
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    labels = {p.stem: p for p in sorted(labels_dir.iterdir()) if p.suffix.lower() == label_suffix}
    for stem in sorted(labels.keys() - images.keys()):
        skipped.append(Skip("missing_image", stem, f"{labels[stem]}: label map has no image in {images_dir}"))
    for stem in sorted(images):
        key = make_key(source, split, stem)
        if stem not in labels:
            skipped.append(Skip("missing_label_map", key, f"{images[stem]}: no label map {stem}{label_suffix} "
                                                          f"in {labels_dir}"))
            continue
        items.append(WorkItem(split, key, {"image": str(images[stem]), "labels": str(labels[stem]),
                                           "stem": stem, "source": source}))


def build_label_map_sample(item: WorkItem, names: dict[int, str], ignore: tuple[int, ...]) -> Built:
    """An image + label map work item (from `pair_files`) -> a semantic `Sample`."""
    d = item.data
    image = read_image(d["image"])
    labels = read_label_map(d["labels"])
    if labels.shape != (image.height, image.width):
        raise SampleError("size_mismatch", f"{d['labels']}: label map is {labels.shape}, image {d['image']} "
                                           f"is {(image.height, image.width)}")
    objects = semantic_objects(labels, names, ignore=ignore, where=d["labels"])
    sample = Sample(key=item.key, source=d["source"], task="semantic", image_bytes=image.data,
                    image_ext=image.ext, objects=objects, height=image.height, width=image.width,
                    image_file=Path(d["image"]).name, meta={"split": item.split, "label_map": Path(d["labels"]).name})
    return built_or_skip(sample, [])


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that references something other than plain containers, strings and numbers."""


# Plain data only: refer pickles hold lists/dicts of str/int/float. `_codecs.encode` is how
# protocol-2 pickles written by Python 3 store bytes; it converts data and runs nothing else.
_SAFE_GLOBALS = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "int",
                                           "float", "bool", "bytes", "bytearray", "complex")}
_SAFE_GLOBALS.add(("_codecs", "encode"))


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, encoding: str):
        super().__init__(file, encoding=encoding)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # Python 2 pickles name it so
        if (module, name) not in _SAFE_GLOBALS:
            raise UnsafePickleError(f"{self._path}: refusing to load, the pickle references "
                                    f"{module}.{name} (only plain containers, strings and numbers are allowed)")
        return super().find_class(module, name)


def load_pickle(path: str | Path) -> Any:
    """Load a pickle of plain data (lists, dicts, strings, numbers) with a restricted unpickler;
    anything else raises `UnsafePickleError` naming the file. Python 2 strings decode as UTF-8,
    falling back to Latin-1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pickle not found")
    data = path.read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), path, "utf-8").load()
    except UnicodeDecodeError:
        # Python 2 byte strings that are not UTF-8: Latin-1 maps every byte, so loading succeeds.
        return _RestrictedUnpickler(io.BytesIO(data), path, "latin1").load()
    except UnsafePickleError:
        raise
    except Exception as e:
        raise pickle.UnpicklingError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
