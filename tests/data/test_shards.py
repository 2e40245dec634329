"""ShardWriter / read_shard_samples: round trip, sizes.json, byte-reproducible and atomic writes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from evfsam_lightning.data.schema import Sample, SampleObject
from evfsam_lightning.data.shards import ShardWriter, load_sizes, read_shard_samples, shard_paths


def _sample(i: int) -> Sample:
    rng = np.random.default_rng(i)
    h, w = 12 + i, 20
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    masks = [(rng.random((h, w)) > 0.5).astype(np.uint8) for _ in range(1 + i % 2)]
    masks[0][0, 0] = 255  # ignore value survives the round trip
    objects = [SampleObject([f"thing {i}.{j}", "another"], m, category="thing", id=f"obj {j}")
               for j, m in enumerate(masks)]
    return Sample(key=f"s-{i:03d}", source="unit", task="referring", image_bytes=buf.getvalue(), image_ext="png",
                  objects=objects, height=h, width=w, image_file=f"{i}.png", meta={"split": "train", "i": i})


def _write(out, n=5, size=2, **kw):
    with ShardWriter(out, "unit-train", size, format="test", split="train", **kw) as writer:
        for i in range(n):
            writer.write(_sample(i))
    return writer


def test_round_trip_and_sizes(tmp_path):
    _write(tmp_path)
    sizes = load_sizes(tmp_path)
    assert sizes["shards"] == {"unit-train-000000.tar": 2, "unit-train-000001.tar": 2, "unit-train-000002.tar": 1}
    assert sizes["total"] == 5 and sizes["source"] == "unit" and sizes["task"] == "referring"
    assert sizes["format"] == "test" and sizes["split"] == "train"
    assert sizes["objects"] == 7 and sizes["expressions"] == 14
    got = [s for p in shard_paths(tmp_path) for s in read_shard_samples(p)]
    assert [s.key for s in got] == [f"s-{i:03d}" for i in range(5)]
    for i, s in enumerate(got):
        ref = _sample(i)
        assert s.image_bytes == ref.image_bytes and s.meta == ref.meta and s.image_file == ref.image_file
        assert [o.expressions for o in s.objects] == [o.expressions for o in ref.objects]
        for a, b in zip(s.objects, ref.objects, strict=True):
            np.testing.assert_array_equal(a.mask, b.mask)
    assert not list(tmp_path.glob("*.tmp"))


def test_webdataset_reads_the_shards(tmp_path):
    _write(tmp_path)
    urls = [str(p) for p in shard_paths(tmp_path)]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert keys == [f"s-{i:03d}" for i in range(5)]


def test_identical_input_gives_identical_bytes(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    for name in load_sizes(tmp_path / "a")["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "sizes.json").read_bytes() == (tmp_path / "b" / "sizes.json").read_bytes()


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "unit-train", 2) as writer:
            for i in range(3):
                writer.write(_sample(i))
            raise RuntimeError("boom")
    assert not list(tmp_path.glob("*")), "a failed run leaves neither temp files, nor shards, nor sizes.json"


def test_existing_shards_need_overwrite_and_stale_ones_go(tmp_path):
    _write(tmp_path, n=5)
    with pytest.raises(FileExistsError, match="overwrite"):
        _write(tmp_path, n=1)
    _write(tmp_path, n=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["unit-train-000000.tar"]
    assert json.loads((tmp_path / "sizes.json").read_text())["total"] == 1


def test_duplicate_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample key 's-000'"):
        with ShardWriter(tmp_path, "unit-train", 10) as writer:
            writer.write(_sample(0))
            writer.write(_sample(0))
