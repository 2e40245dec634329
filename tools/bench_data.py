"""Data loading throughput: our pipeline versus a plain per-file reader, at equal workers.

    PYTHONPATH=. python tools/bench_data.py [--images 96] [--workers 2] [--batch-size 2]
                                            [--image-size 1024] [--batches 40] [--repeats 3] [--work DIR]
                                            [--finish none|cpu|cuda] [--sam-resize worker|device]

Writes synthetic COCO-like samples once (640x480 JPEG, 1-4 mask PNGs and a JSON record each),
both as a folder of files and as WebDataset shards, then times, alternating A/B `--repeats` times,
  stream: `EvfDataModule`'s training loader (tar reading, shuffle of bytes, decode, uint8 SAM
          resize (`--sam-resize worker`; with `device` the decoded image travels and the resize
          is part of the finish), BEiT-3 preprocessing, tokenisation, collation) followed, in the
          consuming process, by `on_after_batch_transfer` (`--finish`: the work that runs on the GPU
          in training: resize with `device`, float conversion and normalisation), and
  files:  a naive reader: a map-style Dataset that opens each image and mask PNG from the folder
          with PIL, picks objects the same way and runs the whole exact float preprocessing
          (`transforms.sam_preprocess` / `sam2_preprocess`, `beit3_preprocess`) in its workers,
          collated by stacking the float tensors, in a plain DataLoader.
Both produce bit-identical model inputs and count images per second after their first batch
(worker start-up excluded). The tokenizer is a tiny test tokenizer (no download).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from evfsam_lightning.config import DataConfig, SourceConfig
from evfsam_lightning.data import transforms
from evfsam_lightning.data.collate import collate
from evfsam_lightning.data.datamodule import EvfDataModule
from evfsam_lightning.data.examples import Preprocessing, pick_expressions
from evfsam_lightning.data.mixing import sample_rng
from evfsam_lightning.data.schema import Sample, SampleObject, encode_sample
from evfsam_lightning.data.settings import PipelineSettings
from evfsam_lightning.data.tokenizer import build_tokenizer


def synthetic_sample(i: int, height: int = 480, width: int = 640) -> Sample:
    rng = np.random.default_rng(i)
    coarse = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(np.int16)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    yy, xx = np.mgrid[:height, :width]
    objects = []
    for j in range(1 + i % 4):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(30, 150)
        mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).astype(np.uint8)
        objects.append(SampleObject([f"the object number {j} of image {i}", f"thing {j}"], mask))
    return Sample(key=f"img{i:06d}", source="synthetic", task="referring", image_bytes=buf.getvalue(),
                  image_ext="jpg", objects=objects, height=height, width=width)


def write_data(root: Path, n: int, per_shard: int = 24) -> None:
    (root / "files").mkdir(parents=True)
    (root / "shards").mkdir()
    sizes = {}
    for s in range(0, n, per_shard):
        name = f"bench-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(root / "shards" / name), encoder=False) as sink:
            for i in range(s, min(n, s + per_shard)):
                members = encode_sample(synthetic_sample(i))
                sink.write(members)
                for suffix, data in members.items():
                    if suffix != "__key__":
                        (root / "files" / f"{members['__key__']}.{suffix}").write_bytes(data)
        sizes[name] = min(n, s + per_shard) - s
    (root / "shards" / "sizes.json").write_text(json.dumps(sizes))


class FolderDataset(Dataset):
    """The plain reader: one image file, its mask PNGs and its JSON record per item, read with PIL."""

    def __init__(self, folder: Path, prep: Preprocessing, k: int = 3):
        self.folder, self.prep, self.k = folder, prep, k
        self.keys = sorted(p.name[: -len(".json")] for p in folder.glob("*.json"))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        key = self.keys[i]
        rec = json.loads((self.folder / f"{key}.json").read_text())
        with Image.open(self.folder / f"{key}.{rec['image']['member']}") as im:
            image = np.asarray(im.convert("RGB"))
        objects = []
        for o in rec["objects"]:
            with Image.open(self.folder / f"{key}.{o['mask']}") as m:
                objects.append(SampleObject(o["expressions"], np.asarray(m)))
        sample = Sample(key=key, source=rec["source"], task=rec["task"], image_bytes=b"", image_ext="jpg",
                        objects=objects, height=image.shape[0], width=image.shape[1])
        picks = pick_expressions(sample, sample_rng(0, 0, i, 0), self.k, "sentences")
        preprocess = transforms.sam_preprocess if self.prep.sam_variant == "sam" else transforms.sam2_preprocess
        sam, resize_hw = preprocess(image, self.prep.sam_image_size)
        return {"sam": sam, "image_features": None, "resize_hw": resize_hw,
                "beit": transforms.beit3_preprocess(image, self.prep.beit_image_size),
                "original_hw": image.shape[:2], "masks": torch.from_numpy(np.stack([objects[j].mask for j, _ in picks])),
                "expressions": [objects[j].expressions[e] for j, e in picks], "object_index": [j for j, _ in picks],
                "key": key, "source": sample.source,
                "task": sample.task}


def naive_collate(examples: list[dict], prep: Preprocessing) -> dict:
    """`collate` of examples whose SAM image is already the float model input (stacked as such)."""
    batch = collate(examples, prep)
    batch["sam_pixel_values"] = batch.pop("sam_pixels_uint8")
    return batch


def timed(loader, batches: int, finish=None) -> tuple[float, int]:
    finish = finish or (lambda batch: batch)
    it = iter(loader)
    finish(next(it))  # start-up and the first batch are not counted
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(finish(next(it))["keys"])
    return time.perf_counter() - start, images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3, help="A/B rounds (stream, files, stream, files, ...)")
    p.add_argument("--finish", choices=("cpu", "cuda", "none"), default="cpu",
                   help="where the stream's uint8 -> float finish runs, counted in its time: cpu (in the "
                        "consuming process, what a CPU-only run pays), cuda (after moving the batch to the "
                        "GPU, as in GPU training), none (not run)")
    p.add_argument("--sam-resize", choices=("worker", "device"), default="worker",
                   help="where the stream's SAM-1 resize runs (data.sam_resize): worker, or device (in the finish)")
    p.add_argument("--work", type=Path)
    args = p.parse_args()
    if args.batches + 1 > args.images // args.batch_size:
        p.error("--images must cover --batches + 1 batches for the per-file reader")
    root = args.work or Path(tempfile.mkdtemp(prefix="bench_data_"))
    if not (root / "shards").is_dir():
        write_data(root, args.images)
    tokenizer = str(build_tokenizer([f"the object number {j} of image {i}" for i in range(50) for j in range(4)],
                                    root / "tokenizer"))
    data = DataConfig(train=[SourceConfig("synthetic", [str(root / "shards")])], num_workers=args.workers,
                      samples_per_epoch=10 ** 6, shuffle_buffer=64, sam_resize=args.sam_resize)
    settings = PipelineSettings(tokenizer=tokenizer, batch_size=args.batch_size, sam_image_size=args.image_size)
    workers = max(1, args.workers)
    print(f"machine: {os.cpu_count()} CPUs; {args.workers} workers; batch {args.batch_size}; "
          f"SAM {args.image_size} px; 640x480 JPEG sources; stream resize: {args.sam_resize}, finish: {args.finish}")
    rates: dict[str, list[float]] = {"stream": [], "files": []}
    for r in range(args.repeats):
        dm = EvfDataModule(data, settings)

        def finish(batch, dm=dm):
            batch = dm.on_before_batch_transfer(batch, 0)
            if args.finish == "none":
                return batch
            if args.finish == "cuda":
                batch = move_data_to_device(batch, "cuda")
            batch = dm.on_after_batch_transfer(batch, 0)
            if args.finish == "cuda":
                torch.cuda.synchronize()
            return batch

        stream_s, stream_n = timed(dm.train_dataloader(), args.batches, finish)
        prep = dataclasses.replace(dm.prep, sam_resize="worker")  # the naive reader resizes in its workers
        files = DataLoader(FolderDataset(root / "files", prep), batch_size=args.batch_size, shuffle=True,
                           num_workers=args.workers, collate_fn=partial(naive_collate, prep=prep))
        def to_device(batch):  # the naive reader's (float) batches travel to the GPU too
            if args.finish != "cuda":
                return batch
            batch = move_data_to_device(batch, "cuda")
            torch.cuda.synchronize()
            return batch

        files_s, files_n = timed(files, args.batches, to_device)
        for name, s, n in (("stream", stream_s, stream_n), ("files", files_s, files_n)):
            rates[name].append(n / s)
            print(f"round {r + 1} {name:<7} {n / s:7.1f} images/s  {n / s / workers:7.1f} per worker  "
                  f"({n} images in {s:.1f} s)")
    for name, label in (("stream", f"stream (resize {args.sam_resize}, finish {args.finish})"),
                        ("files", "files (PIL per file, float in workers)")):
        v = sorted(rates[name])
        print(f"{label:<40} median {v[len(v) // 2]:7.1f} images/s, range {v[0]:.1f}-{v[-1]:.1f}")
    ratio = sorted(a / b for a, b in zip(rates["stream"], rates["files"], strict=True))
    print(f"stream / files per round: {', '.join(f'{x:.2f}' for x in ratio)} (median {ratio[len(ratio) // 2]:.2f})")


if __name__ == "__main__":
    main()
