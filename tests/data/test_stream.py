"""Reading shards into batches: URL forms, the batch dict, exact preprocessing, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evfsam_lightning.data.datamodule import EvfDataModule
from evfsam_lightning.data.schema import encode_sample
from evfsam_lightning.data.skips import SkipLog
from evfsam_lightning.data.stream import expand_urls, iter_shard, shard_sizes
from evfsam_lightning.data.transforms import beit3_preprocess, sam2_preprocess, sam_preprocess
from tests.data.conftest import consume, data_settings, make_sample, write_shard


def test_expand_urls_handles_braces_directories_globs_pipes_and_lists(three_sources):
    root, _ = three_sources
    ref = [str(root / "refcoco" / f"refcoco-{i:06d}.tar") for i in range(5)]
    assert expand_urls(str(root / "refcoco" / "refcoco-{000000..000004}.tar")) == ref
    assert expand_urls(str(root / "refcoco")) == ref
    assert expand_urls(str(root / "refcoco" / "*.tar")) == ref
    assert expand_urls("pipe:cat s-{0..1}.tar") == ["pipe:cat s-0.tar", "pipe:cat s-1.tar"]
    assert expand_urls([ref[0], "https://host/a-{00..01}.tar"]) == [ref[0], "https://host/a-00.tar", "https://host/a-01.tar"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_urls(str(root / "nowhere" / "*.tar"))


def test_shard_sizes_come_from_sizes_json(three_sources, tmp_path):
    root, _ = three_sources
    urls = expand_urls(str(root / "ade20k"))
    assert shard_sizes(urls) == [5, 5, 5]
    assert shard_sizes(["pipe:cat " + u for u in urls]) is None
    table = tmp_path / "sizes.json"
    table.write_text(json.dumps({"ade20k-000000.tar": 5, "ade20k-000001.tar": 5, "ade20k-000002.tar": 5}))
    assert shard_sizes(["pipe:cat " + u for u in urls], str(table)) == [5, 5, 5]
    assert shard_sizes([f"pipe:aws s3 cp s3://b/ade20k-{i:06d}.tar -" for i in range(3)], str(table)) == [5, 5, 5]
    assert shard_sizes(urls + ["pipe:cat other.tar"], str(table)) is None


def test_pipe_urls_read_the_same_samples_as_paths(three_sources):
    root, _ = three_sources
    path = str(root / "ade20k" / "ade20k-000001.tar")
    local = list(iter_shard(path, SkipLog(strict=True)))
    piped = list(iter_shard(f"pipe:cat {path}", SkipLog(strict=True)))
    assert [s["__key__"] for s in local] == ["ade20k_00001", "ade20k_00004", "ade20k_00007", "ade20k_00010", "ade20k_00013"]
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in piped] == \
           [{k: v for k, v in s.items() if k != "__url__"} for s in local]


@pytest.mark.parametrize("sampling", ["sentences", "objects"])
def test_batch_dict_matches_the_exact_preprocessing(three_sources, tokenizer_dir, sampling):
    root, samples = three_sources
    dm = EvfDataModule(*data_settings(tokenizer_dir, root, batch_size=3, max_expressions_per_image=2,
                                      expression_sampling=sampling))
    for batch in consume(dm, 6):
        b, n = len(batch["keys"]), len(batch["expressions"])
        assert b == 3 and "_stream" not in batch
        assert batch["sam_pixel_values"].shape == (b, 3, 64, 64) and batch["sam_pixel_values"].dtype == torch.float32
        assert batch["beit_pixel_values"].shape == (b, 3, 32, 32)
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == n
        assert torch.equal(batch["attention_mask"], batch["input_ids"] != 1)
        assert batch["attention_mask"].dtype == torch.bool
        assert (batch["input_ids"][:, 0] == 0).all() and batch["attention_mask"][:, 0].all()
        counts = torch.diff(batch["offsets"])
        assert batch["offsets"][0] == 0 and batch["offsets"][-1] == n
        assert torch.equal(batch["image_index"], torch.repeat_interleave(torch.arange(b), counts))
        for i, key in enumerate(batch["keys"]):
            sample = samples[key]
            image = sample.decode_image()
            sam, hw = sam_preprocess(image, 64)
            assert torch.equal(batch["sam_pixel_values"][i], sam)
            assert torch.equal(batch["beit_pixel_values"][i], beit3_preprocess(image, 32))
            assert batch["resize_hw"][i].tolist() == list(hw)
            assert batch["original_hw"][i].tolist() == [sample.height, sample.width]
            assert batch["sources"][i] == sample.source and batch["tasks"][i] == sample.task
            exprs = batch["expressions"][batch["offsets"][i]:batch["offsets"][i + 1]]
            masks = batch["masks"][i]
            assert masks.dtype == torch.uint8 and masks.shape == (len(exprs), sample.height, sample.width)
            chosen = batch["object_index"][batch["offsets"][i]:batch["offsets"][i + 1]].tolist()
            assert all(e in sample.objects[j].expressions for e, j in zip(exprs, chosen, strict=True))
            if sampling == "sentences" and sample.task == "referring":  # distinct sentences of any objects
                assert len(exprs) == min(2, sum(len(o.expressions) for o in sample.objects))
                assert len(set(zip(chosen, exprs, strict=True))) == len(exprs)
            else:
                assert len(exprs) == min(2, len(sample.objects))
                assert chosen == sorted(set(chosen))  # distinct objects, in object order
            for m, j in zip(masks, chosen, strict=True):
                assert np.array_equal(m.numpy(), sample.objects[j].mask)


def test_sam2_variant_uses_the_square_resize(three_sources, tokenizer_dir):
    root, samples = three_sources
    batch = consume(EvfDataModule(*data_settings(tokenizer_dir, root, sam_variant="sam2")), 1)[0]
    sam, hw = sam2_preprocess(samples[batch["keys"][0]].decode_image(), 64)
    assert torch.equal(batch["sam_pixel_values"][0], sam) and batch["resize_hw"][0].tolist() == [64, 64]


def test_same_seed_same_stream_other_seed_other_stream(three_sources, tokenizer_dir):
    root, _ = three_sources

    def run(**kw):
        batches = consume(EvfDataModule(*data_settings(tokenizer_dir, root, **kw)), 8)
        return [(b["keys"], b["expressions"]) for b in batches]

    assert run() == run()
    assert run() != run(seed=8)


def test_batch_mixing_gives_single_source_batches(three_sources, tokenizer_dir):
    root, _ = three_sources
    batches = consume(EvfDataModule(*data_settings(tokenizer_dir, root, mixing="batch", batch_size=3)), 10)
    assert all(len(set(b["sources"])) == 1 for b in batches)
    assert len({b["sources"][0] for b in batches}) > 1


def test_gzipped_shards_are_read(tmp_path, tokenizer_dir):
    import gzip

    write_shard(tmp_path / "a.tar", [encode_sample(make_sample(f"k{i}", seed=i)) for i in range(3)])
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    assert [s["__key__"] for s in iter_shard(str(tmp_path / "a.tar.gz"), SkipLog(strict=True))] == ["k0", "k1", "k2"]


def test_missing_local_shard_fails_at_setup_naming_it(three_sources, tokenizer_dir):
    root, _ = three_sources
    data, settings = data_settings(tokenizer_dir, root)
    data.train[1].urls = [str(root / "ade20k" / "ade20k-{000000..000003}.tar")]
    with pytest.raises(FileNotFoundError, match="ade20k.*ade20k-000003.tar"):
        EvfDataModule(data, settings).setup("fit")
