"""The mixer and the shard order: pure index functions, checked without decoding any image."""

from __future__ import annotations

import numpy as np
import pytest

from evfsam_lightning.data.mixing import Mixer, ShardOrder, sample_rng

RECIPE = {"referring": 16, "objects365": 4, "ade20k": 4, "partimagenet": 2, "humanparsing": 2, "pascal_part": 1}


@pytest.mark.parametrize("rank", [0, 1])
def test_realized_shares_within_one_and_a_half_points_per_rank(rank):
    mixer = Mixer(list(RECIPE.values()), seed=3, mode="sample")
    batch_size, n_samples = 4, 20_000
    drawn = np.concatenate([mixer.sources(rank, g, batch_size) for g in range(n_samples // batch_size)])
    shares = np.bincount(drawn, minlength=len(RECIPE)) / len(drawn)
    targets = np.array(list(RECIPE.values())) / sum(RECIPE.values())
    assert len(drawn) == n_samples
    assert np.abs(shares - targets).max() < 0.015, dict(zip(RECIPE, (shares - targets).round(4), strict=True))


def test_batch_mode_draws_one_source_per_batch_with_the_recipe_shares():
    mixer = Mixer(list(RECIPE.values()), seed=3, mode="batch")
    plans = [mixer.sources(0, g, 3) for g in range(20_000)]
    assert all(len(set(p.tolist())) == 1 for p in plans)
    shares = np.bincount([p[0] for p in plans], minlength=len(RECIPE)) / len(plans)
    targets = np.array(list(RECIPE.values())) / sum(RECIPE.values())
    assert np.abs(shares - targets).max() < 0.015


def test_mixer_is_a_pure_function_of_seed_rank_and_batch_index():
    a, b = Mixer([1, 1, 1], seed=5), Mixer([1, 1, 1], seed=5)
    assert [a.sources(1, g, 8).tolist() for g in (9, 0, 9)] == [b.sources(1, g, 8).tolist() for g in (9, 0, 9)]
    assert [a.sources(0, g, 8).tolist() for g in range(20)] != [a.sources(1, g, 8).tolist() for g in range(20)]
    assert [a.sources(0, g, 8).tolist() for g in range(20)] != [Mixer([1, 1, 1], seed=6).sources(0, g, 8).tolist()
                                                              for g in range(20)]
    assert sample_rng(1, 0, 5, 2).integers(1 << 30) == sample_rng(1, 0, 5, 2).integers(1 << 30)
    assert sample_rng(1, 0, 5, 2).integers(1 << 30) != sample_rng(1, 0, 5, 3).integers(1 << 30)


def test_zero_weight_source_is_never_drawn_and_bad_weights_are_refused():
    drawn = np.concatenate([Mixer([1, 0, 1], seed=0).sources(0, g, 16) for g in range(100)])
    assert 1 not in drawn
    for weights in ([], [0, 0], [1, -1], [float("nan")]):
        with pytest.raises(ValueError, match="weights"):
            Mixer(weights, seed=0)
    with pytest.raises(ValueError, match="mode"):
        Mixer([1], seed=0, mode="round_robin")


@pytest.mark.parametrize("n_shards,n_readers", [(7, 4), (2, 6), (12, 3)])
def test_readers_together_read_every_shard_once_per_epoch(n_shards, n_readers):
    orders = [ShardOrder(n_shards, seed=1, source="ade20k", reader=j, n_readers=n_readers) for j in range(n_readers)]
    # Reader j's k-th shard is entry j + k * n_readers of the global sequence of epoch permutations.
    sequence = {j + k * n_readers: orders[j].shard(k) for j in range(n_readers) for k in range(4 * n_shards)}
    for epoch in range(3):
        assert sorted(sequence[epoch * n_shards + i] for i in range(n_shards)) == list(range(n_shards))
    epochs = [[sequence[e * n_shards + i] for i in range(n_shards)] for e in range(3)]
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # each epoch is shuffled anew
