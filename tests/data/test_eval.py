"""Validation/test streams: finite, ordered, every sample exactly once across ranks, equal batch counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evfsam_lightning.config import SourceConfig
from evfsam_lightning.data.datamodule import EvfDataModule
from evfsam_lightning.data.eval_stream import eval_batch_ranges
from tests.data.conftest import pipeline, write_source


@pytest.mark.parametrize("total", [2, 3, 7, 13, 40])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_eval_ranges_partition_the_split_into_equal_batch_counts(total, world_size, batch_size):
    if total < world_size:
        with pytest.raises(ValueError, match="cannot be shared"):
            eval_batch_ranges(total, world_size, batch_size)
        return
    ranks = eval_batch_ranges(total, world_size, batch_size)
    covered = sorted(i for r in ranks for lo, hi in r for i in range(lo, hi))
    assert covered == list(range(total))
    assert len({len(r) for r in ranks}) == 1
    sizes = [hi - lo for r in ranks for lo, hi in r]
    assert min(sizes) >= 1
    assert max(sizes) <= (batch_size if batch_size > 1 or total % world_size == 0 else 2)


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    samples = write_source(root, "refcoco_val", 13, 3, sizes=False)  # counted by reading
    samples.update(write_source(root, "ade20k_val", 9, 2))  # sizes.json
    return root, samples


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_val_sample_exactly_once_across_two_ranks(val_split, tokenizer_dir, num_workers):
    root, samples = val_split
    pair = pipeline(tokenizer_dir, batch_size=2, num_workers=num_workers, sam_image_size=32, beit_image_size=16,
                    max_expressions_per_image=1, val=[SourceConfig("refcoco_val", [str(root / "refcoco_val")]),
                                                      SourceConfig("ade20k_val", [str(root / "ade20k_val" / "*.tar")])])
    per_rank = []
    for rank in (0, 1):
        loaders = EvfDataModule(*pair, rank=rank, world_size=2).val_dataloader()
        per_rank.append([list(loader) for loader in loaders])
    for idx, name in enumerate(("refcoco_val", "ade20k_val")):
        counts = [len(per_rank[r][idx]) for r in (0, 1)]
        assert counts[0] == counts[1] > 0
        # Rank 0 takes the first half of the split in shard order, rank 1 the rest.
        n, n_shards = (13, 3) if name == "refcoco_val" else (9, 2)
        in_order = [f"{name}_{i:05d}" for s in range(n_shards) for i in range(s, n, n_shards)]
        assert [k for r in (0, 1) for b in per_rank[r][idx] for k in b["keys"]] == in_order
        for batch in (b for r in (0, 1) for b in per_rank[r][idx]):
            assert 1 <= len(batch["keys"]) <= 2
            for i, key in enumerate(batch["keys"]):  # every expression of every object, in order
                objects = samples[key].objects
                pairs = [(j, e) for j, o in enumerate(objects) for e in o.expressions]
                lo, hi = batch["offsets"][i], batch["offsets"][i + 1]
                assert batch["expressions"][lo:hi] == [e for _, e in pairs]
                assert batch["object_index"][lo:hi].tolist() == [j for j, _ in pairs]
                assert torch.equal(batch["masks"][i], torch.from_numpy(np.stack([objects[j].mask for j, _ in pairs])))


def test_eval_text_is_normalised_as_the_reference_only_for_referring(tmp_path, tokenizer_dir):
    from evfsam_lightning.data.schema import encode_sample
    from tests.data.conftest import make_sample, write_shard

    referring, semantic = make_sample("r_00000", "refcoco"), make_sample("s_00000", "ade20k")
    referring.objects[0].expressions = ["  The Man On The LEFT ", "woman"]
    semantic.objects[0].expressions = ["[semantic] Wall"]
    write_shard(tmp_path / "val.tar", [encode_sample(referring), encode_sample(semantic)])
    pair = pipeline(tokenizer_dir, batch_size=2, num_workers=0, sam_image_size=32, beit_image_size=16,
                    val=[SourceConfig("val", [str(tmp_path / "val.tar")])])
    (batch,) = list(EvfDataModule(*pair, rank=0, world_size=1).val_dataloader())
    assert batch["expressions"][:2] == ["the man on the left", "woman"]
    assert batch["expressions"][batch["offsets"][1]] == "[semantic] Wall"
