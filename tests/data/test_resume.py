"""Exact resume: the batches consumed after restoring a mid-epoch data state equal those of the
uninterrupted run, step for step (simulated ranks with real DataLoader workers, and real DDP)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evfsam_lightning.data.datamodule import EvfDataModule
from tests.data.conftest import consume, data_settings


def _view(batches: list[dict]) -> list[tuple]:
    return [(b["keys"], b["expressions"], b["sam_pixel_values"].sum().item()) for b in batches]


def _checkpoint_round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save({"EvfDataModule": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["EvfDataModule"]


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_mid_epoch_replays_the_uninterrupted_stream_two_ranks_two_workers(three_sources, tokenizer_dir, rank):
    root, _ = three_sources

    def module():
        return EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=2), rank=rank, world_size=2)

    total = 14
    full = module()
    assert full.batches_per_epoch == 6  # 24 samples / (2 images x 2 ranks): the run crosses 2 epochs
    reference = _view(consume(full, total))
    for step in (3, 8):  # mid-epoch, and mid-epoch after an epoch boundary (odd: worker order rotates)
        first = module()
        assert _view(consume(first, step)) == reference[:step]
        resumed = module()
        resumed.load_state_dict(_checkpoint_round_trip(first.state_dict()))
        assert _view(consume(resumed, total - step)) == reference[step:], f"resume after step {step}"
        assert resumed.data_stats_total["images"] == 2 * total


def test_stopping_and_restarting_the_loader_loses_no_prefetched_batch(three_sources, tokenizer_dir):
    root, _ = three_sources
    reference = _view(consume(EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=2)), 9))
    dm = EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=2))
    pieces = [consume(dm, n) for n in (1, 2, 1, 5)]  # each call abandons workers that prefetched ahead
    assert _view([b for p in pieces for b in p]) == reference


def test_num_workers_zero_and_one_are_the_same_stream(three_sources, tokenizer_dir):
    root, _ = three_sources
    zero = EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=0))
    reference = _view(consume(zero, 7))
    one = EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=0))
    consume(one, 4)
    other = EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=1))
    other.load_state_dict(one.state_dict())
    assert _view(consume(other, 3)) == reference[4:]


def test_changed_topology_fails_with_a_clear_message(three_sources, tokenizer_dir):
    root, _ = three_sources
    dm = EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=2), rank=1, world_size=2)
    consume(dm, 3)
    state = dm.state_dict()
    with pytest.raises(ValueError, match=r"workers: saved 2, now 3.*resume with the saved values"):
        EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=3), rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"world_size: saved 2, now 4"):
        EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=2, samples_per_epoch=48), rank=1,
                      world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"holds ranks \['1'\], not rank 0"):
        EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=2), rank=0, world_size=2).load_state_dict(state)


def test_a_batch_consumed_out_of_order_is_refused(three_sources, tokenizer_dir):
    root, _ = three_sources
    dm = EvfDataModule(*data_settings(tokenizer_dir, root, num_workers=0))
    batches = list(zip(range(2), iter(dm.train_dataloader()), strict=False))
    with pytest.raises(RuntimeError, match="batch 1 of rank 0 was consumed where batch 0"):
        dm.on_before_batch_transfer(batches[1][1], 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_job(args: list[str], tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")]))
    job = subprocess.run([sys.executable, str(Path(__file__).with_name("ddp_resume_job.py")), *args],
                         env=env, cwd=tmp, capture_output=True, text=True, timeout=240)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_real_ddp_resume_consumes_the_same_keys(three_sources, tokenizer_dir, tmp_path):
    root, _ = three_sources
    data = ["--tokenizer", tokenizer_dir, "--shards", str(root)]  # the job builds data_settings(..., num_workers=2)
    # 6 batches per epoch and rank; the checkpoint after step 4 is mid-epoch, the run ends in epoch 2.
    _run_job([*data, "--out", str(tmp_path / "full"), "--max-steps", "9", "--save-every", "4"],
             tmp_path)
    ckpt = tmp_path / "full" / "ckpt" / "step=4.ckpt"
    assert ckpt.is_file(), sorted(os.listdir(tmp_path / "full" / "ckpt"))
    _run_job([*data, "--out", str(tmp_path / "resumed"), "--max-steps", "9",
              "--ckpt", str(ckpt)], tmp_path)
    for rank in (0, 1):
        full = json.loads((tmp_path / "full" / f"rank{rank}.json").read_text())
        resumed = json.loads((tmp_path / "resumed" / f"rank{rank}.json").read_text())
        assert [s for s, _ in full] == list(range(9)) and [s for s, _ in resumed] == list(range(4, 9))
        assert resumed == full[4:], f"rank {rank}"
    ranks = [json.loads((tmp_path / "full" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] != ranks[1]
