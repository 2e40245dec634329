"""Stage 2 of the data path: one raw sample -> one image's model inputs (an "example").

`decode` turns the raw bytes of a shard member group into a checked `Sample` and its RGB image
(raising `SampleError` with a countable reason); `pick_expressions` / `all_expressions` choose its
(object, expression) pairs (training draws some, evaluation takes all), `add_negatives` adds
no-target expressions from the source's vocabulary, and `make_example` prepares the image for SAM
(uint8, finished on the device: see `collate.finish_batch`) and BEiT-3. `docs/data.md` maps the path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .schema import Sample, SampleError, SampleObject, decode_sample
from .transforms import beit3_preprocess, sam_input_hw, sam_input_uint8

log = logging.getLogger(__name__)

SAM_VARIANTS = ("sam", "sam2")
SAM_RESIZE_PLACES = ("worker", "device")
#: How training draws a referring image's expressions (`pick_expressions`).
EXPRESSION_SAMPLING = ("sentences", "objects")



def decode(raw: dict[str, Any]) -> tuple[Sample, np.ndarray]:
    """A raw sample -> (`Sample`, its (H, W, 3) uint8 RGB image).

    Raises `SampleError` whose message names the shard and the key; an incomplete sample at the
    point where a shard breaks off gets the reason `truncated_tar`."""
    where = f"shard {raw.get('__url__', '?')}, sample {raw.get('__key__', '?')}"
    try:
        sample = decode_sample(raw, where)
        return sample, sample.decode_image()
    except SampleError as e:
        if raw.get("__truncated__"):
            raise SampleError("truncated_tar", f"{where}: incomplete, the shard breaks off here ({e})") from e
        if where not in str(e):
            raise SampleError(e.reason, f"{where}: {e}") from e
        raise


@dataclass(frozen=True)
class Preprocessing:
    """How an image and its expressions become model inputs."""

    sam_image_size: int = 1024
    sam_variant: str = "sam"
    beit_image_size: int = 224
    max_text_length: int = 64
    tokenizer: str = ""
    sam_resize: str = "worker"
    """Where SAM-1's Pillow resize runs: "worker" (in the data workers) or "device" (in
    `finish_batch`, after the transfer; the same pixels). SAM-2 always resizes in the workers."""

    def __post_init__(self) -> None:
        if self.sam_variant not in SAM_VARIANTS:
            raise ValueError(f"sam_variant {self.sam_variant!r} not in {SAM_VARIANTS}")
        if self.sam_resize not in SAM_RESIZE_PLACES:
            raise ValueError(f"sam_resize {self.sam_resize!r} not in {SAM_RESIZE_PLACES}")

    @property
    def resize_on_device(self) -> bool:
        return self.sam_resize == "device" and self.sam_variant == "sam"


def pick_objects(sample: Sample, rng: np.random.Generator, k: int) -> list[tuple[int, int]]:
    """Up to k (object, expression) index pairs, objects without repetition, in object order."""
    n = len(sample.objects)
    chosen = sorted(int(i) for i in rng.choice(n, size=min(k, n), replace=False))
    return [(i, int(rng.integers(len(sample.objects[i].expressions)))) for i in chosen]


VOCABULARY_FILE = "vocabulary.json"


@dataclass(frozen=True)
class Vocabulary:
    """The category names a source's converter recorded (`vocabulary.json` beside `sizes.json`:
    {"templates": ["[semantic] {}"], "names": [...]}) and the forms a negative is phrased in: each
    template turns a name into an expression, one drawn uniformly per negative (a template listed
    twice is drawn twice as often). `"template": "..."` is the same as a list of one."""

    names: tuple[str, ...] = ()
    templates: tuple[str, ...] = ("{}",)

    def __post_init__(self) -> None:
        if isinstance(self.templates, str) or not self.templates:
            raise ValueError(f"templates must be a non-empty list of strings, not {self.templates!r}")
        for t in self.templates:
            try:
                once = isinstance(t, str) and t.format("\0").count("\0") == 1
            except (IndexError, KeyError, ValueError):
                once = False
            if not once:
                raise ValueError(f"template {t!r} must hold the name's place once, as {{}}")

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Vocabulary:
        """A `vocabulary.json` record: {"names": [...]} with "templates": [...] or "template": "..."
        (default "{}"), not both."""
        if "template" in data and "templates" in data:
            raise ValueError('give "template" or "templates", not both')
        templates = data["templates"] if "templates" in data else [data.get("template", "{}")]
        if not isinstance(templates, list) or not isinstance(data["names"], list):
            raise ValueError('"templates" and "names" must be lists')
        return cls(tuple(str(n) for n in data["names"]), tuple(templates))

    def absent(self, sample: Sample) -> list[str]:
        """The names that occur in none of the image's target objects (category, id, expressions;
        whole words, case-insensitive), in vocabulary order."""
        import re

        text = " \n ".join(" \n ".join([str(o.category or ""), str(o.id or ""), *o.expressions]).lower()
                           for o in sample.objects if not o.no_target)
        return [n for n in self.names if not re.search(r"(?<!\w)" + re.escape(n.lower()) + r"(?!\w)", text)]


def read_vocabulary(name: str, urls: list[str]) -> Vocabulary:
    """The `vocabulary.json` files beside a source's local shards, merged (names in first-seen order;
    every file must phrase negatives with the same templates)."""
    names: list[str] = []
    templates = None
    for folder in dict.fromkeys(os.path.dirname(u) for u in urls if "://" not in u and not u.startswith("pipe:")):
        path = os.path.join(folder, VOCABULARY_FILE)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                vocabulary = Vocabulary.from_record(json.load(f))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"source {name}: {path} is not a vocabulary "
                             f"({{\"templates\" or \"template\", \"names\"}}): {e}") from None
        if templates is not None and vocabulary.templates != templates:
            raise ValueError(f"source {name}: {path} has templates {list(vocabulary.templates)!r}, "
                             f"another folder {list(templates)!r}")
        templates = vocabulary.templates
        names += [n for n in vocabulary.names if n not in names]
    if not names:
        log.warning("source %s: no %s beside its shards: no negatives drawn from it (data.negatives_per_image)",
                    name, VOCABULARY_FILE)
    return Vocabulary(tuple(names), templates or ("{}",))


def add_negatives(sample: Sample, picks: list[tuple[int, int]], vocabulary: Vocabulary, k: int,
                  rng: np.random.Generator) -> tuple[Sample, list[tuple[int, int]]]:
    """Up to k no-target objects (all-zero mask, one expression naming an absent category in one of
    the vocabulary's templates), drawn with `rng` after the picks (so the stream stays a function of
    (seed, rank, batch, slot)); k = 0 or no absent name leaves `rng` untouched."""
    absent = vocabulary.absent(sample) if k > 0 else []
    if not absent:
        return sample, picks
    chosen = sorted(int(i) for i in rng.choice(len(absent), size=min(k, len(absent)), replace=False))
    templates = vocabulary.templates
    # A single template draws nothing more: those sources' streams are what they were before templates.
    forms = rng.integers(len(templates), size=len(chosen)) if len(templates) > 1 else [0] * len(chosen)
    zeros = np.zeros((sample.height, sample.width), dtype=np.uint8)
    extra = [SampleObject([templates[int(f)].format(absent[i])], zeros, category=absent[i], no_target=True)
             for i, f in zip(chosen, forms, strict=True)]
    n = len(sample.objects)
    sample = dataclasses.replace(sample, objects=[*sample.objects, *extra])
    return sample, [*picks, *((n + j, 0) for j in range(len(extra)))]


def pick_sentences(sample: Sample, rng: np.random.Generator, k: int) -> list[tuple[int, int]]:
    """EVF-SAM's referring draw: k distinct sentences from all sentences of all objects of the
    image (without replacement, in draw order), each paired with its own object's mask; an image
    with fewer than k sentences gives all of them, in order. Objects may repeat."""
    pairs = all_expressions(sample)
    if len(pairs) < k:
        return pairs
    return [pairs[int(i)] for i in rng.choice(len(pairs), size=k, replace=False)]


def pick_expressions(sample: Sample, rng: np.random.Generator, k: int, sampling: str) -> list[tuple[int, int]]:
    """A training image's (object, expression) pairs: `pick_sentences` for referring samples when
    `sampling` is "sentences", `pick_objects` otherwise (and for every other task)."""
    if sampling == "sentences" and sample.task == "referring":
        return pick_sentences(sample, rng, k)
    return pick_objects(sample, rng, k)


def all_expressions(sample: Sample) -> list[tuple[int, int]]:
    """Every expression of every object, in order (evaluation scores each one)."""
    return [(i, j) for i, obj in enumerate(sample.objects) for j in range(len(obj.expressions))]


def eval_text(text: str, task: str) -> str:
    """An expression as the reference's evaluation reads it: referring sentences `strip().lower()`-ed
    (EVF-SAM's ValDataset), other tasks' texts (`[semantic] wall`, category names) as written."""
    return text.strip().lower() if task == "referring" else text


def make_example(sample: Sample, image: np.ndarray, picks: Sequence[tuple[int, int]],
                 prep: Preprocessing, source: str,
                 image_features: dict[str, torch.Tensor] | None = None, evaluation: bool = False) -> dict[str, Any]:
    """One image's preprocessed inputs and the chosen (mask, expression) pairs. `source` is the
    configured source name (what logs and per-source metrics use), not the record's. With
    `image_features` (from an embedding cache) the SAM image is not prepared at all. `evaluation`
    applies the reference's evaluation text rule (`eval_text`)."""
    if image_features is None and not prep.resize_on_device:
        sam, resize_hw = sam_input_uint8(image, prep.sam_variant, prep.sam_image_size)
    else:  # cached features (no SAM image), or the decoded image, resized in finish_batch
        sam = None if image_features is not None else \
            torch.from_numpy(image if image.flags.writeable else np.array(image))
        resize_hw = sam_input_hw(sample.height, sample.width, prep.sam_variant, prep.sam_image_size)
    masks = np.stack([sample.objects[i].mask for i, _ in picks])
    return {
        "sam": sam, "image_features": image_features, "beit": beit3_preprocess(image, prep.beit_image_size),
        "resize_hw": resize_hw,
        "original_hw": (sample.height, sample.width), "masks": torch.from_numpy(masks),
        "expressions": [eval_text(sample.objects[i].expressions[j], sample.task) if evaluation
                        else sample.objects[i].expressions[j] for i, j in picks],
        "object_index": [i for i, _ in picks],
        "key": sample.key, "source": source, "task": sample.task,
    }
