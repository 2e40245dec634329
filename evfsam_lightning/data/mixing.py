"""Which sample goes where: pure index functions of (seed, rank, world size, worker, position).

Nothing here reads data or keeps hidden state, so every decision of the training stream can be
recomputed from small integers (and tested without decoding an image):

- `Mixer.sources(rank, batch_index, batch_size)`: the source of every slot of a batch, drawn from a
  generator seeded by (seed, rank, batch index) with probabilities proportional to the weights;
- `ShardOrder.shard(k)`: the k-th shard one reader opens; readers take turns through an endless
  sequence of per-epoch shard permutations, so every shard is read equally often in the long run
  and no reader starves when there are fewer shards than readers;
- `sample_rng(...)`: the generator that picks objects and expressions for one slot of one batch.

Seeds are derived with `numpy.random.SeedSequence`, never from the global `random` module.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

MIXING_MODES = ("sample", "batch")

# Domain tags keep the generators of different decisions independent of each other.
_TAG_MIX = 1
_TAG_SHARDS = 2
_TAG_BUFFER = 3
_TAG_SAMPLE = 4


def source_id(name: str) -> int:
    """A stable integer for a source name (seeds depend on names, not on the order of the list)."""
    return zlib.crc32(name.encode("utf-8"))


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from non-negative integer parts."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def buffer_seed(seed: int, source: str, reader: int, block: int) -> int:
    """The seed of the shuffle buffer of one block of one reader of one source."""
    return derive_seed(seed, _TAG_BUFFER, source_id(source), reader, block)


def sample_rng(seed: int, rank: int, batch_index: int, slot: int) -> np.random.Generator:
    """The generator that chooses objects and expressions for slot `slot` of batch `batch_index`."""
    return np.random.default_rng([seed, _TAG_SAMPLE, rank, batch_index, slot])


class Mixer:
    """Draws the source of every position of a rank's batch stream.

    mode "sample": each slot of a batch draws its source independently;
    mode "batch": the whole batch comes from one source, drawn per batch."""

    def __init__(self, weights: Sequence[float], seed: int, mode: str = "sample"):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"mixing weights must be non-negative with a positive sum, got {list(weights)}")
        if mode not in MIXING_MODES:
            raise ValueError(f"mixing mode {mode!r} not in {MIXING_MODES}")
        self.probabilities = w / w.sum()
        self.seed = int(seed)
        self.mode = mode

    def sources(self, rank: int, batch_index: int, batch_size: int) -> np.ndarray:
        """Source indices (batch_size,) of batch `batch_index` on `rank`."""
        rng = np.random.default_rng([self.seed, _TAG_MIX, rank, batch_index])
        n = len(self.probabilities)
        if self.mode == "batch":
            return np.full(batch_size, rng.choice(n, p=self.probabilities), dtype=np.int64)
        return rng.choice(n, size=batch_size, p=self.probabilities).astype(np.int64)


class ShardOrder:
    """The endless shard sequence of reader `reader` (of `n_readers` = world size x workers).

    The global sequence is epoch 0's permutation of the shards, then epoch 1's, and so on (the
    same on every rank); reader j takes its entries j, j + n_readers, j + 2 n_readers, ..."""

    def __init__(self, n_shards: int, *, seed: int, source: str, reader: int, n_readers: int):
        if n_shards < 1:
            raise ValueError(f"source {source}: no shards")
        if not 0 <= reader < n_readers:
            raise ValueError(f"reader {reader} not in [0, {n_readers})")
        self.n_shards, self.reader, self.n_readers = n_shards, reader, n_readers
        self._seed, self._source = seed, source_id(source)
        self._cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            rng = np.random.default_rng([self._seed, _TAG_SHARDS, self._source, epoch])
            self._cache[epoch] = rng.permutation(self.n_shards)
        return self._cache[epoch]

    def shard(self, k: int) -> int:
        """Index (into the source's shard list) of the k-th shard this reader opens."""
        epoch, pos = divmod(self.reader + k * self.n_readers, self.n_shards)
        return int(self._permutation(epoch)[pos])
