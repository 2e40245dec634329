"""The quickstart's synthetic dataset (`data.synthetic`): generated once on first use, atomically,
with its tokenizer trained on the generated expressions."""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

from evfsam_lightning.config import ConfigError, RunConfig
from evfsam_lightning.training.callbacks import atomic_write_text


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _expressions_in_shards(folder: Path) -> list[str]:
    """Every expression of the JSON records of a shard folder (read with the stream's shard reader;
    images are not decoded). A damaged shard raises: the folder was just written."""
    from evfsam_lightning.data.skips import SkipLog
    from evfsam_lightning.data.stream import iter_shard

    out = []
    for tar in sorted(folder.glob("*.tar")):
        for sample in iter_shard(str(tar), SkipLog(strict=True)):
            record = json.loads(sample["json"])
            out.extend(e for o in record["objects"] for e in o["expressions"])
    return out


_SYNTHETIC_ENTRIES = {"train", "val", "tokenizer", "report.json", "READY.json"}


def ensure_synthetic(cfg: RunConfig) -> tuple[Path, Path]:
    """Generate the synthetic dataset and its tokenizer once (any rank may get here first; a file
    lock makes the others wait). Generation is atomic: it fills a temporary folder beside the
    destination and renames it into place, so a failed or killed generation leaves no partial
    dataset; a partial one from before (no READY.json) is replaced. Returns (shard root, tokenizer)."""
    import shutil

    from evfsam_lightning.data.sources.synthetic import VOCABULARY, generate_synthetic
    from evfsam_lightning.data.tokenizer import build_tokenizer

    syn = cfg.data.synthetic
    root = Path(syn.dir)
    done = root / "READY.json"
    with _file_lock(root.parent / f".{root.name}.lock"):
        # The vocabulary too: a dataset from before its negatives took every form is regenerated.
        wanted = {"train": syn.train, "val": syn.val, "seed": syn.seed, "grammar": syn.grammar,
                  "image_size": syn.image_size, "vocabulary": VOCABULARY}
        if done.is_file() and json.loads(done.read_text()) == wanted:
            return root, root / "tokenizer"
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # of a killed generation (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if root.exists() and (not root.is_dir() or not {p.name for p in root.iterdir()} <= _SYNTHETIC_ENTRIES):
            raise ConfigError(f"data.synthetic.dir={syn.dir!r} exists and is not a synthetic dataset (it holds other "
                              "files): choose another folder")
        if root.exists():
            state = "an older" if done.is_file() else "a partial (interrupted)"
            print(f"replacing {state} synthetic dataset in {root}")
        print(f"generating the synthetic dataset in {root} ({syn.train} train / {syn.val} val images) ...")
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        try:
            generate_synthetic(tmp, n_train=syn.train, n_val=syn.val, image_size=syn.image_size, seed=syn.seed,
                               grammar=syn.grammar, workers=min(2, os.cpu_count() or 1), overwrite=True)
            build_tokenizer(_expressions_in_shards(tmp / "train"), tmp / "tokenizer", vocab_size=128)
            atomic_write_text(tmp / "READY.json", json.dumps(wanted))
            if root.exists():  # the old dataset goes aside first: a rename cannot replace a folder
                old = root.parent / f".{root.name}.tmp-{os.getpid()}-old"
                os.replace(root, old)
                os.replace(tmp, root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root, root / "tokenizer"
