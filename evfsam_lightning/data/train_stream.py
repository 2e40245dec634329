"""Stage 3 (training): the endless mixed training stream of one rank, and its position.

`TrainStream` draws each batch's sources from the mixture (`mixing.Mixer`), reads raw samples from
each source's `stream.SourceReader`, turns them into examples (`examples.py`) and batches
(`collate.py`). Every batch carries where it came from (`_stream`); `StreamPosition` is what the
data module keeps of it, so a resumed run continues exactly; `reset_position` maps a saved position
onto another layout (devices x nodes, workers, micro-batch)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from .collate import collate, stats
from .embedding_cache import EmbeddingCache
from .examples import (
    EXPRESSION_SAMPLING,
    Preprocessing,
    Vocabulary,
    add_negatives,
    decode,
    make_example,
    pick_expressions,
)
from .mixing import Mixer, sample_rng
from .schema import SampleError
from .skips import DataError, SkipLog
from .stream import SourceReader, worker_slot

#: A source whose reader fails this many samples in a row is broken, not unlucky.
MAX_CONSECUTIVE_SKIPS = 1000


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
        physical, n = worker_slot()
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
                 vocabulary: Vocabulary | None = None) -> dict[str, Any]:
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
            if self.negatives and vocabulary is not None:
                sample, picks = add_negatives(sample, picks, vocabulary, self.negatives, rng)
            return make_example(sample, image, picks, self.prep, reader.name, features)
        raise DataError("too_many_skips", f"source {reader.name}: {MAX_CONSECUTIVE_SKIPS} samples in a row "
                                          f"failed to decode (see the warnings above)")


def reset_position(saved: Mapping[str, Any], ranks: Mapping[str, Any], batch_index: int, *, rank: int,
                   world_size: int, workers: int, batch_size: int, batches_per_epoch: int,
                   shuffle_shards: int) -> tuple[int, list[list[tuple[int, int]]]]:
    """(batch index, readers of `rank`) where a new layout continues a saved stream (see the
    module docstring). `saved` is the saved `stream` fingerprint, `ranks` its per-rank entries."""
    old_readers = int(saved["world_size"]) * int(saved["workers"])
    consumed = batch_index * int(saved["batch_size"]) * int(saved["world_size"])
    first = math.ceil(consumed / (batch_size * world_size))
    new_index = math.ceil(first / batches_per_epoch) * batches_per_epoch
    bs, n_new = shuffle_shards, world_size * workers
    starts = []
    for s in range(len(saved["sources"])):
        opened = -1  # the highest global shard-sequence index any old reader had started
        for r, entry in ranks.items():
            for w, readers in enumerate(entry["readers"]):
                if readers is None:
                    continue
                block, emitted = (int(x) for x in readers[s])
                last = (block + 1) * bs - 1 if emitted > 0 else block * bs - 1
                if last >= 0:
                    opened = max(opened, int(r) * int(saved["workers"]) + w + last * old_readers)
        starts.append(opened + 1)
    readers = []
    for w in range(workers):
        j = rank * workers + w
        readers.append([(math.ceil(max(0, math.ceil((start - j) / n_new)) / bs), 0) for start in starts])
    return new_index, readers
