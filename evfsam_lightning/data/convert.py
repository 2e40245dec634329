"""The conversion driver: raw dataset -> work items -> `Sample`s -> shards, in parallel.

A converter (`data/sources/*.py`) makes a `ConversionPlan`: a list of small picklable
`WorkItem`s (one per output sample, e.g. one image with its annotations) and a module-level
`build` function that turns one item into a `Sample`. The driver runs `build` in a process pool,
writes the results in (split, key) order whatever the number of workers, and reports what it
wrote and what it skipped. Bad data (a missing image, an undecodable annotation, an empty mask,
an object without expression) is skipped and counted; with `strict=True` the first one raises.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import multiprocessing
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from .schema import Sample, SampleError, encode_sample
from .shards import ShardWriter, write_json_atomic

REPORT_FILE = "report.json"
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Skip:
    """Something left out of the shards. `error=False` marks a deliberate policy skip (e.g. a
    COCO crowd annotation) that `strict` mode lets pass."""

    reason: str
    id: str
    message: str
    error: bool = True


@dataclass
class Built:
    """What `build` makes of one work item: a sample (None when nothing usable remains) and the
    parts of the item it left out."""

    sample: Sample | None
    skips: list[Skip] = field(default_factory=list)


@dataclass(frozen=True)
class WorkItem:
    """One future sample: its output split, its sample key, and the plain data `build` needs."""

    split: str
    key: str
    data: Any


@dataclass
class ConversionPlan:
    """Everything the driver needs. `build` must be a module-level function (workers import it);
    `skipped` holds what planning already left out; `splits` names every output split (each gets
    a shard folder, even if empty)."""

    format: str
    source: str
    task: str
    build: Callable[[WorkItem], Built]
    items: list[WorkItem]
    splits: list[str]
    skipped: list[Skip] = field(default_factory=list)
    vocabulary: dict[str, Any] | None = None
    """{"template" or "templates", "names"}: the source's category vocabulary, written as
    `vocabulary.json` into every split folder (no-target negatives, docs/no_target.md)."""


def hash_split(image_file: str, val_fraction: float, seed: int = 0) -> str:
    """"val" for about `val_fraction` of the images, "train" for the others. Decided by a hash of
    (seed, the image's file name without folders) alone: an image keeps its split when images are
    added or removed or folders renamed, and JSONL and COCO annotations of it agree."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    name = image_file.replace("\\", "/").rsplit("/", 1)[-1]
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def built_or_skip(sample: Sample, skips: list[Skip]) -> Built:
    """A `Built` for a sample whose objects may all have been skipped (then a `no_object` skip)."""
    if sample.objects:
        return Built(sample, skips)
    return Built(None, skips + [Skip("no_object", sample.key, f"sample {sample.key}: no usable object "
                                     f"(image {sample.image_file})", error=False)])


def _run_one(build: Callable[[WorkItem], Built], item: WorkItem) -> tuple[dict | None, list[Skip]]:
    try:
        built = build(item)
    except SampleError as e:
        return None, [Skip(e.reason, item.key, str(e))]
    except Exception as e:
        # A plain message survives the trip back from a worker process; the item names the culprit.
        raise RuntimeError(f"converting sample {item.key} ({item.split}): {type(e).__name__}: {e}") from e
    if built.sample is None:
        return None, built.skips
    # Encoding (PNG compression of masks) is the costly part, so it runs in the worker.
    return encode_sample(built.sample), built.skips


def _results(plan: ConversionPlan, items: list[WorkItem], workers: int) -> Iterator[tuple[dict | None, list[Skip]]]:
    run = functools.partial(_run_one, plan.build)
    if workers <= 1 or len(items) <= 1:
        yield from map(run, items)
        return
    chunksize = max(1, min(32, len(items) // (workers * 8)))
    # spawn: no fork of a process that already runs threads (tqdm's monitor), same on every OS.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(run, items, chunksize=chunksize)


def _shard_prefix(source: str, split: str) -> str:
    return f"{source}-{split}".replace(".", "_").replace("/", "_").replace(" ", "_")


def convert(plan: ConversionPlan, out_dir: str | Path, *, workers: int = 1, shard_size: int = 1000,
            strict: bool = False, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run `plan` and write `out_dir/<split>/` shard folders plus `out_dir/report.json`.

    Returns the report: per split and in total the samples, objects and expressions written, and
    per skip reason a count and a few example ids. With `strict`, the first bad item raises a
    `SampleError` naming it (no report is written)."""
    out_dir = Path(out_dir)
    items = sorted(plan.items, key=lambda it: (it.split, it.key))
    for a, b in itertools.pairwise(items):
        if (a.split, a.key) == (b.split, b.key):
            raise ValueError(f"{plan.format}: two samples share the key {a.key!r} in split {a.split!r}")
    unknown = {it.split for it in items} - set(plan.splits)
    if unknown:
        raise ValueError(f"{plan.format}: items for splits {sorted(unknown)} not in plan.splits {plan.splits}")

    skips: list[Skip] = []

    def note(new: list[Skip]) -> None:
        for s in new:
            if strict and s.error:
                raise SampleError(s.reason, s.message)
        skips.extend(new)

    writers: dict[str, ShardWriter] = {}
    vocabulary = _VocabularyCollector(plan.task)
    try:
        note(plan.skipped)
        for split in plan.splits:
            writers[split] = ShardWriter(out_dir / split, _shard_prefix(plan.source, split), shard_size,
                                         format=plan.format, split=split, overwrite=overwrite)
        results = _results(plan, items, workers)
        bar = tqdm(total=len(items), desc=f"{plan.source}", unit="img", disable=not progress,
                   dynamic_ncols=True)
        try:
            for item, (members, item_skips) in zip(items, results, strict=True):
                note(item_skips)
                if members is not None:
                    writers[item.split].write_encoded(members)
                    vocabulary.add(members)
                bar.update(1)
        finally:
            bar.close()
            results.close()  # stops the worker pool now, also when a strict error ends the loop early
        sizes = {split: w.close() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise

    found = plan.vocabulary if plan.vocabulary is not None else vocabulary.result()
    if found is not None:
        for split in plan.splits:
            write_json_atomic(out_dir / split / "vocabulary.json", found)
    report = _report(plan, sizes, skips)
    write_json_atomic(out_dir / REPORT_FILE, report)
    print_report(report, file=sys.stdout)
    return report


class _VocabularyCollector:
    """The category names of a category-labelled source (semantic, part, instance data), from the
    written records, with the expression template they use (`[semantic] {}` or `{}`); referring
    data records none (its categories are not what its expressions name)."""

    def __init__(self, task: str):
        self.active = task != "referring"
        self.names: dict[str, None] = {}
        self.semantic = False

    def add(self, members: dict[str, Any]) -> None:
        if not self.active or "json" not in members:
            return
        import json

        for obj in json.loads(members["json"]).get("objects", []):
            category = obj.get("category")
            if category and not obj.get("no_target"):
                self.names.setdefault(str(category), None)
                self.semantic = self.semantic or f"[semantic] {category}" in obj.get("expressions", [])

    def result(self) -> dict[str, Any] | None:
        if not self.names:
            return None
        return {"template": "[semantic] {}" if self.semantic else "{}", "names": sorted(self.names)}


def _report(plan: ConversionPlan, sizes: dict[str, dict], skips: list[Skip]) -> dict[str, Any]:
    skipped: dict[str, dict[str, Any]] = {}
    for s in skips:
        entry = skipped.setdefault(s.reason, {"count": 0, "examples": [], "first_message": s.message,
                                              "error": s.error})
        entry["count"] += 1
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(s.id)
    splits = {split: {"samples": sz["total"], "objects": sz["objects"], "expressions": sz["expressions"],
                      "shards": len(sz["shards"])} for split, sz in sizes.items()}
    written = {k: sum(s[k] for s in splits.values()) for k in ("samples", "objects", "expressions")}
    return {"format": plan.format, "source": plan.source, "task": plan.task, "splits": splits,
            "written": written, "skipped": skipped,
            "skipped_total": sum(e["count"] for e in skipped.values())}


def print_report(report: dict[str, Any], file: TextIO = sys.stdout) -> None:
    """A short human-readable summary of a conversion report."""
    print(f"{report['format']} -> {report['source']} ({report['task']})", file=file)
    for split, s in report["splits"].items():
        print(f"  {split:>8}: {s['samples']} samples, {s['objects']} objects, {s['expressions']} expressions"
              f" in {s['shards']} shards", file=file)
    if not report["skipped"]:
        print("  skipped: nothing", file=file)
    for reason, e in sorted(report["skipped"].items()):
        print(f"  skipped {reason}: {e['count']} (e.g. {', '.join(e['examples'])})", file=file)
        print(f"      first: {e['first_message']}", file=file)
