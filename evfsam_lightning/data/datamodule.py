"""`EvfDataModule`: the training mixture, validation and test streams, and the exact data position.

Resume: every training batch carries where it came from (`_stream`, see train_stream.py);
`on_before_batch_transfer` records it when the training step takes the batch, so the saved
position is that of *consumed* batches, whatever the DataLoader has prefetched. `state_dict()`
gathers every rank's position (Lightning writes rank 0's checkpoint only) and holds, as plain
ints, lists and strings:

    {"version": 1,
     "stream": {...the settings the sample sequence depends on: world_size, workers, batch_size,
                seed, mixing, batches_per_epoch, max_expressions_per_image, shuffle_buffer,
                shuffle_shards, sources [[name, weight, number of shards], ...]},
     "batch_index": g,                # batches consumed per rank (equal on every rank)
     "ranks": {"0": {"readers": [per logical worker: None or [[block, emitted] per source]],
                     "data_stats": {"images": ..., "skipped": ..., reason: count, ...}}, ...}}

Loading a state whose `stream` settings differ from this run's raises a ValueError that names
them: the sample sequence depends on the number of ranks and of (logical) workers, so resuming
exactly with different ones is impossible (num_workers 0 and 1 are the same single stream).

With `reset_data_position` (the run's `checkpoint.reset_data_position=true`) a change of the
*layout* only (world_size, workers, batch_size, hence batches_per_epoch) is accepted and the
stream restarts at a deterministic position of the new layout (`reset_position`): batch index
= the first epoch boundary of the new layout at or after the samples consumed so far, and every
source's readers start with the first shards of the source's global shard sequence that no reader
of the old layout had started (no shard is read twice; the unread rest of the shards in progress
is skipped). Any other change is still refused.

The module takes the run schema's data section (`config.DataConfig`, every user option) and
`PipelineSettings` (what comes from the model, trainer and run); `training.data_setup.data_for_run`
builds both from a `RunConfig`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..config import ConfigError, DataConfig, SourceConfig, check_unique_names, validate_data
from .collate import cached_tokenizer, finish_batch
from .embedding_cache import EmbeddingCache, preprocessing_fingerprint
from .eval_stream import EvalStream
from .examples import Preprocessing, Vocabulary, read_vocabulary
from .settings import PipelineSettings
from .skips import SkipLog
from .stream import expand_urls, iter_shard, missing_local_shards, shard_sizes
from .train_stream import StreamPosition, TrainSource, TrainStream, reset_position

log = logging.getLogger(__name__)
STATE_VERSION = 1


def _keep(batch: Any) -> Any:
    return batch


#: The stream settings that describe the process layout; `reset_data_position` accepts a change of these.
LAYOUT_KEYS = ("world_size", "workers", "batch_size", "batches_per_epoch")


class TrainLoader(DataLoader):
    """The training DataLoader. Its position is kept (exactly) by `EvfDataModule`'s own
    `state_dict`; the loader says so to Lightning by being stateful, which silences Lightning's
    warning that a resumed run's loader is not resumable (true for any other loader)."""

    def state_dict(self) -> dict[str, Any]:
        return {"position": "kept by EvfDataModule"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # EvfDataModule.load_state_dict restored the position


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so that fingerprints compare equal after a checkpoint round trip."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class EvfDataModule(L.LightningDataModule):
    """Training mixture, validation/test streams and the resumable training data position.

    `rank`/`world_size` default to the trainer's (or torch.distributed's); give them to build the
    stream of one rank outside a distributed run. This module overrides `on_before_batch_transfer`
    (to record consumed batches) and `on_after_batch_transfer` (to finish the SAM image on the
    device); Lightning then ignores a LightningModule's override of those hooks.

    `data` is the run's data section with its training and validation sources filled in and
    `sam_resize` resolved (worker or device, not auto); `test_sources` are what `test_dataloader`
    reads (evaluation's splits; training has none)."""

    def __init__(self, data: DataConfig, settings: PipelineSettings, *, test_sources: Sequence[SourceConfig] = (),
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        validate_data(data)
        if data.sam_resize == "auto":
            raise ConfigError("data.sam_resize=auto reached the data module unresolved "
                              "(training.data_setup.resolve_sam_resize chooses worker or device)")
        check_unique_names(list(test_sources), "test sources")
        self.data, self.settings, self.test_sources = data, settings, list(test_sources)
        self.prep = Preprocessing(sam_image_size=settings.sam_image_size, sam_variant=settings.sam_variant,
                                  beit_image_size=settings.beit_image_size, max_text_length=data.max_text_length,
                                  tokenizer=settings.tokenizer, sam_resize=data.sam_resize)
        self._topology = (rank, world_size)
        self.rank: int | None = None
        self.world_size: int | None = None
        self.workers = max(1, data.num_workers)
        self.position = StreamPosition(0, [None] * self.workers)
        self.data_stats_total: Counter[str] = Counter()
        """Skip counts of the training batches consumed on this rank (kept in the data state)."""
        self._train: list[TrainSource] | None = None
        # Opened (and checked against the sources and preprocessing) here, so that a missing or
        # stale cache fails before any training work.
        self._embedding_cache: EmbeddingCache | None = None if not data.embedding_cache else EmbeddingCache(
            data.embedding_cache, {s.name: expand_urls(s.urls) for s in data.train},
            preprocessing_fingerprint(settings.sam_variant, settings.sam_image_size))
        self._batches_per_epoch: int | None = None
        self._eval_sizes: dict[str, tuple[list[str], list[int]]] = {}
        self._pending_state: dict[str, Any] | None = None
        self.reset_data_position = False
        """Accept a changed process layout on resume and restart the stream at `reset_position`."""
        self.position_was_reset = False

    # ---- setup -------------------------------------------------------------------------------
    def _resolve_topology(self) -> None:
        rank, world_size = self._topology
        if rank is None or world_size is None:
            if self.trainer is not None:
                rank, world_size = self.trainer.global_rank, self.trainer.world_size
            elif dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
            else:
                rank, world_size = 0, 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.rank, self.world_size = int(rank), int(world_size)

    def setup(self, stage: str | None = None) -> None:
        """Resolve rank and world size, expand and check the training shards, load the tokenizer."""
        if self.rank is None:
            self._resolve_topology()
            cached_tokenizer(self.settings.tokenizer)  # fail here, not in a worker
        if self._train is None and self.data.train:
            self._setup_train()
        if self._pending_state is not None and self._train is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)

    def _setup_train(self) -> None:
        cfg = self.data
        train, total = [], 0
        for src in cfg.train:
            urls = expand_urls(src.urls)
            missing = missing_local_shards(urls)
            if missing:
                raise FileNotFoundError(f"source {src.name}: {len(missing)} of {len(urls)} shards missing, "
                                        f"first {missing[0]}")
            sizes = shard_sizes(urls, src.sizes)
            total = None if total is None or sizes is None else total + sum(sizes)
            vocabulary = read_vocabulary(src.name, urls) if cfg.negatives_per_image else Vocabulary()
            train.append(TrainSource(src.name, tuple(urls), float(src.weight), vocabulary))
        samples = cfg.samples_per_epoch or total  # 0: one pass over the training shards
        if samples is None:
            raise ValueError("data.samples_per_epoch: set it, or give every training source a sizes.json")
        per_step = self.settings.batch_size * self.world_size
        if samples < per_step:
            raise ValueError(f"an epoch of {samples} samples is less than one batch on every rank "
                             f"({self.settings.batch_size} x {self.world_size})")
        self._train, self._batches_per_epoch = train, samples // per_step

    @property
    def batches_per_epoch(self) -> int:
        """Training batches per rank and epoch (samples_per_epoch // (batch_size x world_size))."""
        self.setup()
        if self._batches_per_epoch is None:
            raise ValueError("no training sources configured (data.train is empty)")
        return self._batches_per_epoch

    # ---- dataloaders -------------------------------------------------------------------------
    def train_stream(self) -> TrainStream:
        """This rank's training stream, continuing from the current (consumed) position."""
        cfg = self.data
        self.setup()
        return TrainStream(self._train or [], prep=self.prep, batch_size=self.settings.batch_size, rank=self.rank,
                           world_size=self.world_size, num_workers=cfg.num_workers, seed=self.settings.seed,
                           mixing=cfg.mixing, batches_per_epoch=self.batches_per_epoch,
                           max_expressions_per_image=cfg.max_expressions_per_image,
                           buffer_size=cfg.shuffle_buffer, block_shards=cfg.shuffle_shards, strict=cfg.strict,
                           position=self.position, embedding_cache=self._embedding_cache,
                           expression_sampling=cfg.expression_sampling,
                           negatives_per_image=cfg.negatives_per_image)

    def train_dataloader(self) -> DataLoader:
        # Workers restart every epoch (not persistent) so that each starts from the consumed position.
        return TrainLoader(self.train_stream(), batch_size=None, num_workers=self.data.num_workers,
                           collate_fn=_keep, persistent_workers=False)

    def eval_stream(self, source: SourceConfig) -> EvalStream:
        """This rank's share of one validation/test source."""
        self.setup()
        if source.name not in self._eval_sizes:
            urls = expand_urls(source.urls)
            sizes, unreadable = shard_sizes(urls, source.sizes), 0
            if sizes is None:  # count by reading; eval splits are small
                log.info("eval source %s: no sizes.json, counting samples in %d shards", source.name, len(urls))
                # not muted: an unreadable shard is warned about and counted (strict: an error), as in training
                counting = SkipLog(self.data.strict)
                sizes = [sum(1 for _ in iter_shard(u, counting)) for u in urls]
                unreadable = counting.take()["read_error"]
            self._eval_sizes[source.name] = (urls, sizes, unreadable)
        urls, sizes, unreadable = self._eval_sizes[source.name]
        return EvalStream(source.name, urls, sizes, prep=self.prep,
                          batch_size=self.data.val_batch_size,
                          rank=self.rank, world_size=self.world_size, strict=self.data.strict,
                          unreadable_shards=unreadable if self.rank == 0 else 0)

    def _eval_loaders(self, sources: list[SourceConfig]) -> DataLoader | list[DataLoader]:
        loaders = [DataLoader(self.eval_stream(s), batch_size=None, num_workers=self.data.num_workers,
                              collate_fn=_keep) for s in sources]
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders(self.data.val)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders(self.test_sources)

    # ---- consumed position and state -----------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Records training batches as consumed (Lightning calls this right before the step)."""
        if isinstance(batch, dict) and "_stream" in batch:
            self.record_consumed(batch)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Finishes the SAM image on the device (uint8 -> normalised floats, `collate.finish_batch`)."""
        return finish_batch(batch)

    def record_consumed(self, batch: dict[str, Any]) -> None:
        """Remove `_stream` from a training batch and advance the consumed position to it."""
        info = batch.pop("_stream")
        expected = self.position.batch_index
        if info["batch_index"] != expected or info["rank"] != self.rank:
            raise RuntimeError(f"training batch {info['batch_index']} of rank {info['rank']} was consumed where "
                               f"batch {expected} of rank {self.rank} was due: batches were skipped or reordered, "
                               f"so the data position could not be saved exactly")
        self.position.batch_index = expected + 1
        self.position.readers[info["worker"]] = [tuple(p) for p in info["readers"]]
        self.data_stats_total.update(batch["data_stats"])

    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.data
        return _plain({
            "world_size": self.world_size, "workers": self.workers, "batch_size": self.settings.batch_size,
            "seed": self.settings.seed, "mixing": cfg.mixing, "batches_per_epoch": self.batches_per_epoch,
            "max_expressions_per_image": cfg.max_expressions_per_image, "shuffle_buffer": cfg.shuffle_buffer,
            "shuffle_shards": cfg.shuffle_shards,
            **({"negatives_per_image": cfg.negatives_per_image} if cfg.negatives_per_image else {}),
            "sources": [[s.name, s.weight, len(s.urls)] for s in self._train or []],
        })

    def state_dict(self) -> dict[str, Any]:
        """The consumed training position of every rank (a collective call under torch.distributed,
        as Lightning makes it on every rank when it saves a checkpoint)."""
        self.setup()
        mine = _plain({"readers": self.position.readers, "data_stats": dict(self.data_stats_total)})
        entries = [(self.rank, self.position.batch_index, mine)]
        if self.world_size > 1 and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() == self.world_size:
            entries = [None] * self.world_size
            dist.all_gather_object(entries, (self.rank, self.position.batch_index, mine))
        counts = {r: g for r, g, _ in entries}
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"ranks consumed different numbers of training batches {counts}; "
                               f"the data position cannot be saved")
        return {"version": STATE_VERSION, "stream": self._fingerprint(), "batch_index": entries[0][1],
                "ranks": {str(r): st for r, _, st in entries}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream where `state_dict` (from `state_dict()`) left it."""
        self._pending_state = state_dict  # applied by setup(), once rank and sources are known
        if self.rank is not None or None not in self._topology:
            self.setup()

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved, now = _plain(state["stream"]), self._fingerprint()
        diffs = [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]
        layout_only = all(k in LAYOUT_KEYS for k in now if saved.get(k) != now[k])
        if diffs and layout_only and self.reset_data_position:
            self._reset_state(state, saved)
            return
        if diffs:
            hint = (" Or set checkpoint.reset_data_position=true to keep weights, optimizer, schedule and step and "
                    "restart the data stream at a deterministic position of the new layout.") if layout_only else ""
            raise ConfigError("cannot resume the training data stream exactly, its settings changed ("
                             + "; ".join(diffs) + "). The sample sequence depends on the number of ranks and "
                             "of DataLoader workers (0 and 1 are the same); resume with the saved values." + hint)
        mine = state["ranks"].get(str(self.rank))
        if mine is None:
            raise ValueError(f"the data state holds ranks {sorted(state['ranks'])}, not rank {self.rank}")
        readers = [None if r is None else [tuple(p) for p in r] for r in mine["readers"]]
        self.position.batch_index = int(state["batch_index"])
        self.position.readers[:] = readers
        self.data_stats_total = Counter(mine["data_stats"])

    def _reset_state(self, state: dict[str, Any], saved: dict[str, Any]) -> None:
        index, readers = reset_position(saved, state["ranks"], int(state["batch_index"]), rank=self.rank,
                                        world_size=self.world_size, workers=self.workers,
                                        batch_size=self.settings.batch_size, batches_per_epoch=self.batches_per_epoch,
                                        shuffle_shards=self.data.shuffle_shards)
        self.position.batch_index = index
        self.position.readers[:] = readers
        total: Counter[str] = Counter()
        for entry in state["ranks"].values():  # the run's totals travel on rank 0
            total.update(entry["data_stats"])
        self.data_stats_total = total if self.rank == 0 else Counter()
        self.position_was_reset = True
        if self.rank == 0:
            changed = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self._fingerprint().items()
                                if k in LAYOUT_KEYS and saved.get(k) != v)
            print(f"checkpoint.reset_data_position: the data layout changed ({changed}); the training stream "
                  f"restarts at batch {index} (an epoch boundary of the new layout) with unread shards", flush=True)

