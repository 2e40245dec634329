"""Fail fast: every file a run needs is checked before the model is built (a full-size model takes
minutes and gigabytes to build), so a wrong path costs seconds and reads as one line naming the key.

Checked, in this order: `model.pretrained` (config.json, weights, tokenizer unless `model.tokenizer`
is set), `model.sam_checkpoint`, `model.beit3_checkpoint`, the tokenizer folder and its
`sentencepiece.bpe.model`, and every local shard source of `data.train` / `data.val` (a folder with
its tars and `sizes.json`, or existing files). Remote and `pipe:` shards are not checked. When a
source holds semantic or part data (its `sizes.json` lists such a task), whose expressions start with
`[semantic]`, the tokenizer must read `[semantic]` as one token, id 64002 for the released
vocabulary (the id the published weights learnt it under).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

from braceexpand import braceexpand

from evfsam_lightning.config import ConfigError, RunConfig
from evfsam_lightning.data.shards import SIZES_FILE
from evfsam_lightning.data.stream import _GLOB_CHARS, _local_path, is_local
from evfsam_lightning.data.tokenizer import SEMANTIC_TOKEN, SPM_FILE

#: `[semantic]` in the released BEiT-3/EVF-SAM vocabulary (64010 rows).
SEMANTIC_TOKEN_ID = 64002
RELEASED_VOCAB_SIZE = 64010
#: Tasks whose expressions start with `[semantic] ` (data/sources/common.py).
SEMANTIC_TASKS = ("semantic", "part")


def preflight(cfg: RunConfig) -> None:
    """Raise `ConfigError` naming the key and path of the first missing file the run needs (and the
    keys of any further ones), or a tokenizer that cannot read the data's `[semantic]` prefix."""
    missing = list(_missing(cfg))
    if missing:
        (key, message), rest = missing[0], [k for k, _ in missing[1:]]
        also = f" (also missing: {', '.join(dict.fromkeys(rest))})" if rest else ""
        raise ConfigError(f"{key}: {message}{also}")
    _check_semantic_token(cfg)


def tokenizer_setting(cfg: RunConfig) -> tuple[str, str] | None:
    """(key, folder) of the run's tokenizer; None when the synthetic dataset brings its own."""
    m = cfg.model
    if m.tokenizer:
        return "model.tokenizer", m.tokenizer
    if m.pretrained:
        return "model.pretrained", m.pretrained
    if cfg.data.synthetic is not None:
        return None
    raise ConfigError("no tokenizer: set model.tokenizer or model.pretrained (a folder with sentencepiece.bpe.model)")


def _missing(cfg: RunConfig) -> Iterator[tuple[str, str]]:
    from evfsam_lightning.models import checkpoints as ck

    m = cfg.model
    if m.pretrained:
        try:
            ck.check_reference_folder(m.pretrained, with_tokenizer=not m.tokenizer)
        except ck.CheckpointError as e:
            yield "model.pretrained", str(e)
    if m.sam_checkpoint:
        path = Path(m.sam_checkpoint)
        if not path.exists():
            yield "model.sam_checkpoint", f"{path} not found (SAM's sam_vit_*.pth / sam2_hiera_*.pt, or a " \
                                          "transformers SAM folder)"
        elif path.is_dir():
            try:
                ck._weights_file(path)
            except ck.CheckpointError as e:
                yield "model.sam_checkpoint", str(e)
    if m.beit3_checkpoint and not Path(m.beit3_checkpoint).is_file():
        yield "model.beit3_checkpoint", f"{m.beit3_checkpoint} not found (a BEiT-3 .pth)"
    tokenizer = tokenizer_setting(cfg)
    if tokenizer is not None and not (tokenizer[0] == "model.pretrained" and not Path(tokenizer[1]).is_dir()):
        key, folder = tokenizer
        spm = Path(folder) if Path(folder).name == SPM_FILE else Path(folder) / SPM_FILE
        if not spm.parent.is_dir():
            yield key, f"{spm.parent} not found (a tokenizer folder holding {SPM_FILE})"
        elif not spm.is_file():
            yield key, f"{spm} not found"
    for group, sources in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        for i, src in enumerate(sources):
            for problem in _missing_shards(src.urls, needs_sizes=group == "data.train" and not cfg.data.samples_per_epoch):
                yield f"{group}[{i}] ({src.name})", problem


def _missing_shards(specs: list[str], needs_sizes: bool) -> Iterator[str]:
    """What is missing of one source's local shards: a folder, its tars or its sizes.json, a
    pattern's matches, a file (with `needs_sizes`, the sizes.json beside it)."""
    for spec in specs:
        for url in braceexpand(spec):
            if not is_local(url):
                continue
            path = Path(_local_path(url))
            if path.is_dir():
                if not any(path.glob("*.tar")) and not any(path.glob("*.tar.gz")):
                    yield f"{path} holds no *.tar shard"
                elif not (path / SIZES_FILE).is_file():
                    yield f"{path / SIZES_FILE} not found (evfsam-shards writes it with the shards)"
            elif _GLOB_CHARS.search(str(path)):
                if not glob.glob(str(path)):
                    yield f"{path} matches no shard"
            elif not path.is_file():
                yield f"{path} not found" + (" (a shard folder, file or pattern)" if not path.suffix else "")
            elif needs_sizes and not (path.parent / SIZES_FILE).is_file():
                yield f"{path.parent / SIZES_FILE} not found (or set data.samples_per_epoch)"


def _source_tasks(specs: list[str]) -> set[str]:
    """The tasks a source's local shard folders declare in their sizes.json."""
    tasks: set[str] = set()
    for spec in specs:
        for url in braceexpand(spec):
            path = Path(_local_path(url)) if is_local(url) else None
            sizes = None if path is None else (path if path.is_dir() else path.parent) / SIZES_FILE
            if sizes is None or not sizes.is_file():
                continue
            try:
                declared = json.loads(sizes.read_text()).get("task")
            except (ValueError, AttributeError):
                continue
            tasks.update([declared] if isinstance(declared, str) else declared or [])
    return tasks


def _check_semantic_token(cfg: RunConfig) -> None:
    tokenizer = tokenizer_setting(cfg)
    sources = [s for s in (*cfg.data.train, *cfg.data.val) if _source_tasks(s.urls) & set(SEMANTIC_TASKS)]
    if tokenizer is None or not sources:
        return
    from evfsam_lightning.data.collate import cached_tokenizer
    from evfsam_lightning.models.from_config import model_size

    key, folder = tokenizer
    ids = cached_tokenizer(str(folder))(SEMANTIC_TOKEN, add_special_tokens=False)["input_ids"]
    vocab = model_size(cfg.model).beit3.vocab_size
    where = f"{key}: the tokenizer in {folder}"
    users = f"source {sources[0].name!r} holds semantic/part data, whose expressions start with {SEMANTIC_TOKEN}"
    if len(ids) != 1:
        raise ConfigError(f"{where} splits {SEMANTIC_TOKEN} into {len(ids)} tokens {ids}; {users} (the released "
                          f"tokenizer's added_tokens.json maps it to {SEMANTIC_TOKEN_ID})")
    if vocab == RELEASED_VOCAB_SIZE and ids[0] != SEMANTIC_TOKEN_ID:
        raise ConfigError(f"{where} maps {SEMANTIC_TOKEN} to id {ids[0]}, the released weights learnt it as "
                          f"{SEMANTIC_TOKEN_ID}; {users}")
    if ids[0] >= vocab:
        raise ConfigError(f"{where} maps {SEMANTIC_TOKEN} to id {ids[0]}, beyond the model's {vocab} text "
                          f"embeddings; {users}")
