"""Checkpoints are complete or invisible, and resuming after a hard kill is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from evfsam_lightning.training.callbacks import (
    LAST_POINTER,
    find_resume_checkpoint,
    marker_of,
    remove_checkpoint,
)
from tests.training.conftest import (  # noqa: F401
    clean_env,
    finish_training,
    run_training,
    small_run,
    start_training,
    synthetic_dir,
    train_command,
)


def _mark(path: Path, step: int) -> None:
    path.write_bytes(b"x")
    marker_of(path).write_text(json.dumps({"step": step}))


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    _mark(tmp_path / "step-00000010.ckpt", 10)
    _mark(tmp_path / "step-00000020.ckpt", 20)
    (tmp_path / "step-00000030.ckpt").write_bytes(b"half written")  # no marker
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step-00000020.ckpt"
    (tmp_path / LAST_POINTER).write_text(json.dumps({"checkpoint": "step-00000030.ckpt"}))
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step-00000020.ckpt"  # pointer to incomplete: ignored
    (tmp_path / LAST_POINTER).write_text(json.dumps({"checkpoint": "step-00000010.ckpt"}))
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step-00000010.ckpt"
    remove_checkpoint(tmp_path / "step-00000010.ckpt")
    assert not marker_of(tmp_path / "step-00000010.ckpt").exists()
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step-00000020.ckpt"
    assert find_resume_checkpoint(tmp_path / "missing") is None


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt_dir = run_dir / "checkpoints"
    newest = find_resume_checkpoint(ckpt_dir)
    state = torch.load(newest, map_location="cpu", weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("model.")}, state["global_step"]


def _kill_after_first_checkpoint(cwd: Path, overrides: tuple[str, ...], delay: float) -> None:
    proc = subprocess.Popen(train_command(*overrides), cwd=cwd, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        ckpt_dir = cwd / "runs" / "quickstart" / "checkpoints"
        while time.time() < deadline and proc.poll() is None:
            if any(ckpt_dir.glob("*.complete")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(delay)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: DDP ranks and loader workers too
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("ranks,workers", [(1, 0), (2, 2)], ids=["single", "ddp2x2workers"])
def test_sigkill_then_same_command_ends_with_identical_weights(tmp_path, synthetic_dir, ranks, workers,  # noqa: F811
                                                              monkeypatch):
    # One thread per process: the reference run goes beside the killed one, and two OpenMP pools
    # on 2 cores spin against each other (every run of the comparison uses the same setting).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = small_run(synthetic_dir, "trainer.max_steps=16", "checkpoint.every_n_steps=4",
                          f"trainer.devices={ranks}", f"data.num_workers={workers}",
                          "trainer.global_batch_size=4", f"trainer.micro_batch_size={4 // ranks}")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    straight_job = start_training(straight, *overrides)  # beside the killed run
    try:
        _kill_after_first_checkpoint(killed, overrides, delay=1.5)
        resumed = run_training(killed, *overrides)
        finish_training(straight_job)
    finally:
        if straight_job.poll() is None:
            straight_job.kill()
    assert "resuming from" in resumed.stdout
    a, step_a = _final_weights(straight / "runs" / "quickstart")
    b, step_b = _final_weights(killed / "runs" / "quickstart")
    assert step_a == step_b == 16
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
