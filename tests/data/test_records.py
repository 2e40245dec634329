"""Shard records of valid JSON but the wrong shape are counted skips (`bad_record`) naming shard and
key, never an uncaught exception; strict mode stops with that message (issue 17, item 6)."""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter

import pytest

from evfsam_lightning.config import DataConfig, SourceConfig
from evfsam_lightning.data.datamodule import EvfDataModule
from evfsam_lightning.data.schema import SampleError, decode_sample, encode_sample
from evfsam_lightning.data.settings import PipelineSettings
from evfsam_lightning.data.skips import DataError
from tests.data.conftest import consume, make_sample, pipeline, write_shard


def _members(key: str) -> dict:
    return encode_sample(make_sample(key, "refcoco", n_objects=2, seed=zlib.crc32(key.encode())))


#: name -> (change to the record, the key the message must name)
WRONG_SHAPES = {
    "objects_numbers": (lambda r: r.update(objects=[1, 2]), "objects[0]"),
    "objects_string": (lambda r: r.update(objects="abc"), "objects"),
    "objects_null": (lambda r: r.update(objects=None), "objects"),
    "expressions_null": (lambda r: r["objects"][0].update(expressions=None), "objects[0].expressions"),
    "expressions_string": (lambda r: r["objects"][1].update(expressions="the red circle"), "objects[1].expressions"),
    "expression_number": (lambda r: r["objects"][0].update(expressions=["ok", 7]), "objects[0].expressions[1]"),
    "mask_list": (lambda r: r["objects"][0].update(mask=["mask_000.png"]), "objects[0].mask"),
    "member_list": (lambda r: r["image"].update(member=["png"]), "image.member"),
    "height_string": (lambda r: r["image"].update(height="40"), "image.height"),
    "image_null": (lambda r: r.update(image=None), "image"),
    "record_list": (lambda r: (r.clear(), r.update(_list=True)), "(top level)"),
}


def _wrong(key: str, change) -> dict:
    m = _members(key)
    rec = json.loads(m["json"])
    change(rec)
    m["json"] = json.dumps([1, 2] if rec.get("_list") else rec).encode()
    return m


@pytest.mark.parametrize("name", WRONG_SHAPES)
def test_wrong_shape_is_a_bad_record_naming_the_key(name):
    change, key = WRONG_SHAPES[name]
    with pytest.raises(SampleError) as info:
        decode_sample(_wrong("k", change), "shard s.tar, sample k")
    assert info.value.reason == "bad_record"
    assert "shard s.tar, sample k" in str(info.value) and f"`{key}`" in str(info.value)


@pytest.fixture(scope="module")
def wrong_shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    good = [f"good{i}" for i in range(3)]
    members = [_wrong(f"bad_{name}", change) for name, (change, _) in WRONG_SHAPES.items()]
    members += [_members(k) for k in good]  # after the wrong ones: the first pass meets every one
    write_shard(root / "s0.tar", members)
    return root / "s0.tar", good


def _config(shard, tokenizer: str, **kw) -> tuple[DataConfig, PipelineSettings]:
    return pipeline(tokenizer, train=[SourceConfig("wrong", [str(shard)])], batch_size=1, num_workers=0,
                    sam_image_size=32, beit_image_size=16, shuffle_buffer=1, samples_per_epoch=1000, **kw)


def test_training_stream_skips_and_counts_every_wrong_shape(wrong_shard, tokenizer_dir, caplog):
    shard, good = wrong_shard
    with caplog.at_level(logging.WARNING):
        batches = consume(EvfDataModule(*_config(shard, tokenizer_dir)), len(good))
    assert sorted(k for b in batches for k in b["keys"]) == sorted(good)
    total = Counter()
    for b in batches:
        total.update(b["data_stats"])
    assert total["bad_record"] == len(WRONG_SHAPES)
    logged = " ".join(r.getMessage() for r in caplog.records if "bad_record" in r.getMessage())
    assert str(shard) in logged and "sample bad_" in logged and "record key `" in logged


def test_strict_mode_stops_naming_shard_and_key(wrong_shard, tokenizer_dir):
    shard, good = wrong_shard
    with pytest.raises(DataError, match=r"strict data mode: .*s0\.tar.*sample bad_\w+.*record key `"):
        consume(EvfDataModule(*_config(shard, tokenizer_dir, strict=True)), len(good))


def test_eval_counts_unreadable_shards_without_sizes_json(tmp_path, tokenizer_dir, caplog):
    split = tmp_path / "val"
    split.mkdir()
    write_shard(split / "a-000000.tar", [_members(f"v{i}") for i in range(3)])
    (split / "a-000001.tar").write_bytes(b"not a tar archive" * 40)  # no sizes.json: counted by reading
    source = SourceConfig("val", [str(split)])
    dm = EvfDataModule(*pipeline(tokenizer_dir, train=[source], batch_size=2, num_workers=0, sam_image_size=32,
                                 beit_image_size=16, samples_per_epoch=10), test_sources=[source])
    with caplog.at_level(logging.WARNING):
        batches = list(dm.eval_stream(source))
    total = Counter()
    for b in batches:
        total.update(b["data_stats"])
    assert total["images"] == 3 and total["read_error"] == 1
    assert "a-000001.tar" in caplog.text


def test_a_stray_file_in_a_shard_folder_is_ignored_with_a_warning(tmp_path, caplog):
    from evfsam_lightning.data.stream import expand_urls, shard_sizes
    from tests.data.conftest import write_source

    write_source(tmp_path, "refcoco", 4, 2)
    (tmp_path / "refcoco" / "copy-of-something.tar").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        urls = expand_urls(str(tmp_path / "refcoco"))
    assert len(urls) == 2 and not any("copy-of-something" in u for u in urls)
    assert "copy-of-something.tar" in caplog.text and "does not list" in caplog.text
    assert shard_sizes(urls) == [2, 2]  # the epoch size stays known
