"""One training sample on disk: the shard format shared by every converter and every stream.

A sample is one image with its objects. In a WebDataset tar, the members of sample `KEY` are:

- `KEY.<ext>`          the original image bytes, never re-encoded (`ext` is jpg, jpeg or png);
- `KEY.json`           the record below (UTF-8 JSON);
- `KEY.mask_<i>.png`   object i's mask: 8-bit grayscale PNG of the image's size, 0 = background,
                       1 = object, 255 = ignore (i counts from 000, three digits or more).

`KEY` has no dots (WebDataset splits the key at the first dot). The record:

    {"version": 1, "key": KEY, "source": "refcoco", "task": "referring",
     "image": {"member": "jpg", "height": H, "width": W, "file": "COCO_train2014_...jpg"},
     "objects": [{"mask": "mask_000.png", "expressions": ["the man on the left", ...],
                  "category": "person", "id": "ann 123 / ref 45"}, ...],
     # gRefCOCO no-target expressions: an all-zero mask and "no_target": true in the object
     "meta": {...free-form provenance, e.g. split...}}

Expressions are stored as the model will read them: the SPEC's text rules (the `[semantic] `
prefix for semantic and part data, label remapping, left/right naming) are applied by the converters.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

SCHEMA_VERSION = 1
TASK_KINDS = ("referring", "semantic", "instance", "part")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
#: Mask value of pixels that count in neither the loss nor the metrics (the one definition).
IGNORE_VALUE = 255
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


class SampleError(ValueError):
    """A sample that cannot be used. `reason` is a short, countable tag (e.g. "bad_image")."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def make_key(*parts: Any) -> str:
    """A WebDataset-safe sample key from parts (dots and other characters become '_')."""
    key = "-".join(re.sub(r"[^A-Za-z0-9_\-]", "_", str(p)) for p in parts)
    if not key:
        raise ValueError("empty sample key")
    return key


@dataclass
class SampleObject:
    """One object of an image: its expressions and its mask (uint8 (H, W), values 0/1/255)."""

    expressions: list[str]
    mask: np.ndarray
    category: str | None = None
    id: str | None = None
    no_target: bool = False  # an expression that refers to nothing in the image (gRefCOCO): all-zero mask


@dataclass
class Sample:
    """One image with its objects, decoded."""

    key: str
    source: str
    task: str
    image_bytes: bytes
    image_ext: str
    objects: list[SampleObject]
    height: int
    width: int
    image_file: str | None = None
    meta: dict = field(default_factory=dict)

    def decode_image(self) -> np.ndarray:
        """The image as an (H, W, 3) uint8 RGB array."""
        try:
            with Image.open(io.BytesIO(self.image_bytes)) as im:
                arr = image_to_rgb(im)
        except Exception as e:  # PIL raises many types for corrupt data
            raise SampleError("bad_image", f"sample {self.key}: image does not decode ({e})") from e
        if arr.shape[:2] != (self.height, self.width):
            raise SampleError("bad_image", f"sample {self.key}: image is {arr.shape[:2]}, record says "
                                           f"{(self.height, self.width)}")
        return arr


def image_to_rgb(im: Image.Image) -> np.ndarray:
    """An opened image as (H, W, 3) uint8 RGB. 16-bit grayscale (modes I;16*, and I holding values up
    to 65535) is scaled to 8 bits (v / 257), not clipped at 255 as Pillow's convert("RGB") would;
    other high-depth modes are refused with ValueError."""
    if im.mode.startswith("I"):
        values = np.asarray(im.convert("I") if im.mode != "I" else im).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{im.mode} image with values outside 0..65535: convert it to 8-bit RGB first")
        gray = np.round(values / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        raise ValueError("floating-point image: convert it to 8-bit RGB first")
    return np.asarray(im.convert("RGB"))


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A 0/1(/255) uint8 or bool mask as a lossless 8-bit grayscale PNG."""
    m = np.asarray(mask)
    if m.dtype == bool:
        m = m.astype(np.uint8)
    if m.dtype != np.uint8 or m.ndim != 2:
        raise ValueError(f"mask must be a 2-D uint8/bool array, got {m.dtype} {m.shape}")
    buf = io.BytesIO()
    Image.fromarray(m, mode="L").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_mask_png(data: bytes, where: str = "") -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "1", "P"):
                raise ValueError(f"mode {im.mode}")
            return np.asarray(im.convert("L") if im.mode == "1" else im).astype(np.uint8)
    except Exception as e:
        raise SampleError("bad_mask", f"{where}: mask does not decode ({e})") from e


def encode_sample(sample: Sample) -> dict[str, Any]:
    """The member dict to hand to `webdataset.TarWriter.write` (bytes values, `__key__`)."""
    if not _KEY_OK.match(sample.key):
        raise ValueError(f"sample key {sample.key!r} must match {_KEY_OK.pattern}")
    if sample.task not in TASK_KINDS:
        raise ValueError(f"sample {sample.key}: task {sample.task!r} not in {TASK_KINDS}")
    ext = sample.image_ext.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"sample {sample.key}: image extension {ext!r} not in {IMAGE_EXTENSIONS}")
    members: dict[str, Any] = {"__key__": sample.key, ext: sample.image_bytes}
    objects = []
    for i, obj in enumerate(sample.objects):
        if obj.mask.shape != (sample.height, sample.width):
            raise ValueError(f"sample {sample.key}: object {i} mask {obj.mask.shape} != image "
                             f"{(sample.height, sample.width)}")
        name = f"mask_{i:03d}.png"
        members[name] = encode_mask_png(obj.mask)
        rec = {"mask": name, "expressions": list(obj.expressions)}
        if obj.category is not None:
            rec["category"] = obj.category
        if obj.id is not None:
            rec["id"] = obj.id
        if obj.no_target:
            rec["no_target"] = True
        objects.append(rec)
    record = {
        "version": SCHEMA_VERSION, "key": sample.key, "source": sample.source, "task": sample.task,
        "image": {"member": ext, "height": int(sample.height), "width": int(sample.width),
                  "file": sample.image_file},
        "objects": objects, "meta": sample.meta,
    }
    members["json"] = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return members


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def validate_record(rec: Any, where: str) -> None:
    """Check a sample's JSON record against the schema above (types and shapes, not file contents).

    Raises `SampleError("bad_record")` naming the first offending key, e.g. `objects[1]` or
    `objects[0].expressions`: a record of valid JSON but the wrong shape is a counted skip, never an
    uncaught exception further down the stream. Keys the schema does not know are allowed."""

    def bad(key: str, wanted: str, value: Any) -> SampleError:
        return SampleError("bad_record", f"{where}: record key `{key}` must be {wanted}, got {_kind(value)}")

    def number(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if not isinstance(rec, dict):
        raise bad("(top level)", "an object", rec)
    for key in ("source", "task"):
        if not isinstance(rec.get(key), str):
            raise bad(key, "a string", rec.get(key))
    if rec["task"] not in TASK_KINDS:
        raise SampleError("bad_record", f"{where}: record key `task` is {rec['task']!r}, not one of {TASK_KINDS}")
    image = rec.get("image")
    if not isinstance(image, dict):
        raise bad("image", "an object", image)
    if not isinstance(image.get("member"), str):
        raise bad("image.member", "a member name (string)", image.get("member"))
    for key in ("height", "width"):
        if not number(image.get(key)):
            raise bad(f"image.{key}", "a positive integer", image.get(key))
    if image.get("file") is not None and not isinstance(image["file"], str):
        raise bad("image.file", "a string", image["file"])
    for key, kinds, wanted in (("key", str, "a string"), ("meta", dict, "an object")):
        if rec.get(key) is not None and not isinstance(rec[key], kinds):
            raise bad(key, wanted, rec[key])
    objects = rec.get("objects")
    if not isinstance(objects, list):
        raise bad("objects", "a list of objects", objects)
    for i, o in enumerate(objects):
        if not isinstance(o, dict):
            raise bad(f"objects[{i}]", "an object", o)
        if not isinstance(o.get("mask"), str):
            raise bad(f"objects[{i}].mask", "a member name (string)", o.get("mask"))
        exprs = o.get("expressions", [])
        if not isinstance(exprs, list):
            raise bad(f"objects[{i}].expressions", "a list of strings", exprs)
        for j, e in enumerate(exprs):
            if not isinstance(e, str):
                raise bad(f"objects[{i}].expressions[{j}]", "a string", e)
        if o.get("category") is not None and not isinstance(o["category"], str):
            raise bad(f"objects[{i}].category", "a string", o["category"])


def decode_sample(members: dict[str, Any], where: str | None = None) -> Sample:
    """A raw WebDataset sample (member suffix -> bytes) back into a `Sample`.

    Raises `SampleError` with a countable reason for every way a sample can be unusable:
    bad_json, bad_record (valid JSON of the wrong shape), missing_image, missing_mask, bad_mask,
    mask_size, no_expression."""
    key = members.get("__key__", "?")
    where = where or f"{members.get('__url__', '?')}:{key}"
    if "json" not in members:
        raise SampleError("bad_json", f"{where}: no .json record member")
    try:
        rec = json.loads(members["json"])
    except Exception as e:
        raise SampleError("bad_json", f"{where}: malformed JSON record ({e})") from e
    validate_record(rec, where)
    image = rec["image"]
    height, width, ext = image["height"], image["width"], image["member"]
    if ext not in members:
        raise SampleError("missing_image", f"{where}: image member .{ext} missing")
    objects = []
    for i, o in enumerate(rec["objects"]):
        exprs = [e for e in o.get("expressions", []) if e.strip()]
        if not exprs:
            raise SampleError("no_expression", f"{where}: object {i} has no expression")
        name = o["mask"]
        if name not in members:
            raise SampleError("missing_mask", f"{where}: mask member .{name} missing")
        mask = decode_mask_png(members[name], f"{where}.{name}")
        if mask.shape != (height, width):
            raise SampleError("mask_size", f"{where}: mask {name} is {mask.shape}, image is {(height, width)}")
        objects.append(SampleObject(exprs, mask, o.get("category"), o.get("id"), no_target=o.get("no_target") is True))
    if not objects:
        raise SampleError("no_expression", f"{where}: sample has no object")
    return Sample(key=str(rec.get("key", key)), source=rec["source"], task=rec["task"], image_bytes=members[ext],
                  image_ext=ext, objects=objects, height=height, width=width,
                  image_file=image.get("file"), meta=rec.get("meta") or {})
