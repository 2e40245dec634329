"""Stage 1 of the data path: from shard URLs to raw samples: expand URLs, read tars, shuffle bytes,
count faults.

The stages, in the order a sample passes them:

1. `expand_urls`: brace patterns (`data/train-{000000..000009}.tar`), local files, globs,
   directories (every `*.tar` / `*.tar.gz` inside), `pipe:` commands and remote URLs;
   `shard_sizes` reads the sample counts from a `sizes.json` next to the shards.
2. `iter_shard`: one tar -> raw samples (member suffix -> bytes). A shard that breaks off still
   yields every sample before the break; the sample at the break is marked `__truncated__`.
3. `SourceReader`: the endless, resumable raw-sample stream of one source for one reader, shuffled
   in a buffer of bytes (decoding happens after the shuffle, so the buffer stays small).

Decoding is the next stage (`examples.decode`); `docs/data.md` maps the whole path.

`skips.SkipLog` counts skipped samples per reason, logs them at a limited rate, and raises in strict
mode; each batch carries its share of the counts (see `collate.stats`).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import random
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

from braceexpand import braceexpand
from torch.utils.data import get_worker_info
from webdataset.gopen import gopen

from .mixing import ShardOrder, buffer_seed
from .skips import DataError, SkipLog

log = logging.getLogger(__name__)

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_GLOB_CHARS = re.compile(r"[*?\[]")
_MEMBER = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


def is_local(url: str) -> bool:
    """Whether a shard URL is a local path (not `pipe:...` or `scheme://...`)."""
    return not _REMOTE.match(url) or url.startswith("file:")


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from a pattern or a list of patterns, in order.

    Brace patterns expand first; then a local directory stands for its `*.tar` and `*.tar.gz`
    files (sorted), a local pattern with `*?[` for its sorted matches; `pipe:` commands, remote URLs
    and plain paths stay as they are."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for pattern in specs:
        for url in braceexpand(pattern):
            path = _local_path(url)
            if not is_local(url):
                urls.append(url)
            elif os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(path, "*.tar")) + glob.glob(os.path.join(path, "*.tar.gz")))
                if not found:
                    raise FileNotFoundError(f"shard directory {path} holds no *.tar or *.tar.gz file")
                urls.extend(_listed_in_sizes(path, found))
            elif _GLOB_CHARS.search(path):
                found = sorted(glob.glob(path))
                if not found:
                    raise FileNotFoundError(f"shard pattern {path} matches no file")
                urls.extend(found)
            else:
                urls.append(url)
    if not urls:
        raise ValueError(f"no shard URL in {spec!r}")
    return urls


_WARNED_STRAY: set[str] = set()


def _listed_in_sizes(folder: str, found: list[str]) -> list[str]:
    """The shards of a folder that its sizes.json lists (all of them without one). A file the
    writer's manifest does not list (a stray copy, a partial download, an unrelated tar) is not
    part of the dataset: it is left out, with one warning naming it, so that it can neither stop
    the run nor make the epoch size unknown."""
    sizes = os.path.join(folder, "sizes.json")
    if not os.path.isfile(sizes):
        return found
    try:
        listed = _read_sizes_file(sizes)
    except (OSError, ValueError):
        return found  # an unreadable sizes.json is reported where sizes are needed
    keep = [f for f in found if os.path.basename(f) in listed or f in listed]
    stray = [os.path.basename(f) for f in found if f not in keep]
    if stray and folder not in _WARNED_STRAY:
        _WARNED_STRAY.add(folder)
        log.warning("shard directory %s: ignoring %d file(s) its sizes.json does not list: %s", folder, len(stray),
                    ", ".join(stray[:5]) + (" ..." if len(stray) > 5 else ""))
    return keep or found


@lru_cache(maxsize=64)
def _read_sizes_file(path: str) -> dict[str, int]:
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("shards"), dict):
        data = data["shards"]  # the writer's sizes.json: {"shards": {name: count}, "total": ..., ...}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{shard name: sample count}}")
    return {str(k): int(v) for k, v in data.items()}


def _shard_name(url: str) -> str:
    """The file name of a shard, also inside a command (`pipe:aws s3 cp s3://b/x-000.tar -` -> x-000.tar)."""
    tars = [t for t in url.split() if t.endswith((".tar", ".tar.gz", ".tgz"))]
    return os.path.basename(_local_path(tars[-1] if tars else url))


def shard_sizes(urls: Sequence[str], sizes_file: str | None = None) -> list[int] | None:
    """Sample counts of the shards, or None when some are unknown.

    Looked up by shard file name (or full URL) in `sizes_file` if given, else in a `sizes.json`
    next to each local shard (open_clip's convention)."""
    sizes = []
    for url in urls:
        name = _shard_name(url)
        if sizes_file is not None:
            table = _read_sizes_file(sizes_file)
        elif is_local(url) and os.path.isfile(os.path.join(os.path.dirname(_local_path(url)), "sizes.json")):
            table = _read_sizes_file(os.path.join(os.path.dirname(_local_path(url)), "sizes.json"))
        else:
            return None
        if url in table:
            sizes.append(table[url])
        elif name in table:
            sizes.append(table[name])
        else:
            return None
    return sizes


def missing_local_shards(urls: Sequence[str]) -> list[str]:
    """The local shards among `urls` that do not exist."""
    return [u for u in urls if is_local(u) and not os.path.isfile(_local_path(u))]


class _TailTracker:
    """Read-only stream wrapper remembering recent bytes, to check the tar end-of-archive marker.

    tarfile ends silently when a stream breaks off inside a header; a complete archive ends with a
    zero block, so its absence tells a truncated shard from a complete one."""

    _KEEP = 1 << 16

    def __init__(self, raw: Any):
        self.raw = raw
        self._tail = bytearray()
        self._tail_start = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self._tail += data
        if len(self._tail) > 2 * self._KEEP:
            drop = len(self._tail) - self._KEEP
            del self._tail[:drop]
            self._tail_start += drop
        return data

    def zero_block_at(self, offset: int) -> bool:
        i = offset - self._tail_start
        block = self._tail[i:i + tarfile.BLOCKSIZE] if i >= 0 else b""
        return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


def iter_shard(url: str, skips: SkipLog) -> Iterator[dict[str, Any]]:
    """The raw samples of one tar shard, in order.

    Each is a dict member suffix -> bytes plus `__key__`, `__url__` and `__index__` (its position
    in the shard). A shard that cannot be opened counts one `read_error`. A shard that breaks off
    still yields every sample before the break; the sample at the break is yielded with
    `__truncated__` set (it may be complete: `decode` decides)."""
    try:
        raw = gopen(url, "rb")
    except Exception as e:  # gopen raises many types (missing file, bad scheme, failed command)
        skips.skip("read_error", f"shard {url}: cannot open ({e})")
        return
    stream = _TailTracker(gzip.GzipFile(fileobj=raw) if url.endswith(".gz") else raw)
    group: dict[str, Any] | None = None
    index, error = 0, None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
        for info in tar:
            match = _MEMBER.match(info.name)
            if not info.isfile() or match is None:
                continue
            key, suffix = match.groups()
            data = tar.extractfile(info).read()
            if group is not None and group["__key__"] != key:
                yield group
                group, index = None, index + 1
            if group is None:
                group = {"__key__": key, "__url__": url, "__index__": index}
            group[suffix] = data
        if not stream.zero_block_at(tar.offset):
            error = "no end-of-archive marker"
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        try:
            raw.close()
        except Exception as e:  # a `pipe:` command that exits non-zero raises here
            error = error or f"{type(e).__name__}: {e}"
    if error is not None and group is None and index == 0:
        skips.skip("read_error", f"shard {url}: unreadable ({error})")
        return
    if group is not None:
        if error is not None:
            group["__truncated__"] = True
        yield group
    if error is not None:
        skips.note(f"shard {url} breaks off after {index + (group is not None)} samples ({error})")


def _pop_random(buffer: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
    i = rng.randrange(len(buffer))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


class SourceReader:
    """The endless, deterministic raw-sample stream of one source for one reader (rank x worker).

    Shards come in `ShardOrder`; each run of `block_shards` consecutive shards is a block whose raw
    samples pass through a shuffle buffer of `buffer_size` samples (bytes) that drains at the
    block's end. The position is therefore (block, samples emitted in it), two integers; restoring
    it replays the current block without decoding and without counting its faults again."""

    def __init__(self, name: str, urls: Sequence[str], *, seed: int, reader: int, n_readers: int,
                 buffer_size: int, block_shards: int, skips: SkipLog, position: tuple[int, int] = (0, 0)):
        if buffer_size < 1 or block_shards < 1:
            raise ValueError(f"buffer_size and block_shards must be >= 1, got {buffer_size}, {block_shards}")
        self.name, self.urls = name, list(urls)
        self.seed, self.reader = seed, reader
        self.buffer_size, self.block_shards = buffer_size, block_shards
        self.skips = skips
        self.order = ShardOrder(len(self.urls), seed=seed, source=name, reader=reader, n_readers=n_readers)
        self.block, self.emitted = int(position[0]), 0
        self._items = self._block_items(self.block)
        with skips.muted():
            for _ in range(int(position[1])):
                if next(self._items, None) is None:
                    raise DataError("resume", f"source {name}: block {self.block} of reader {reader} has fewer "
                                              f"than {position[1]} samples now; did its shards change since the "
                                              f"data state was saved?")
                self.emitted += 1

    @property
    def position(self) -> tuple[int, int]:
        """(block, samples emitted from it): everything needed to continue exactly here."""
        return self.block, self.emitted

    def _block_items(self, block: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(buffer_seed(self.seed, self.name, self.reader, block))
        buffer: list[dict[str, Any]] = []
        for k in range(block * self.block_shards, (block + 1) * self.block_shards):
            for item in iter_shard(self.urls[self.order.shard(k)], self.skips):
                buffer.append(item)
                if len(buffer) >= self.buffer_size:
                    yield _pop_random(buffer, rng)
        while buffer:
            yield _pop_random(buffer, rng)

    def next(self) -> dict[str, Any]:
        """The next raw sample."""
        empty_blocks = 0
        while True:
            item = next(self._items, None)
            if item is not None:
                self.emitted += 1
                return item
            if self.emitted == 0:
                empty_blocks += 1
                if empty_blocks > 2 * len(self.urls) + 2:
                    raise DataError("empty_source", f"source {self.name}: no readable sample in "
                                                    f"{empty_blocks * self.block_shards} consecutive shards")
            self.block, self.emitted = self.block + 1, 0
            self._items = self._block_items(self.block)


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) outside a worker."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)
