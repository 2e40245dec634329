"""A rank whose peer dies says which rank (host, pid) went away, in one line (issue 17, item 8)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.training.conftest import clean_env, small_run, train_command


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_the_survivor_names_the_rank_that_went_away(synthetic_dir, tmp_path):
    command = train_command(*small_run(synthetic_dir, "trainer.accelerator=cpu", "trainer.devices=2",
                                       "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
                                       "trainer.max_steps=100000", "checkpoint.every_n_steps=2",
                                       "logging.tensorboard=false", "strategy.name=ddp"))
    job = subprocess.Popen(command, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("runs/*/checkpoints/step-*")):  # training is under way on both ranks
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-4000:]
            time.sleep(0.5)
        (rank1,) = _children(job.pid)  # Lightning's launcher starts rank 1 as the child of rank 0
        os.kill(rank1, signal.SIGKILL)
        _, err = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    lines = [line for line in err.splitlines() if line.startswith("evfsam-train: error:")]
    assert job.returncode == 1, err[-4000:]
    assert lines == [f"evfsam-train: error: rank 0 on {socket.gethostname()} lost its peers: rank 1 "
                     f"(host {socket.gethostname()}, pid {rank1}) went away (see that rank's log for why; "
                     "re-run to resume)"], err[-4000:]
    assert "Traceback" not in err, err[-4000:]
