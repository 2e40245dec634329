"""The local SLURM harness runs real jobs: srun task layout, two emulated nodes, signal + requeue,
and Lightning DDP detecting SLURMEnvironment. About a minute in all (see docs/slurm_testing.md)."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

PY = sys.executable

# Each srun task writes what SLURM told it; the file name is its global rank.
TASK_INFO = """\
import json, os, sys
keys = ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODEID", "SLURM_LOCALID", "SLURMD_NODENAME", "SLURM_JOB_ID"]
info = {k: os.environ.get(k) for k in keys}
with open(os.path.join(sys.argv[1], f"task-{info['SLURM_PROCID']}.json"), "w") as f:
    json.dump(info, f)
"""

# First run: announce readiness, wait for USR1 (handled in Python), requeue itself and exit.
# Second run (SLURM_RESTART_COUNT=1): record the restart and finish.
REQUEUE_ON_USR1 = """\
import os, signal, subprocess, sys, time
out = sys.argv[1]
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
open(os.path.join(out, f"run-{restart}"), "w").write(os.environ["SLURM_JOB_ID"])
if restart > 0:
    sys.exit(0)
received = []
signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
open(os.path.join(out, "ready"), "w").close()
deadline = time.monotonic() + 60
while not received:
    if time.monotonic() > deadline:
        sys.exit("no USR1 within 60 s")
    time.sleep(0.05)
open(os.path.join(out, "usr1"), "w").close()
subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
sys.exit(0)
"""

# A tiny DDP fit under srun: each rank records what Lightning and torch.distributed saw.
LIGHTNING_DDP = """\
import json, os, sys
import torch
import torch.distributed as dist
import lightning as L
from torch.utils.data import DataLoader, TensorDataset

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)
    def on_train_start(self):
        self.dist_world_size = dist.get_world_size()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

torch.manual_seed(0)
data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
model = Tiny()
trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=1, strategy="ddp", max_steps=4,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=sys.argv[1])
trainer.fit(model, DataLoader(data, batch_size=8))
info = {
    "environment": type(trainer.strategy.cluster_environment).__name__,
    "world_size": trainer.world_size,
    "dist_world_size": model.dist_world_size,
    "global_rank": trainer.global_rank,
    "local_rank": trainer.local_rank,
    "node_rank": trainer.node_rank,
    "weight": model.layer.weight.detach().flatten().tolist(),
}
with open(os.path.join(sys.argv[1], f"rank-{trainer.global_rank}.json"), "w") as f:
    json.dump(info, f)
"""


def _batch_script(directives: str, command: str, out: Path) -> str:
    return f"#!/bin/bash\n{directives}\n#SBATCH --output={out}/slurm-%j.out\nset -e\n{command}\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _read_json(out: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(pattern))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_file(path: Path, cluster: LocalSlurmCluster, job: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = cluster.job_state(job)
        assert state in ("PENDING", "RUNNING"), f"job {job} is {state}:\n{cluster.output(job)}"
        assert time.monotonic() < deadline, f"{path.name} not written in {timeout} s:\n{cluster.output(job)}"
        time.sleep(0.1)


def test_one_node_two_tasks(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    worker = _write(tmp_path / "task_info.py", TASK_INFO)
    job = slurm_cluster.submit(
        _batch_script("#SBATCH --ntasks-per-node=2", f"srun {PY} {worker} {tmp_path}", tmp_path)
    )
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED", slurm_cluster.output(job)
    tasks = _read_json(tmp_path, "task-*.json")
    assert sorted(int(t["SLURM_PROCID"]) for t in tasks) == [0, 1]
    assert {t["SLURM_NTASKS"] for t in tasks} == {"2"}
    assert {t["SLURM_NODEID"] for t in tasks} == {"0"}
    assert {t["SLURM_JOB_ID"] for t in tasks} == {job}


def test_signal_then_requeue_runs_again(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    worker = _write(tmp_path / "requeue_on_usr1.py", REQUEUE_ON_USR1)
    directives = (
        "#SBATCH --ntasks-per-node=1\n#SBATCH --requeue\n#SBATCH --signal=USR1@90\n#SBATCH --open-mode=append"
    )
    job = slurm_cluster.submit(_batch_script(directives, f"srun {PY} {worker} {tmp_path}", tmp_path))
    _wait_for_file(tmp_path / "ready", slurm_cluster, job)
    slurm_cluster.signal(job, "USR1")
    slurm_cluster.requeue_now(job)
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED", slurm_cluster.output(job)
    assert (tmp_path / "usr1").exists(), "the task did not see USR1"
    assert (tmp_path / "run-0").read_text() == job
    assert (tmp_path / "run-1").read_text() == job, "no second run with SLURM_RESTART_COUNT=1"
    assert slurm_cluster.job_info(job)["Restarts"] == "1"


def test_lightning_ddp_detects_slurm(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    worker = _write(tmp_path / "ddp.py", LIGHTNING_DDP)
    command = (
        f"export MASTER_ADDR=127.0.0.1 MASTER_PORT={_free_port()} OMP_NUM_THREADS=1\n"
        f"srun {PY} {worker} {tmp_path}"
    )
    job = slurm_cluster.submit(_batch_script("#SBATCH --ntasks-per-node=2", command, tmp_path))
    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED", slurm_cluster.output(job)
    ranks = _read_json(tmp_path, "rank-*.json")
    assert [r["global_rank"] for r in ranks] == [0, 1], slurm_cluster.output(job)
    assert {r["environment"] for r in ranks} == {"SLURMEnvironment"}
    assert {(r["world_size"], r["dist_world_size"]) for r in ranks} == {(2, 2)}
    assert sorted(r["local_rank"] for r in ranks) == [0, 1]
    assert {r["node_rank"] for r in ranks} == {0}
    # Different data on each rank, same weights after DDP's gradient all-reduce.
    assert ranks[0]["weight"] == ranks[1]["weight"]


def test_two_nodes_four_tasks(slurm_cluster_2nodes: LocalSlurmCluster, tmp_path: Path) -> None:
    worker = _write(tmp_path / "task_info.py", TASK_INFO)
    job = slurm_cluster_2nodes.submit(
        _batch_script(
            "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2", f"srun {PY} {worker} {tmp_path}", tmp_path
        )
    )
    assert slurm_cluster_2nodes.wait(job, timeout=60) == "COMPLETED", slurm_cluster_2nodes.output(job)
    tasks = _read_json(tmp_path, "task-*.json")
    assert sorted(int(t["SLURM_PROCID"]) for t in tasks) == [0, 1, 2, 3]
    assert {t["SLURM_NTASKS"] for t in tasks} == {"4"}
    assert sorted(t["SLURM_NODEID"] for t in tasks) == ["0", "0", "1", "1"]
    assert {t["SLURMD_NODENAME"] for t in tasks} == set(slurm_cluster_2nodes.node_names)
    by_node = {t["SLURMD_NODENAME"]: t["SLURM_NODEID"] for t in tasks}
    assert sorted(by_node.values()) == ["0", "1"], "each emulated node gets its own node id"
