"""Shared helpers for the data tests: tiny real WebDataset shards written with `webdataset.TarWriter`."""

from __future__ import annotations

import io
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from evfsam_lightning.config import DataConfig, SourceConfig
from evfsam_lightning.data.schema import Sample, SampleObject, encode_sample
from evfsam_lightning.data.settings import PipelineSettings
from evfsam_lightning.data.tokenizer import build_tokenizer

TASKS = {"refcoco": "referring", "objects365": "instance", "ade20k": "semantic",
         "partimagenet": "part", "humanparsing": "semantic", "pascal_part": "part"}


def make_sample(key: str, source: str = "refcoco", *, height: int = 40, width: int = 48,
                n_objects: int = 2, seed: int = 0) -> Sample:
    """A sample with a random PNG image (lossless, so tests can recompute exact pixels) and masks."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    objects = []
    for i in range(n_objects):
        mask = (rng.random((height, width)) < 0.3).astype(np.uint8)
        mask[0, : i + 1] = 255
        objects.append(SampleObject([f"{key} thing {i} phrase {j}" for j in range(1 + i % 3)], mask, "thing", str(i)))
    return Sample(key=key, source=source, task=TASKS.get(source, "referring"), image_bytes=buf.getvalue(),
                  image_ext="png", objects=objects, height=height, width=width)


def write_shard(path: Path, members: list[dict]) -> None:
    """Write member dicts (as `encode_sample` returns them, possibly damaged) into one tar."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for m in members:
            sink.write(m)


def write_source(root: Path, source: str, n_samples: int, n_shards: int, *, sizes: bool = True,
                 seed: int = 0, **kw) -> dict[str, Sample]:
    """Shards `root/source/source-{000000..}.tar` (+ sizes.json); returns the samples by key."""
    out = root / source
    out.mkdir(parents=True, exist_ok=True)
    samples = {}
    per_shard = {}
    for s in range(n_shards):
        keys = [f"{source}_{i:05d}" for i in range(s, n_samples, n_shards)]
        members = []
        for key in keys:
            sample = make_sample(key, source, n_objects=1 + (int(key[-5:]) % 4), seed=seed * 100003 + int(key[-5:]), **kw)
            samples[key] = sample
            members.append(encode_sample(sample))
        name = f"{source}-{s:06d}.tar"
        write_shard(out / name, members)
        per_shard[name] = len(keys)
    if sizes:
        (out / "sizes.json").write_text(json.dumps(per_shard))
    return samples


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    sentences = [f"{s}_{i:05d} thing {o} phrase {p}" for s in TASKS for i in range(40) for o in range(4) for p in range(3)]
    return str(build_tokenizer(sentences, tmp_path_factory.mktemp("tok"), added_tokens=["[semantic]"]))


@pytest.fixture(scope="session")
def three_sources(tmp_path_factory) -> tuple[Path, dict[str, Sample]]:
    """refcoco (5 shards x 6), ade20k (3 shards x 5), pascal_part (1 shard of 7)."""
    root = tmp_path_factory.mktemp("shards")
    samples = {}
    samples.update(write_source(root, "refcoco", 30, 5))
    samples.update(write_source(root, "ade20k", 15, 3))
    samples.update(write_source(root, "pascal_part", 7, 1))
    return root, samples


def pipeline(tokenizer: str, **values) -> tuple[DataConfig, PipelineSettings]:
    """The data module's two inputs; each value goes to the one dataclass that declares it. Defaults
    for tests: the SAM resize in the workers, validation batches as large as training ones."""
    derived = {f.name for f in fields(PipelineSettings)}
    values = {"sam_resize": "worker", "val_batch_size": values.get("batch_size", 2), **values}
    data = DataConfig(**{k: v for k, v in values.items() if k not in derived})
    return data, PipelineSettings(tokenizer=tokenizer, **{k: v for k, v in values.items() if k in derived})


def data_settings(tokenizer: str, root: Path, **overrides) -> tuple[DataConfig, PipelineSettings]:
    """A tiny-image pipeline over `three_sources` (weights 4:2:1)."""
    values = dict(
        train=[SourceConfig("refcoco", [str(root / "refcoco" / "refcoco-{000000..000004}.tar")], 4.0),
               SourceConfig("ade20k", [str(root / "ade20k")], 2.0),
               SourceConfig("pascal_part", [str(root / "pascal_part" / "*.tar")], 1.0)],
        batch_size=2, num_workers=0, sam_image_size=64, beit_image_size=32,
        max_text_length=16, shuffle_buffer=4, samples_per_epoch=24, seed=7)
    values.update(overrides)
    return pipeline(tokenizer, **values)


def consume(dm, n_batches: int) -> list[dict]:
    """Take `n_batches` training batches the way Lightning does (a fresh iterator each epoch, each
    batch recorded by `on_before_batch_transfer` and finished by `on_after_batch_transfer`),
    stopping mid-epoch if asked."""
    out: list[dict] = []
    while len(out) < n_batches:
        for batch in dm.train_dataloader():
            out.append(dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0))
            if len(out) == n_batches:
                break
    return out
