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

Over 350 lines until issue 15's "one run schema" step lands: this file still holds its own
`DataConfig`/`SourceConfig` (a second schema, with its YAML dialect) besides the data module.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..config import ConfigError
from .collate import cached_tokenizer, finish_batch
from .embedding_cache import EmbeddingCache, preprocessing_fingerprint
from .eval_stream import EvalStream
from .examples import (
    EXPRESSION_SAMPLING,
    SAM_RESIZE_PLACES,
    SAM_VARIANTS,
    Preprocessing,
    Vocabulary,
    read_vocabulary,
)
from .mixing import MIXING_MODES
from .skips import SkipLog
from .stream import expand_urls, iter_shard, missing_local_shards, shard_sizes
from .train_stream import StreamPosition, TrainSource, TrainStream, reset_position

log = logging.getLogger(__name__)
STATE_VERSION = 1



@dataclass
class SourceConfig:
    """One dataset as shards."""

    name: str
    """Source name: appears in batches (`sources`), logs and seeds."""
    urls: str | list[str]
    """Shards: a brace pattern (`data/train-{000000..000009}.tar`), a path, a glob, a directory of
    tars, a `pipe:` command, a remote URL, or a list of these."""
    weight: float = 1.0
    """Sampling weight in the training mixture (ignored for val/test sources)."""
    sizes: str | None = None
    """A sizes.json ({shard file name: samples}) for shards without one next to them, e.g. `pipe:`."""


@dataclass
class DataConfig:
    """Everything the data pipeline needs. Mirrored by the `data:` section of a YAML file."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Training sources with their weights."""
    tokenizer: str = ""
    """Folder with the XLM-R `sentencepiece.bpe.model` (and `added_tokens.json`)."""
    batch_size: int = 2
    """Images per micro-batch and rank."""
    num_workers: int = 4
    """DataLoader workers per rank. The training stream depends on it (resume needs the same)."""
    max_expressions_per_image: int = 3
    """Training: up to this many (expression, mask) pairs per image (see `expression_sampling`)."""
    expression_sampling: str = "sentences"
    """How training draws a referring image's expressions: "sentences" (EVF-SAM's way: distinct
    sentences drawn from all sentences of all the image's objects, each with its object's mask) or
    "objects" (distinct objects, one random sentence each). Other tasks always draw objects."""
    negatives_per_image: int = 0
    """Training: up to this many no-target expressions per image from the source's vocabulary.json
    (categories absent from the image); sources without one get none (warned)."""
    sam_image_size: int = 1024
    """SAM input size S."""
    sam_variant: str = "sam"
    """"sam": SAM-1 (longest side to S, zero padding); "sam2": plain resize to S x S."""
    beit_image_size: int = 224
    """BEiT-3 input size."""
    max_text_length: int = 64
    """Token limit per expression (truncation keeps `</s>`)."""
    seed: int = 0
    """Seed of the whole training stream."""
    mixing: str = "sample"
    """"sample": every image draws its source; "batch": every batch draws one source."""
    samples_per_epoch: int | None = None
    """Images per epoch over all ranks (the stream is endless); default: all training shards' sizes."""
    shuffle_buffer: int = 256
    """Raw samples (bytes) held per source and worker for shuffling."""
    shuffle_shards: int = 1
    """Consecutive shards shuffled together; resuming re-reads up to this many per source and worker."""
    val_sources: list[SourceConfig] = field(default_factory=list)
    """Validation sources: finite, unshuffled, every expression of every object."""
    test_sources: list[SourceConfig] = field(default_factory=list)
    """Test sources, like `val_sources`."""
    eval_batch_size: int | None = None
    """Images per eval batch; default `batch_size`."""
    strict: bool = False
    """Raise on the first bad sample (naming shard and key) instead of skipping and counting it."""
    embedding_cache: str | None = None
    """Folder of precomputed SAM image features (`evfsam-cache-embeddings`): training batches carry
    `image_features` instead of the SAM image. Validation and test batches keep their images."""
    sam_resize: str = "worker"
    """Where SAM-1's Pillow resize to `sam_image_size` runs: "worker" (data workers) or "device"
    (after the transfer, in `on_after_batch_transfer`: the same pixels, for GPU training, where it
    frees the workers of their largest cost; see `pillow_resize`)."""

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        for name in ("batch_size", "max_expressions_per_image", "sam_image_size", "beit_image_size",
                     "max_text_length", "shuffle_buffer", "shuffle_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"data.samples_per_epoch must be >= 1, got {self.samples_per_epoch}")
        if self.expression_sampling not in EXPRESSION_SAMPLING:
            raise ValueError(f"data.expression_sampling {self.expression_sampling!r} not in {EXPRESSION_SAMPLING}")
        if self.mixing not in MIXING_MODES:
            raise ValueError(f"data.mixing {self.mixing!r} not in {MIXING_MODES}")
        if self.sam_variant not in SAM_VARIANTS:
            raise ValueError(f"data.sam_variant {self.sam_variant!r} not in {SAM_VARIANTS}")
        if self.sam_resize not in SAM_RESIZE_PLACES:
            raise ValueError(f"data.sam_resize {self.sam_resize!r} not in {SAM_RESIZE_PLACES}")
        if not self.tokenizer:
            raise ValueError("data.tokenizer: give the folder holding sentencepiece.bpe.model")
        for group in ("sources", "val_sources", "test_sources"):
            names = [s.name for s in getattr(self, group)]
            if len(set(names)) != len(names):
                raise ValueError(f"data.{group}: duplicate source names {names}")
        if self.sources and (any(s.weight < 0 for s in self.sources) or sum(s.weight for s in self.sources) <= 0):
            raise ValueError("data.sources: weights must be >= 0 with a positive sum")


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    missing = [n for n, f in known.items() if n not in values and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    return cls(**values)


def data_config_from_dict(values: Mapping[str, Any]) -> DataConfig:
    """A `DataConfig` from a plain mapping (e.g. a YAML `data:` section); unknown keys are errors."""
    values = dict(values)
    for group in ("sources", "val_sources", "test_sources"):
        values[group] = [_build(SourceConfig, s, f"data.{group}[{i}]") for i, s in enumerate(values.get(group) or [])]
    config = _build(DataConfig, values, "data")
    config.validate()
    return config


def load_data_config(path: str) -> DataConfig:
    """The `data:` section of a YAML recipe/config file as a `DataConfig`."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise ValueError(f"{path}: expected a mapping with a `data:` section")
    return data_config_from_dict(doc["data"])


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
    device); Lightning then ignores a LightningModule's override of those hooks."""

    def __init__(self, config: DataConfig, *, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.prep = Preprocessing(sam_image_size=config.sam_image_size, sam_variant=config.sam_variant,
                                  beit_image_size=config.beit_image_size, max_text_length=config.max_text_length,
                                  tokenizer=config.tokenizer, sam_resize=config.sam_resize)
        self._topology = (rank, world_size)
        self.rank: int | None = None
        self.world_size: int | None = None
        self.workers = max(1, config.num_workers)
        self.position = StreamPosition(0, [None] * self.workers)
        self.data_stats_total: Counter[str] = Counter()
        """Skip counts of the training batches consumed on this rank (kept in the data state)."""
        self._train: list[TrainSource] | None = None
        # Opened (and checked against the sources and preprocessing) here, so that a missing or
        # stale cache fails before any training work.
        self._embedding_cache: EmbeddingCache | None = None if not config.embedding_cache else EmbeddingCache(
            config.embedding_cache, {s.name: expand_urls(s.urls) for s in config.sources},
            preprocessing_fingerprint(config.sam_variant, config.sam_image_size))
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
            cached_tokenizer(self.config.tokenizer)  # fail here, not in a worker
        if self._train is None and self.config.sources:
            self._setup_train()
        if self._pending_state is not None and self._train is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)

    def _setup_train(self) -> None:
        cfg = self.config
        train, total = [], 0
        for src in cfg.sources:
            urls = expand_urls(src.urls)
            missing = missing_local_shards(urls)
            if missing:
                raise FileNotFoundError(f"source {src.name}: {len(missing)} of {len(urls)} shards missing, "
                                        f"first {missing[0]}")
            sizes = shard_sizes(urls, src.sizes)
            total = None if total is None or sizes is None else total + sum(sizes)
            vocabulary = read_vocabulary(src.name, urls) if cfg.negatives_per_image else Vocabulary()
            train.append(TrainSource(src.name, tuple(urls), float(src.weight), vocabulary))
        samples = cfg.samples_per_epoch if cfg.samples_per_epoch is not None else total
        if samples is None:
            raise ValueError("data.samples_per_epoch: set it, or give every training source a sizes.json")
        per_step = cfg.batch_size * self.world_size
        if samples < per_step:
            raise ValueError(f"an epoch of {samples} samples is less than one batch on every rank "
                             f"({cfg.batch_size} x {self.world_size})")
        self._train, self._batches_per_epoch = train, samples // per_step

    @property
    def batches_per_epoch(self) -> int:
        """Training batches per rank and epoch (samples_per_epoch // (batch_size x world_size))."""
        self.setup()
        if self._batches_per_epoch is None:
            raise ValueError("no training sources configured (data.sources is empty)")
        return self._batches_per_epoch

    # ---- dataloaders -------------------------------------------------------------------------
    def train_stream(self) -> TrainStream:
        """This rank's training stream, continuing from the current (consumed) position."""
        cfg = self.config
        self.setup()
        return TrainStream(self._train or [], prep=self.prep, batch_size=cfg.batch_size, rank=self.rank,
                           world_size=self.world_size, num_workers=cfg.num_workers, seed=cfg.seed,
                           mixing=cfg.mixing, batches_per_epoch=self.batches_per_epoch,
                           max_expressions_per_image=cfg.max_expressions_per_image,
                           buffer_size=cfg.shuffle_buffer, block_shards=cfg.shuffle_shards, strict=cfg.strict,
                           position=self.position, embedding_cache=self._embedding_cache,
                           expression_sampling=cfg.expression_sampling,
                           negatives_per_image=cfg.negatives_per_image)

    def train_dataloader(self) -> DataLoader:
        # Workers restart every epoch (not persistent) so that each starts from the consumed position.
        return TrainLoader(self.train_stream(), batch_size=None, num_workers=self.config.num_workers,
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
                counting = SkipLog(self.config.strict)
                sizes = [sum(1 for _ in iter_shard(u, counting)) for u in urls]
                unreadable = counting.take()["read_error"]
            self._eval_sizes[source.name] = (urls, sizes, unreadable)
        urls, sizes, unreadable = self._eval_sizes[source.name]
        return EvalStream(source.name, urls, sizes, prep=self.prep,
                          batch_size=self.config.eval_batch_size or self.config.batch_size,
                          rank=self.rank, world_size=self.world_size, strict=self.config.strict,
                          unreadable_shards=unreadable if self.rank == 0 else 0)

    def _eval_loaders(self, sources: list[SourceConfig]) -> DataLoader | list[DataLoader]:
        loaders = [DataLoader(self.eval_stream(s), batch_size=None, num_workers=self.config.num_workers,
                              collate_fn=_keep) for s in sources]
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders(self.config.val_sources)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders(self.config.test_sources)

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
        cfg = self.config
        return _plain({
            "world_size": self.world_size, "workers": self.workers, "batch_size": cfg.batch_size,
            "seed": cfg.seed, "mixing": cfg.mixing, "batches_per_epoch": self.batches_per_epoch,
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
                                        batch_size=self.config.batch_size, batches_per_epoch=self.batches_per_epoch,
                                        shuffle_shards=self.config.shuffle_shards)
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

