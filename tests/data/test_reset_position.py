"""Resume on another process layout (`checkpoint.reset_data_position=true`): the data stream restarts
at a deterministic position of the new layout, past every shard the old layout had started."""

from __future__ import annotations

import math

import pytest

from evfsam_lightning.config import ConfigError
from evfsam_lightning.data.datamodule import EvfDataModule
from tests.data.conftest import consume, data_settings


def _keys(batches: list[dict]) -> list[list[str]]:
    return [list(b["keys"]) for b in batches]


def _saved_run(tokenizer_dir, root, world_size: int, workers: int, batch_size: int, steps: int) -> dict:
    """The data state a checkpoint of a `world_size`-rank run holds after `steps` batches per rank."""
    states = []
    for rank in range(world_size):
        dm = EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=workers, batch_size=batch_size),
                           rank=rank, world_size=world_size)
        consume(dm, steps)
        states.append(dm.state_dict())  # outside torch.distributed: each holds its own rank
    merged = dict(states[0])
    merged["ranks"] = {k: v for s in states for k, v in s["ranks"].items()}
    return merged


def _opened(state: dict, source: int) -> int:
    """The highest global shard-sequence index any reader of the saved layout had started."""
    stream = state["stream"]
    n_old, bs = stream["world_size"] * stream["workers"], stream["shuffle_shards"]
    top = -1
    for rank, entry in state["ranks"].items():
        for w, readers in enumerate(entry["readers"]):
            if readers is not None:
                block, emitted = readers[source]
                last = (block + 1) * bs - 1 if emitted else block * bs - 1
                if last >= 0:
                    top = max(top, int(rank) * stream["workers"] + w + last * n_old)
    return top


@pytest.mark.parametrize("old,new", [((2, 2, 2), (1, 0, 4)), ((1, 0, 4), (2, 2, 2))], ids=["2to1", "1to2"])
def test_reset_data_position_restarts_past_every_started_shard(three_sources, tokenizer_dir, old, new):
    root, _ = three_sources
    (w_old, workers_old, b_old), (w_new, workers_new, b_new) = old, new
    steps = 5
    state = _saved_run(tokenizer_dir, root, w_old, workers_old, b_old, steps)

    def module(rank: int) -> EvfDataModule:
        return EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=workers_new, batch_size=b_new),
                             rank=rank, world_size=w_new)

    with pytest.raises(ConfigError, match=r"world_size: saved .*checkpoint\.reset_data_position=true"):
        module(0).load_state_dict(state)

    views = []
    for rank in range(w_new):
        dm = module(rank)
        dm.reset_data_position = True
        dm.load_state_dict(state)
        assert dm.position_was_reset
        consumed = steps * b_old * w_old
        bpe = dm.batches_per_epoch
        assert dm.position.batch_index == math.ceil(math.ceil(consumed / (b_new * w_new)) / bpe) * bpe
        n_new, bs = w_new * dm.workers, dm.data.shuffle_shards
        for w, readers in enumerate(dm.position.readers):
            for s, (block, emitted) in enumerate(readers):
                assert emitted == 0
                first_shard = rank * dm.workers + w + block * bs * n_new  # its first global shard index
                assert first_shard > _opened(state, s), (rank, w, s)
                if block:  # and the first such block: one block earlier starts with a shard already read
                    assert rank * dm.workers + w + (block - 1) * bs * n_new <= _opened(state, s)
        totals = dm.data_stats_total
        assert totals["images"] == (consumed if rank == 0 else 0)  # the run's totals travel on rank 0
        views.append(_keys(consume(dm, 3)))
        again = module(rank)
        again.reset_data_position = True
        again.load_state_dict(state)
        assert _keys(consume(again, 3)) == views[-1]  # deterministic
    if w_new == 2:
        assert views[0] != views[1]


def test_reset_is_refused_when_more_than_the_layout_changed(three_sources, tokenizer_dir):
    root, _ = three_sources
    state = _saved_run(tokenizer_dir, root, 1, 0, 4, 2)
    dm = EvfDataModule(*data_settings(tokenizer_dir, root, batch_size=2, seed=8), rank=0, world_size=2)
    dm.reset_data_position = True
    with pytest.raises(ConfigError, match="seed: saved 7, now 8") as err:
        dm.load_state_dict(state)
    assert "reset_data_position" not in str(err.value)
