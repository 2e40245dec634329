"""From decoded samples to the batch dict the model consumes, as torch IterableDatasets.

`TrainStream` is the endless mixed training stream of one rank, `EvalStream` the finite, ordered
stream of one validation/test source split exactly across ranks. Both yield whole batches
(use `DataLoader(batch_size=None)`), preprocessed and tokenised in the workers.

The workers leave the SAM image as uint8 (`sam_pixels_uint8`): its float conversion and
normalisation run after the transfer to the device (`finish_batch`, called by
`EvfDataModule.on_after_batch_transfer`), with the arithmetic of `transforms.sam_preprocess`, so
the model sees bit-identical pixels while workers produce, stack and transfer a quarter of the bytes.
With `Preprocessing.sam_resize="device"` (SAM-1, training on a GPU) the workers do not even resize:
batches carry the decoded images (`sam_images_uint8`) and `finish_batch` runs Pillow's bilinear
resize on the device (`pillow_resize.resize_bilinear`, the same pixels) before the finish.

The batch dict (B images, N = sum of n_i expressions) as the model receives it:

    sam_pixel_values   float (B, 3, S, S)      SAM input (`transforms.sam_preprocess`, or sam2_preprocess);
                       from the workers as    uint8 `sam_pixels_uint8` (B, S, S, 3) (`transforms.sam_input_uint8`),
                                              or (sam_resize="device") `sam_images_uint8`, B uint8 (H_i, W_i, 3)
                                              decoded images, and `sam_resize_sizes`, B (h', w') tuples
    image_features     dict of bf16 (B, ...)   instead of the SAM image, with an embedding cache (training only)
    beit_pixel_values  float (B, 3, 224, 224)  BEiT-3 input (`transforms.beit3_preprocess`)
    resize_hw          long (B, 2)             (h', w') returned by the SAM preprocessing
    original_hw        long (B, 2)             (H, W) of the original image
    input_ids          long (N, L)             right-padded with 1
    attention_mask     bool (N, L)             input_ids != 1
    image_index        long (N,)               image of each expression, nondecreasing
    object_index       long (N,)               object (within its image's record) of each expression
    offsets            long (B + 1,)           [0, n0, n0 + n1, ...]
    masks              list of B uint8 (n_i, H_i, W_i), 0/1/255 (255 = ignore), one per expression
                       (an object's mask repeats when several of its expressions are drawn)
    keys, sources, tasks   list[str] (B)
    expressions        list[str] (N)
    data_stats         dict[str, int]: "images" (B), "skipped" (samples skipped while producing this
                       batch) and one count per reason in `stream.SKIP_REASONS` ("read_error" counts
                       unreadable shards and is not part of "skipped"). Counts are this batch's
                       share only, so summing over consumed batches and ranks gives the totals.

Training batches also carry `_stream` (rank, batch index, logical worker, reader positions);
`EvfDataModule.on_before_batch_transfer` removes it and records it as the consumed position.
An eval batch may hold fewer than B images (or none) when samples are skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .embedding_cache import EmbeddingCache
from .mixing import Mixer, sample_rng
from .pillow_resize import resize_bilinear
from .schema import Sample, SampleError, SampleObject
from .stream import DataError, SkipLog, SourceReader, decode, iter_shard
from .tokenizer import load_tokenizer, tokenize
from .transforms import beit3_preprocess, normalise_sam_pixels, sam_input_hw, sam_input_uint8

SAM_VARIANTS = ("sam", "sam2")
SAM_RESIZE_PLACES = ("worker", "device")
#: How training draws a referring image's expressions (`pick_expressions`).
EXPRESSION_SAMPLING = ("sentences", "objects")
#: A source whose reader fails this many samples in a row is broken, not unlucky.
MAX_CONSECUTIVE_SKIPS = 1000


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


@lru_cache(maxsize=4)
def cached_tokenizer(path: str) -> Any:
    """The tokenizer at `path`, loaded once per process (workers inherit or load it)."""
    return load_tokenizer(path)


def pick_objects(sample: Sample, rng: np.random.Generator, k: int) -> list[tuple[int, int]]:
    """Up to k (object, expression) index pairs, objects without repetition, in object order."""
    n = len(sample.objects)
    chosen = sorted(int(i) for i in rng.choice(n, size=min(k, n), replace=False))
    return [(i, int(rng.integers(len(sample.objects[i].expressions)))) for i in chosen]


VOCABULARY_FILE = "vocabulary.json"


@dataclass(frozen=True)
class Vocabulary:
    """The category names a source's converter recorded (`vocabulary.json` beside `sizes.json`:
    {"template": "[semantic] {}", "names": [...]}); `template` turns a name into an expression."""

    names: tuple[str, ...] = ()
    template: str = "{}"

    def absent(self, sample: Sample) -> list[str]:
        """The names that occur in none of the image's target objects (category, id, expressions;
        whole words, case-insensitive), in vocabulary order."""
        import re

        text = " \n ".join(" \n ".join([str(o.category or ""), str(o.id or ""), *o.expressions]).lower()
                           for o in sample.objects if not o.no_target)
        return [n for n in self.names if not re.search(r"(?<!\w)" + re.escape(n.lower()) + r"(?!\w)", text)]


def add_negatives(sample: Sample, picks: list[tuple[int, int]], vocabulary: Vocabulary, k: int,
                  rng: np.random.Generator) -> tuple[Sample, list[tuple[int, int]]]:
    """Up to k no-target objects (all-zero mask, one expression naming an absent category), drawn
    with `rng` after the picks (so the stream stays a function of (seed, rank, batch, slot))."""
    absent = vocabulary.absent(sample) if k > 0 else []
    if not absent:
        return sample, picks
    chosen = sorted(int(i) for i in rng.choice(len(absent), size=min(k, len(absent)), replace=False))
    zeros = np.zeros((sample.height, sample.width), dtype=np.uint8)
    extra = [SampleObject([vocabulary.template.format(absent[i])], zeros, category=absent[i], no_target=True)
             for i in chosen]
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


def collate(examples: Sequence[dict[str, Any]], prep: Preprocessing) -> dict[str, Any]:
    """Examples -> the batch dict (without `data_stats`), tokenising every expression."""
    b = len(examples)
    counts = [len(ex["expressions"]) for ex in examples]
    expressions = [e for ex in examples for e in ex["expressions"]]
    if expressions:
        input_ids, attention_mask = tokenize(cached_tokenizer(prep.tokenizer), expressions, prep.max_text_length)
    else:
        input_ids, attention_mask = torch.ones(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.bool)
    s, t = prep.sam_image_size, prep.beit_image_size
    if b and examples[0]["image_features"] is not None:
        image = {"image_features": {k: torch.stack([ex["image_features"][k] for ex in examples])
                                    for k in examples[0]["image_features"]}}
    elif prep.resize_on_device:
        image = {"sam_images_uint8": [ex["sam"] for ex in examples],
                 "sam_resize_sizes": [tuple(ex["resize_hw"]) for ex in examples], "sam_image_size": s}
    else:
        image = {"sam_pixels_uint8": torch.stack([ex["sam"] for ex in examples]) if b
                 else torch.zeros(0, s, s, 3, dtype=torch.uint8)}
    return {
        **image,
        "beit_pixel_values": torch.stack([ex["beit"] for ex in examples]) if b else torch.zeros(0, 3, t, t),
        "resize_hw": torch.tensor([ex["resize_hw"] for ex in examples], dtype=torch.long).reshape(b, 2),
        "original_hw": torch.tensor([ex["original_hw"] for ex in examples], dtype=torch.long).reshape(b, 2),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_index": torch.repeat_interleave(torch.arange(b), torch.tensor(counts, dtype=torch.long)),
        "object_index": torch.tensor([o for ex in examples for o in ex["object_index"]], dtype=torch.long),
        "offsets": torch.tensor([0, *np.cumsum(counts, dtype=np.int64).tolist()], dtype=torch.long),
        "masks": [ex["masks"] for ex in examples],
        "keys": [ex["key"] for ex in examples],
        "sources": [ex["source"] for ex in examples],
        "tasks": [ex["task"] for ex in examples],
        "expressions": expressions,
    }


def finish_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Turn the workers' uint8 SAM images into the model's input floats, where the batch lies (the
    device, after transfer): `sam_pixels_uint8` -> `sam_pixel_values`, bit-identical to
    `transforms.sam_preprocess`. A batch without uint8 images is returned as it is."""
    if isinstance(batch, dict) and "sam_images_uint8" in batch:  # resize here (sam_resize="device")
        batch["sam_pixels_uint8"] = resize_to_canvas(batch.pop("sam_images_uint8"), batch.pop("sam_resize_sizes"),
                                                     batch.pop("sam_image_size"), batch["resize_hw"].device)
    if isinstance(batch, dict) and "sam_pixels_uint8" in batch:
        batch["sam_pixel_values"] = normalise_sam_pixels(batch.pop("sam_pixels_uint8"), batch["resize_hw"])
    return batch


def resize_to_canvas(images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], size: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Decoded uint8 (H, W, 3) images (on `device`) -> the (B, S, S, 3) uint8 canvases of
    `transforms.sam_resize_uint8`, computed there (sizes are host integers: no synchronisation)."""
    canvas = torch.zeros(len(images), size, size, 3, dtype=torch.uint8, device=device)
    for i, (image, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        canvas[i, :h, :w] = resize_bilinear(image, h, w)
    return canvas


def stats(images: int, skips: dict[str, int]) -> dict[str, int]:
    """The `data_stats` of a batch: its image count and its share of the skip counts."""
    return {"images": images, "skipped": sum(n for r, n in skips.items() if r != "read_error"), **skips}


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


@dataclass(frozen=True)
class TrainSource:
    """A training source as the stream sees it: name, expanded shard URLs, sampling weight."""

    name: str
    urls: tuple[str, ...]
    weight: float
    vocabulary: Vocabulary = Vocabulary()


@dataclass
class StreamPosition:
    """Where one rank's training stream stands.

    `batch_index`: the next batch to produce (= batches consumed so far on this rank);
    `readers[w]`: for logical worker w, the (block, emitted) position of every source's reader
    after w's last consumed batch, or None if w has not been consumed from yet."""

    batch_index: int = 0
    readers: list[list[tuple[int, int]] | None] = field(default_factory=list)


class TrainStream(IterableDataset):
    """The endless mixed training stream of one rank, cut into epochs of `batches_per_epoch`.

    Batch g (counting across epochs) is produced by logical worker g mod W from readers number
    rank x W + (g mod W) of world_size x W; its sources come from `Mixer.sources(rank, g)`, its
    expressions from `sample_rng(seed, rank, g, slot)` (`pick_expressions` with `expression_sampling`). A torch DataLoader takes batches
    from its workers round-robin, so physical worker p, starting at batch g0, plays logical worker
    (g0 + p) mod W: the stream continues exactly from `position` whatever batch it stopped at.
    A skipped sample is replaced by the next sample of the same source."""

    def __init__(self, sources: Sequence[TrainSource], *, prep: Preprocessing, batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, mixing: str, batches_per_epoch: int,
                 max_expressions_per_image: int, buffer_size: int, block_shards: int, strict: bool,
                 position: StreamPosition, embedding_cache: EmbeddingCache | None = None,
                 expression_sampling: str = "sentences", negatives_per_image: int = 0):
        if expression_sampling not in EXPRESSION_SAMPLING:
            raise ValueError(f"expression_sampling {expression_sampling!r} not in {EXPRESSION_SAMPLING}")
        if batches_per_epoch < 1 or batch_size < 1:
            raise ValueError(f"batches_per_epoch and batch_size must be >= 1, got {batches_per_epoch}, {batch_size}")
        self.sources = list(sources)
        self.mixer = Mixer([s.weight for s in self.sources], seed, mixing)
        self.prep, self.batch_size, self.seed = prep, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, num_workers)
        self.batches_per_epoch, self.k = batches_per_epoch, max_expressions_per_image
        self.buffer_size, self.block_shards, self.strict = buffer_size, block_shards, strict
        self.position = position
        self.embedding_cache = embedding_cache
        self.expression_sampling = expression_sampling
        self.negatives = negatives_per_image

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        physical, n = _worker()
        if n != self.workers:
            raise RuntimeError(f"TrainStream was built for {self.workers} workers but runs in a DataLoader with {n}")
        # Snapshot now: the data module advances `position` while batches are consumed.
        start = self.position.batch_index
        first = start + physical
        logical = first % self.workers
        saved = self.position.readers[logical] if logical < len(self.position.readers) else None
        end = (start // self.batches_per_epoch + 1) * self.batches_per_epoch
        return self._batches(first, end, logical, list(saved) if saved is not None else None)

    def _batches(self, first: int, end: int, logical: int,
                 saved: list[tuple[int, int]] | None) -> Iterator[dict[str, Any]]:
        skips = SkipLog(self.strict)
        positions = saved or [(0, 0)] * len(self.sources)
        readers: list[SourceReader | None] = [None] * len(self.sources)

        def reader(s: int) -> SourceReader:  # built on first use: unused sources cost nothing
            if readers[s] is None:
                src = self.sources[s]
                readers[s] = SourceReader(
                    src.name, src.urls, seed=self.seed, reader=self.rank * self.workers + logical,
                    n_readers=self.world_size * self.workers, buffer_size=self.buffer_size,
                    block_shards=self.block_shards, skips=skips, position=positions[s])
            return readers[s]

        for g in range(first, end, self.workers):
            plan = self.mixer.sources(self.rank, g, self.batch_size)
            examples = [self._example(reader(int(s)), sample_rng(self.seed, self.rank, g, slot), skips,
                                      self.sources[int(s)].vocabulary)
                        for slot, s in enumerate(plan)]
            batch = collate(examples, self.prep)
            batch["data_stats"] = stats(len(examples), skips.take())
            batch["_stream"] = {
                "rank": self.rank, "batch_index": g, "worker": logical,
                "readers": [list(r.position) if r is not None else list(p) for r, p in zip(readers, positions, strict=True)],
            }
            yield batch

    def _example(self, reader: SourceReader, rng: np.random.Generator, skips: SkipLog,
                 vocabulary: Vocabulary = Vocabulary()) -> dict[str, Any]:
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            raw = reader.next()
            try:
                sample, image = decode(raw)
            except SampleError as e:
                skips.skip(e.reason, str(e))
                continue
            features = None
            if self.embedding_cache is not None:
                features = self.embedding_cache.features(reader.name, raw["__url__"], sample.key)
            picks = pick_expressions(sample, rng, self.k, self.expression_sampling)
            if self.negatives:
                sample, picks = add_negatives(sample, picks, vocabulary, self.negatives, rng)
            return make_example(sample, image, picks, self.prep, reader.name, features)
        raise DataError("too_many_skips", f"source {reader.name}: {MAX_CONSECUTIVE_SKIPS} samples in a row "
                                          f"failed to decode (see the warnings above)")


def eval_batch_ranges(total: int, world_size: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Per rank, the [lo, hi) sample-index ranges of its eval batches.

    Every rank gets the same number of batches nb = ceil(total / (world_size x batch_size)); the
    samples, in order, are cut into world_size x nb consecutive chunks of near-equal size (never
    empty, at most batch_size), and rank r takes chunks r x nb ... (r + 1) x nb - 1. So no sample is
    padded or repeated and no rank waits on another. Only when batch_size is 1 and world_size does
    not divide total does that need empty batches; then nb = total // world_size and some batches
    hold 2 images."""
    if total < world_size:
        raise ValueError(f"an eval split of {total} samples cannot be shared by {world_size} ranks")
    nb = min(-(-total // (world_size * batch_size)), total // world_size)
    chunks = world_size * nb
    bounds = [c * total // chunks for c in range(chunks + 1)]
    return [[(bounds[c], bounds[c + 1]) for c in range(r * nb, (r + 1) * nb)] for r in range(world_size)]


class EvalStream(IterableDataset):
    """The finite, unshuffled stream of one eval source for one rank: every expression of every
    object of every image (the reference's protocol: every sentence of every ref, referring text
    `strip().lower()`-ed, see `eval_text`), the image prepared once for all of them; each sample
    lands on exactly one rank (see `eval_batch_ranges`)."""

    def __init__(self, name: str, urls: Sequence[str], sizes: Sequence[int], *, prep: Preprocessing,
                 batch_size: int, rank: int, world_size: int, strict: bool, unreadable_shards: int = 0):
        if len(urls) != len(sizes):
            raise ValueError(f"eval source {name}: {len(urls)} shards but {len(sizes)} sizes")
        self.name, self.urls, self.prep, self.strict = name, list(urls), prep, strict
        # shards found unreadable while counting samples (no sizes.json): reported in the first batch
        self.unreadable_shards = unreadable_shards
        self.starts = [0, *np.cumsum(sizes, dtype=np.int64).tolist()]
        self.ranges = eval_batch_ranges(self.starts[-1], world_size, batch_size)[rank]

    def __len__(self) -> int:
        return len(self.ranges)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        physical, n = _worker()
        return self._batches(self.ranges[physical::n])

    def _batches(self, mine: list[tuple[int, int]]) -> Iterator[dict[str, Any]]:
        skips = SkipLog(self.strict)
        if self.unreadable_shards and _worker()[0] == 0:  # warned about while counting: only counted here
            skips.add_reported("read_error", self.unreadable_shards)
        t, bucket = 0, []
        for i, url in enumerate(self.urls):
            lo, hi = self.starts[i], self.starts[i + 1]
            if t == len(mine):
                break
            if mine[t][0] >= hi:
                continue
            for raw in iter_shard(url, skips):
                if raw["__index__"] >= hi - lo:
                    skips.note(f"shard {url} holds more samples than its declared {hi - lo}; ignoring the rest")
                    break
                idx = lo + raw["__index__"]
                while t < len(mine) and idx >= mine[t][1]:
                    yield self._batch(bucket, skips)
                    t, bucket = t + 1, []
                if t == len(mine):
                    break
                if idx >= mine[t][0]:
                    bucket.append(raw)
            while t < len(mine) and mine[t][1] <= hi:
                yield self._batch(bucket, skips)
                t, bucket = t + 1, []
        while t < len(mine):  # shards shorter than declared: the missing samples cannot be produced
            yield self._batch(bucket, skips)
            t, bucket = t + 1, []

    def _batch(self, raws: list[dict[str, Any]], skips: SkipLog) -> dict[str, Any]:
        examples = []
        for raw in raws:
            try:
                sample, image = decode(raw)
            except SampleError as e:
                skips.skip(e.reason, str(e))
                continue
            examples.append(make_example(sample, image, all_expressions(sample), self.prep, self.name,
                                         evaluation=True))
        batch = collate(examples, self.prep)
        batch["data_stats"] = stats(len(examples), skips.take())
        return batch
