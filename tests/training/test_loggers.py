"""logging.loggers: TensorBoard, CSV, MLflow and W&B (offline) through Lightning's own loggers, each read
back from its own files; a resumed run continues the same MLflow run and W&B run id."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from evfsam_lightning.config import ConfigError, load
from tests.training.conftest import QUICKSTART, clean_env, small_run, synthetic_dir, train_command  # noqa: F401


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B `.wandb` transaction log: a ':W&B' header, then 32 KiB blocks of
    LevelDB-log records (crc32, length, type; FULL/FIRST/MIDDLE/LAST), each a wandb `Record` proto."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    block, pos, payload, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def _train(cwd: Path, synthetic: Path, steps: int) -> subprocess.CompletedProcess:
    env = {**clean_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    overrides = small_run(synthetic, f"trainer.max_steps={steps}", "checkpoint.every_n_steps=3",
                          "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=3", "trainer.limit_val_batches=1",
                          "logging.val_images=2", "logging.loggers=[tensorboard,csv,mlflow,wandb]")
    result = subprocess.run(train_command(*overrides), cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.slow
def test_train_loss_reaches_all_four_loggers_and_resume_continues_their_runs(tmp_path, synthetic_dir):  # noqa: F811
    _train(tmp_path, synthetic_dir, 3)
    run = tmp_path / "runs" / "quickstart"
    ids = json.loads((run / "loggers.json").read_text())
    result = _train(tmp_path, synthetic_dir, 6)
    assert "resuming from" in result.stdout
    assert json.loads((run / "loggers.json").read_text()) == ids

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert {e.step for e in acc.Scalars("train/loss")} >= {2, 5}
    assert any(tag.startswith("val_masks/") for tag in acc.Tags()["images"])

    rows = [row for f in sorted((run / "csv").glob("version_*/metrics.csv")) for row in csv.DictReader(f.open())]
    assert {int(r["step"]) for r in rows if r.get("train/loss")} >= {2, 5}

    # One MLflow run (the resumed start continued it) holding every step, in <run dir>/mlruns.
    runs = [p for p in (run / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    assert [p.name for p in runs] == [ids["mlflow"]["run_id"]]
    lines = (runs[0] / "metrics" / "train" / "loss").read_text().split()
    steps = {int(lines[i + 2]) for i in range(0, len(lines), 3)}  # "timestamp value step" per line
    assert steps >= {2, 5}
    assert list((runs[0] / "artifacts").rglob("*.png")), "validation images in MLflow"

    # W&B offline: two starts under <run dir>/wandb with the same run id, train/loss in their logs.
    starts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(p.name.endswith(f"-{ids['wandb']}") for p in starts), starts
    logged = [row for start in starts for row in wandb_history(next(start.glob("run-*.wandb")))]
    assert {row["trainer/global_step"] for row in logged if "train/loss" in row} >= {2, 5}
    assert any(row.get("val_masks/_type") == "images/separated" for row in logged), "validation images in W&B"
    assert list((starts[0] / "files" / "media" / "images").glob("val_masks_*.png"))


def test_loggers_are_validated_naming_the_extra():
    with pytest.raises(ConfigError, match="unknown logger 'neptune'"):
        load(QUICKSTART, ["logging.loggers=[tensorboard,neptune]"])
    with pytest.raises(ConfigError, match="twice"):
        load(QUICKSTART, ["logging.loggers=[csv,csv]"])
    code = ("import sys; sys.modules['wandb'] = None\n"  # how Python marks a package as absent
            "from evfsam_lightning.config import load\n"
            f"load({str(QUICKSTART)!r}, ['logging.loggers=[wandb]'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert 'pip install "evfsam-lightning[wandb]"' in result.stderr, result.stderr[-2000:]
