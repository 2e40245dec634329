"""Precomputed SAM image features for training with a frozen image encoder.

`evfsam-cache-embeddings` runs the frozen encoder once over every training shard and writes, per
source and shard, safetensors files of bf16 features named `<sample key>/<feature>` (SAM-1:
`image_embeddings`; SAM-2: `image_embeddings`, `high_res_feat_s0`, `high_res_feat_s1`, the dict
that `visual_model.encode_image` returns), next to a manifest that records what they depend on:

    <cache>/manifest.json                 version, encoder fingerprint, preprocessing, feature names,
                                          per source: shard URLs (in recipe order), sample counts and
                                          byte sizes of the local shard files
    <cache>/<source>/<shard:06d>.json     {"parts": [file, ...], "keys": {sample key: part index}}
    <cache>/<source>/<shard:06d>-<part:03d>.safetensors

Training reads them in the data workers (`EmbeddingCache.features`), so batches carry
`image_features` instead of the SAM image, and the module skips the encoder. The cache is only
valid for the same encoder weights, the same preprocessing and the same shards: `check_manifest`
compares them and names what differs (a shard rewritten by a new conversion has another size).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD

MANIFEST = "manifest.json"
CACHE_VERSION = 1
#: samples per safetensors file (SAM-1: about 2 MB each in bf16; SAM-2: about 8 MB)
SAMPLES_PER_FILE = 256


class EmbeddingCacheError(ValueError):
    """A cache that does not fit the run; the message names what differs."""


def preprocessing_fingerprint(sam_variant: str, sam_image_size: int) -> dict[str, Any]:
    """Everything of the SAM preprocessing that the cached features depend on."""
    resize = "pillow-bilinear-longest-side-zero-pad" if sam_variant == "sam" else "torch-bilinear-uint8-square"
    return {"sam_variant": sam_variant, "sam_image_size": int(sam_image_size), "resize": resize,
            "pixel_mean": list(SAM_PIXEL_MEAN), "pixel_std": list(SAM_PIXEL_STD)}


def encoder_fingerprint(visual_model: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every tensor that the SAM backbone's
    `encode_image` reads (`visual_model.image_feature_state()`)."""
    h = hashlib.sha256()
    for name, tensor in sorted(visual_model.image_feature_state().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise EmbeddingCacheError(f"embedding cache {root}: no {MANIFEST}; build it with "
                                  f"`evfsam-cache-embeddings RECIPE --out {root}` (the training recipe)")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != CACHE_VERSION:
        raise EmbeddingCacheError(f"embedding cache {root}: version {manifest.get('version')!r}, "
                                  f"this code reads version {CACHE_VERSION}; rebuild it")
    return manifest


def check_manifest(manifest: Mapping[str, Any], *, preprocessing: Mapping[str, Any] | None = None,
                   encoder: str | None = None, sources: Mapping[str, Sequence[str]] | None = None,
                   root: str | Path = "") -> None:
    """Raise `EmbeddingCacheError` naming every difference between the cache and the run: the
    preprocessing settings, the encoder fingerprint, or a training source's shard list."""
    diffs = []
    if preprocessing is not None:
        saved = manifest["preprocessing"]
        diffs += [f"preprocessing.{k}: cache {saved.get(k)!r}, run {v!r}" for k, v in preprocessing.items()
                  if saved.get(k) != v]
    if encoder is not None and manifest["encoder_fingerprint"] != encoder:
        diffs.append(f"image-encoder fingerprint: cache {manifest['encoder_fingerprint'][:16]}..., run "
                     f"{encoder[:16]}... (other SAM weights than the cache was built with)")
    for name, urls in (sources or {}).items():
        saved = manifest["sources"].get(name)
        if saved is None:
            diffs.append(f"training source {name!r}: not in the cache (it has {sorted(manifest['sources'])})")
        elif list(saved["urls"]) != list(urls):
            diffs.append(f"training source {name!r}: its shards differ from the cached ones "
                         f"({len(urls)} now, {len(saved['urls'])} cached)")
        else:
            for url, cached, now in zip(urls, saved.get("bytes", [None] * len(urls)), shard_sizes(urls),
                                        strict=True):
                if cached is not None and now is not None and cached != now:
                    diffs.append(f"shard {url} of {name!r} changed since the cache was built "
                                 f"({cached} bytes cached, {now} now)")
    if diffs:
        raise EmbeddingCacheError(f"embedding cache {root} does not fit this run: " + "; ".join(diffs)
                                  + ". Rebuild it with evfsam-cache-embeddings for this recipe.")


def shard_sizes(urls: Sequence[str]) -> list[int | None]:
    """Byte size of each local shard file (None for a remote or piped URL): what the manifest
    records so that a cache is refused once its shards have been rewritten."""
    return [Path(u).stat().st_size if Path(u).is_file() else None for u in urls]


def shard_stem(shard: int) -> str:
    return f"{shard:06d}"


class ShardWriter:
    """Writes the features of one shard's samples, in order, into parts of `SAMPLES_PER_FILE`."""

    def __init__(self, folder: Path, shard: int, samples_per_file: int = SAMPLES_PER_FILE):
        self.folder, self.stem, self.per_file = folder, shard_stem(shard), samples_per_file
        self.parts: list[str] = []
        self.keys: dict[str, int] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._count = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, features: Mapping[str, torch.Tensor]) -> None:
        if key in self.keys:
            raise EmbeddingCacheError(f"sample key {key!r} appears twice in shard {self.stem}")
        for name, t in features.items():
            self._pending[f"{key}/{name}"] = t.to("cpu", torch.bfloat16).contiguous()
        self.keys[key] = len(self.parts)
        self._count += 1
        if self._count == self.per_file:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self._count:
            name = f"{self.stem}-{len(self.parts):03d}.safetensors"
            save_file(self._pending, str(self.folder / name))
            self.parts.append(name)
            self._pending, self._count = {}, 0

    def close(self) -> int:
        """Write the last part and the shard's index; returns the number of samples."""
        self._flush()
        index = {"parts": self.parts, "keys": self.keys}
        (self.folder / f"{self.stem}.json").write_text(json.dumps(index))
        return len(self.keys)


class EmbeddingCache:
    """Reads cached features by (training source, shard URL, sample key) in the data workers.
    Built in the main process (checks the manifest against the run's sources); file handles open
    lazily in each worker."""

    def __init__(self, root: str | Path, sources: Mapping[str, Sequence[str]],
                 preprocessing: Mapping[str, Any] | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        check_manifest(self.manifest, preprocessing=preprocessing, sources=sources, root=self.root)
        self.feature_names = list(self.manifest["features"])
        self._shard_of = {(name, url): i for name, urls in sources.items() for i, url in enumerate(urls)}
        self._indexes: dict[tuple[str, int], dict[str, Any]] = {}
        self._files: dict[Path, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_indexes": {}, "_files": {}}  # handles do not cross processes

    def features(self, source: str, url: str, key: str) -> dict[str, torch.Tensor]:
        """The cached features of one sample, bf16 tensors without batch dimension."""
        from safetensors import safe_open

        shard = self._shard_of[(source, url)]
        index = self._indexes.get((source, shard))
        if index is None:
            path = self.root / source / f"{shard_stem(shard)}.json"
            if not path.is_file():
                raise EmbeddingCacheError(f"embedding cache {self.root}: no index {path} for shard {url}")
            index = self._indexes[(source, shard)] = json.loads(path.read_text())
        part = index["keys"].get(key)
        if part is None:
            raise EmbeddingCacheError(f"embedding cache {self.root}: sample {key!r} of shard {url} (source "
                                      f"{source!r}) is not cached; the shard changed, rebuild the cache")
        path = self.root / source / index["parts"][part]
        handle = self._files.get(path)
        if handle is None:
            if len(self._files) >= 8:  # a worker reads few files at a time; keep descriptors bounded
                self._files.pop(next(iter(self._files)))
            handle = self._files[path] = safe_open(str(path), framework="pt")
        return {name: handle.get_tensor(f"{key}/{name}") for name in self.feature_names}


def check_model(model: torch.nn.Module, root: str | Path) -> None:
    """Refuse a cache for an EVF-SAM model that trains any tensor `encode_image` reads, or whose
    encoder weights or preprocessing differ from the cache's (the message names what differs)."""
    vm = model.visual_model
    trained = [n for n, p in vm.named_parameters() if p.requires_grad and n.startswith(vm.image_feature_prefixes)]
    if trained:
        raise EmbeddingCacheError(f"embedding cache {root}: visual_model.{trained[0]} trains ({len(trained)} "
                                  "such tensors), so cached image features would be stale")
    check_manifest(read_manifest(root), preprocessing=preprocessing_fingerprint(vm.family, vm.image_size),
                   encoder=encoder_fingerprint(vm), root=root)
