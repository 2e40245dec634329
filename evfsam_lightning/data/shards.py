"""Write and read WebDataset shards of `Sample`s (the format in `schema.py`).

A shard folder holds `PREFIX-000000.tar`, `PREFIX-000001.tar`, ... and a `sizes.json`:

    {"shards": {"PREFIX-000000.tar": 1000, ...}, "total": N, "source": "refcoco_unc",
     "task": "referring", "format": "refer", "split": "train", "objects": n, "expressions": n}

Every file is written under a temporary name and renamed into place, so a reader never sees a
half-written shard, and identical input gives byte-identical tars (fixed member order, mtime, owner
and mode).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .schema import Sample, decode_sample, encode_sample

SIZES_FILE = "sizes.json"
TMP_SUFFIX = ".tmp"
# Fixed tar header fields: the same samples must give the same bytes on any machine, any day.
_TAR_MTIME = 0
_TAR_MODE = 0o444


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON to `path` via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _names(value_set: set[str]) -> str | list[str] | None:
    # One source/task per folder is the norm; a mixed folder reports every name rather than one.
    if not value_set:
        return None
    return next(iter(value_set)) if len(value_set) == 1 else sorted(value_set)


class ShardWriter:
    """Write samples into `out_dir/PREFIX-NNNNNN.tar` shards of at most `max_samples_per_shard`.

    Samples are stored in the order they are written; `close()` writes `sizes.json` and returns
    its content. Used as a context manager, an exception inside the block calls `abort()`, which
    removes this writer's shards and leaves no `sizes.json`. Existing shards with the same prefix are refused unless
    `overwrite=True`, in which case the ones this run does not rewrite are removed at `close()`.
    """

    def __init__(self, out_dir: str | Path, prefix: str, max_samples_per_shard: int = 1000, *,
                 format: str | None = None, split: str | None = None, overwrite: bool = False):
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        if not re.fullmatch(r"[A-Za-z0-9_+\-]+", prefix):
            raise ValueError(f"shard prefix {prefix!r} may only hold letters, digits, '_', '+' and '-'")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_samples_per_shard = max_samples_per_shard
        self.format = format
        self.split = split
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._old = sorted(self.out_dir.glob(f"{prefix}-*.tar"))
        if self._old and not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds shards ({self._old[0].name}, ...); "
                                  "pass overwrite=True (--overwrite) to replace them")
        self.shards: dict[str, int] = {}
        self.total = 0
        self.objects = 0
        self.expressions = 0
        self._sources: set[str] = set()
        self._tasks: set[str] = set()
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._current = ""
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _open_next(self) -> None:
        self._current = self._shard_name(len(self.shards))
        self._tar = tarfile.open(self._tmp_path(), "w", format=tarfile.PAX_FORMAT)
        self.shards[self._current] = 0

    def _tmp_path(self) -> Path:
        return self.out_dir / (self._current + TMP_SUFFIX)

    def _finish_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        with open(self._tmp_path(), "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp_path(), self.out_dir / self._current)

    def write(self, sample: Sample) -> None:
        """Encode and append one sample."""
        self.write_encoded(encode_sample(sample))

    def write_encoded(self, members: dict[str, Any]) -> None:
        """Append one sample already encoded by `encode_sample` (e.g. in a worker process)."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.out_dir} is closed")
        key = members["__key__"]
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.out_dir}")
        record = json.loads(members["json"])
        if self._tar is None or self.shards[self._current] >= self.max_samples_per_shard:
            self._finish_current()
            self._open_next()
        for suffix in sorted(k for k in members if not k.startswith("__")):
            data = members[suffix]
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = _TAR_MTIME
            info.mode = _TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self.shards[self._current] += 1
        self.total += 1
        self.objects += len(record["objects"])
        self.expressions += sum(len(o["expressions"]) for o in record["objects"])
        self._sources.add(record["source"])
        self._tasks.add(record["task"])

    def close(self) -> dict[str, Any]:
        """Finish the last shard, write `sizes.json`, and return its content."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.out_dir} is already closed")
        self._finish_current()
        self._closed = True
        for old in self._old:
            if old.name not in self.shards:
                old.unlink()
        sizes = {
            "shards": dict(self.shards), "total": self.total, "source": _names(self._sources),
            "task": _names(self._tasks), "format": self.format, "split": self.split,
            "objects": self.objects, "expressions": self.expressions,
        }
        write_json_atomic(self.out_dir / SIZES_FILE, sizes)
        return sizes

    def abort(self) -> None:
        """Remove what this writer wrote (a partial set of shards is no dataset) and write no
        `sizes.json`; an older `sizes.json` whose shards were replaced goes too."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._tmp_path().unlink(missing_ok=True)
        for name in self.shards:
            (self.out_dir / name).unlink(missing_ok=True)
        if any(old.name in self.shards for old in self._old):
            (self.out_dir / SIZES_FILE).unlink(missing_ok=True)
        self.shards = {}
        self._closed = True


def load_sizes(shard_dir: str | Path) -> dict[str, Any]:
    """The `sizes.json` of a shard folder."""
    path = Path(shard_dir) / SIZES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sizes.json (is {shard_dir} a finished shard folder?)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shard_paths(shard_dir: str | Path) -> list[Path]:
    """The shards listed in a folder's `sizes.json`, in order."""
    return [Path(shard_dir) / name for name in load_sizes(shard_dir)["shards"]]


def read_shard_samples(path: str | Path) -> Iterator[Sample]:
    """Decode every sample of one tar shard, in stored order (for tests and inspection)."""
    path = Path(path)
    members: dict[str, Any] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, suffix = info.name.partition(".")
            if members and members["__key__"] != key:
                yield decode_sample(members, f"{path}:{members['__key__']}")
                members = {}
            members.setdefault("__key__", key)
            members["__url__"] = str(path)
            members[suffix] = tar.extractfile(info).read()
    if members:
        yield decode_sample(members, f"{path}:{members['__key__']}")
