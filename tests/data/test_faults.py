"""Every fault kind is skipped and counted, no good sample is lost, strict mode names shard and key."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pytest

from evfsam_lightning.config import DataConfig, SourceConfig
from evfsam_lightning.data.datamodule import EvfDataModule
from evfsam_lightning.data.schema import encode_sample
from evfsam_lightning.data.settings import PipelineSettings
from evfsam_lightning.data.skips import DataError, SkipLog
from evfsam_lightning.data.stream import SourceReader, iter_shard
from tests.data.conftest import consume, make_sample, pipeline, write_shard


def _members(key: str, n_objects: int = 2) -> dict:
    return encode_sample(make_sample(key, "refcoco", n_objects=n_objects, seed=zlib.crc32(key.encode())))


def _damaged(key: str, reason: str) -> dict:
    m = _members(key)
    if reason == "bad_image":
        m["png"] = b"\x89PNG not really"
    elif reason == "mask_size":
        m["mask_001.png"] = encode_sample(make_sample("x", n_objects=2, height=8, width=8))["mask_001.png"]
    elif reason == "no_expression":
        rec = json.loads(m["json"])
        rec["objects"][1]["expressions"] = ["   "]
        m["json"] = json.dumps(rec).encode()
    elif reason == "missing_mask":
        del m["mask_000.png"]
    elif reason == "bad_json":
        m["json"] = b'{"version": 1, "key": '
    return m


def _cut(path: Path, members: list[dict], key: str, suffix: str, where: str) -> None:
    """Write the shard, then cut it inside the header or the data of member `key.suffix`."""
    write_shard(path, members)
    data = path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmember(f"{key}.{suffix}")
    path.write_bytes(data[: info.offset + 100 if where == "header" else info.offset_data + 10])


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """Three shards with every fault kind; returns (shard dir, {key: expected reason or None})."""
    root = tmp_path_factory.mktemp("faulty")
    truth: dict[str, str | None] = {}
    members = []
    for i, reason in enumerate(["bad_image", "mask_size", "no_expression", "missing_mask", "bad_json"]):
        for key, r in ((f"good_a{i}", None), (f"bad_{reason}", reason)):
            members.append(_members(key) if r is None else _damaged(key, r))
            truth[key] = r
    write_shard(root / "s0.tar", members)
    # s1 breaks off inside the data of good_b3's second mask: b0..b2 arrive, b3 is truncated.
    keys = [f"good_b{i}" for i in range(5)]
    _cut(root / "s1.tar", [_members(k) for k in keys], "good_b3", "mask_001.png", "data")
    truth.update({"good_b0": None, "good_b1": None, "good_b2": None, "good_b3": "truncated_tar"})
    # s2 breaks off inside the header of good_c2's image (members are written json, masks, image):
    # good_c2 lacks its image.
    keys = [f"good_c{i}" for i in range(4)]
    _cut(root / "s2.tar", [_members(k) for k in keys], "good_c2", "png", "header")
    truth.update({"good_c0": None, "good_c1": None, "good_c2": "truncated_tar"})
    # s3 breaks off inside the header of good_d2's first member: good_d1, the last sample read, is
    # complete and must arrive although the shard has no end marker.
    keys = [f"good_d{i}" for i in range(4)]
    _cut(root / "s3.tar", [_members(k) for k in keys], "good_d2", "json", "header")
    truth.update({"good_d0": None, "good_d1": None})
    return root, truth


def _config(root: Path, tokenizer: str, **kw) -> tuple[DataConfig, PipelineSettings]:
    values = dict(train=[SourceConfig("faulty", [str(root / "s{0..3}.tar")])], batch_size=1, num_workers=0,
                  sam_image_size=32, beit_image_size=16, shuffle_buffer=3, samples_per_epoch=1000)
    values.update(kw)
    return pipeline(tokenizer, **values)


def test_truncated_shards_yield_their_complete_samples(faulty):
    root, _ = faulty
    s1 = list(iter_shard(str(root / "s1.tar"), SkipLog()))
    assert [s["__key__"] for s in s1] == ["good_b0", "good_b1", "good_b2", "good_b3"]
    assert [bool(s.get("__truncated__")) for s in s1] == [False, False, False, True]
    s2 = list(iter_shard(str(root / "s2.tar"), SkipLog()))
    assert [s["__key__"] for s in s2] == ["good_c0", "good_c1", "good_c2"]
    assert s2[-1]["__truncated__"] and "png" not in s2[-1] and "json" in s2[-1]
    s3 = list(iter_shard(str(root / "s3.tar"), SkipLog()))
    assert [s["__key__"] for s in s3] == ["good_d0", "good_d1"] and s3[-1]["__truncated__"]
    assert not any(s.get("__truncated__") for s in iter_shard(str(root / "s0.tar"), SkipLog()))


def test_training_stream_skips_and_counts_each_fault_in_the_batch_that_met_it(faulty, tokenizer_dir):
    root, truth = faulty
    n_good = sum(r is None for r in truth.values())
    n_batches = 2 * n_good  # two passes over the shards
    batches = consume(EvfDataModule(*_config(root, tokenizer_dir)), n_batches)
    # The expected batches, from the reader's raw order and the ground truth (not from the decoder).
    reader = SourceReader("faulty", [str(root / f"s{i}.tar") for i in range(4)], seed=0, reader=0, n_readers=1,
                          buffer_size=3, block_shards=1, skips=SkipLog())
    for batch in batches:
        expected = Counter()
        while truth[(raw := reader.next())["__key__"]] is not None:
            expected[truth[raw["__key__"]]] += 1
        assert batch["keys"] == [raw["__key__"]]
        stats = batch["data_stats"]
        assert {r: n for r, n in stats.items() if n and r not in ("images", "skipped")} == dict(expected)
        assert stats["skipped"] == sum(expected.values()) and stats["images"] == 1
    seen = {k for b in batches for k in b["keys"]}
    assert seen == {k for k, r in truth.items() if r is None}
    total = Counter()
    for b in batches:
        total.update(b["data_stats"])
    assert total["truncated_tar"] >= 2 and all(total[r] >= 1 for r in set(truth.values()) - {None})


def test_eval_stream_counts_every_fault_exactly_once(faulty, tokenizer_dir):
    root, truth = faulty
    pair = _config(root, tokenizer_dir, val=[SourceConfig("faulty", [str(root / "s{0..3}.tar")])], num_workers=2)
    dm = EvfDataModule(*pair, rank=0, world_size=1)
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(k for k, r in truth.items() if r is None)
    total = Counter()
    for b in batches:
        total.update(b["data_stats"])
    expected = Counter(r for r in truth.values() if r is not None)
    assert {r: n for r, n in total.items() if n and r not in ("images", "skipped")} == dict(expected)
    assert total["images"] == len(keys) and total["skipped"] == sum(expected.values())


def test_strict_mode_raises_naming_shard_and_key(faulty, tokenizer_dir):
    root, truth = faulty
    with pytest.raises(DataError, match=r"strict data mode: shard .*/s\d\.tar, sample (bad_\w+|good_b3|good_c2)") as e:
        consume(EvfDataModule(*_config(root, tokenizer_dir, strict=True)), 30)
    key = str(e.value).split("sample ")[1].split(":")[0]
    assert truth[key] == e.value.reason


def test_unreadable_shard_counts_a_read_error_and_a_source_without_data_stops(tmp_path, tokenizer_dir):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 10)
    write_shard(tmp_path / "ok.tar", [_members("ok0"), _members("ok1")])
    urls = [str(tmp_path / "junk.tar"), "pipe:cat " + str(tmp_path / "nope.tar"), str(tmp_path / "ok.tar")]
    data, settings = _config(tmp_path, tokenizer_dir, train=[SourceConfig("mixed", urls)])
    batches = consume(EvfDataModule(data, settings), 4)
    assert {k for b in batches for k in b["keys"]} == {"ok0", "ok1"}
    assert sum(b["data_stats"]["read_error"] for b in batches) >= 2
    assert all(b["data_stats"]["skipped"] == 0 for b in batches)
    data.train = [SourceConfig("junk", [str(tmp_path / "junk.tar")])]
    with pytest.raises(DataError, match="source junk: no readable sample"):
        consume(EvfDataModule(data, settings), 1)
