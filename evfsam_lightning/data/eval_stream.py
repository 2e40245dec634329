"""Stage 3 (evaluation): the finite, ordered stream of one validation/test source, split exactly
across ranks (`eval_batch_ranges`): every expression of every object, each image prepared once
(`examples.py`), batched by `collate.py`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from .collate import collate, stats
from .examples import Preprocessing, all_expressions, decode, make_example
from .schema import SampleError
from .skips import SkipLog
from .stream import iter_shard, worker_slot


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
        physical, n = worker_slot()
        return self._batches(self.ranges[physical::n])

    def _batches(self, mine: list[tuple[int, int]]) -> Iterator[dict[str, Any]]:
        skips = SkipLog(self.strict)
        if self.unreadable_shards and worker_slot()[0] == 0:  # warned about while counting: only counted here
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
