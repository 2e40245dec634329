"""A rank whose validation or evaluation batch is empty (all its samples skipped) neither crashes nor
leaves the other rank waiting: real 2-rank DDP runs of evfsam-train and evfsam-eval."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.data.conftest import write_shard
from tests.training.conftest import clean_env, small_run, train_command


def _half_bad_val(synthetic_dir: Path, folder: Path) -> Path:
    """A 4-image validation shard (with sizes.json) whose last two records have broken JSON: with
    2 ranks and 2 images per eval batch, rank 1's only batch loses both samples."""
    src = sorted((synthetic_dir / "val").glob("*.tar"))[0]
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(src) as tar:
        for m in tar:
            key, _, suffix = m.name.partition(".")
            if key not in members and len(members) == 4:
                break
            members.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    assert len(members) == 4
    for key in list(members)[2:]:
        members[key]["json"] = b'{"version": 1, "key": '
    folder.mkdir(parents=True)
    write_shard(folder / "val-000000.tar", [{"__key__": k, **parts} for k, parts in members.items()])
    (folder / "sizes.json").write_text(json.dumps({"val-000000.tar": 4}))
    return folder


@pytest.mark.slow
@pytest.mark.distributed
def test_an_empty_validation_batch_on_rank_1_of_2_finishes(synthetic_dir, tmp_path):
    val = _half_bad_val(synthetic_dir, tmp_path / "half_bad")
    overrides = small_run(
        synthetic_dir, f"root_dir={tmp_path / 'runs'}", "name=empty_val", "trainer.devices=2", "strategy.name=ddp",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=2",
        "trainer.val_every_n_steps=2", "data.val_batch_size=2", "logging.tensorboard=false",
        f"data.val=[{{name: half_bad, urls: [{val}]}}]")
    train = subprocess.run(train_command(*overrides), cwd=tmp_path, env=clean_env(), capture_output=True,
                           text=True, timeout=400)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-6000:]
    assert "finished at step 2" in train.stdout
    # Only rank 0's two images count: the metric was not fed anything by rank 1.
    assert "val/ciou" in train.stdout

    # Evaluation of the result on the same split, on 2 ranks: rank 1's batch is empty there too.
    out = tmp_path / "results.json"
    evaluate = subprocess.run(
        [sys.executable, "-m", "evfsam_lightning.cli.evaluate", "--checkpoint", str(tmp_path / "runs" / "empty_val"),
         "--data", f"half_bad={val}", "--devices", "2", "--accelerator", "cpu", "--batch-size", "2",
         "--workers", "0", "--out", str(out)],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-6000:]
    results = json.loads(out.read_text())
    # Rank 0's two images, one expression per object: some expressions were scored, from rank 0 only.
    assert results["splits"]["half_bad"]["expressions"] > 0
