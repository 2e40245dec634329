"""`evfsam-slurm submit` against a real local SLURM cluster: a 2-node x 2-task job, preemption by
`scancel --signal` and by the time limit (requeue, resume, same weights as without interruption),
DeepSpeed ZeRO-2 preemption; the same preemption without SLURM; the rendered script of a 4 x 8 GPU
job. The quickstart recipe runs with a tiny synthetic dataset on CPU (gloo)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evfsam_lightning.cli.slurm import Job, LaunchError, render_batch_script, slurm_time_seconds
from evfsam_lightning.training.signals import EXIT_PREEMPTED
from tests.slurm.cluster import TERMINAL_STATES, LocalSlurmCluster

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
REFCOCO = REPO / "recipes" / "evfsam_refcoco.yaml"



def slurm_job(test):
    """Marks of a test that runs jobs on the local cluster (its fixtures skip without slurm or root)."""
    for mark in (pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed):
        test = mark(test)
    return test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's synthetic dataset, small (64 train / 16 val images), generated once."""
    from evfsam_lightning.config import load
    from evfsam_lightning.training.synthetic import ensure_synthetic

    folder = tmp_path_factory.mktemp("synthetic") / "data"
    ensure_synthetic(load(QUICKSTART, [f"data.synthetic.dir={folder}", "data.synthetic.train=64",
                                       "data.synthetic.val=16"]))
    return folder


def tiny(synthetic: Path, root: Path, name: str, *, steps: int, every: int, ranks: int) -> list[str]:
    """Overrides for a few-second quickstart: one image with one expression per rank and step."""
    return [
        f"name={name}", f"root_dir={root}", f"data.synthetic.dir={synthetic}", "data.synthetic.train=64",
        "data.synthetic.val=16", "data.num_workers=0", "data.max_expressions_per_image=1",
        "trainer.accelerator=cpu", f"trainer.max_steps={steps}", f"trainer.global_batch_size={ranks}",
        "trainer.micro_batch_size=1", "trainer.val_every_n_steps=0", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=2", f"checkpoint.every_n_steps={every}", "checkpoint.keep_top_k=0",
        "optim.warmup_steps=2", "logging.progress_bar=false", "logging.val_images=0",
    ]


def submit(cluster: LocalSlurmCluster, workdir: Path, *args: str) -> str:
    """`python -m evfsam_lightning.cli.slurm submit ...` with this checkout on the jobs' PYTHONPATH;
    returns the job id it prints. Emulated node names do not resolve: rendezvous on 127.0.0.1."""
    env = dict(cluster.env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", EVFSAM_MASTER_ADDR="127.0.0.1",
               EVFSAM_MASTER_PORT=str(_free_port()))
    res = subprocess.run([sys.executable, "-m", "evfsam_lightning.cli.slurm", "submit", *args], env=env,
                         cwd=workdir, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def job_log(run_dir: Path, job: str) -> str:
    logs = list((run_dir / "slurm").glob(f"*-{job}.out"))
    return logs[0].read_text() if logs else "<no job log>"


def last_step(run_dir: Path) -> int:
    """Step of the newest complete checkpoint (`last.json`), -1 before the first."""
    try:
        return json.loads((run_dir / "checkpoints" / "last.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_until(condition, what: str, cluster: LocalSlurmCluster, job: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        state = cluster.job_state(job)
        assert state not in TERMINAL_STATES, f"job {job} is {state} while waiting for {what}:\n{cluster.output(job)}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s:\n{cluster.output(job)}"
        time.sleep(0.2)


def wait_requeued(cluster: LocalSlurmCluster, job: str, restarts: int, timeout: float = 120.0) -> None:
    def requeued() -> bool:
        info = cluster.job_info(job)
        return info["JobState"] == "PENDING" and int(info.get("Restarts", "0")) >= restarts

    wait_until(requeued, f"requeue number {restarts}", cluster, job, timeout)


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}.ckpt"
    assert (run_dir / "checkpoints" / f"step-{step:08d}.ckpt.complete").is_file(), f"{ckpt} is not complete"
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


# ------------------------------------------------------------------------------ rendering (no cluster)
def test_dry_run_four_nodes_eight_gpus_zero3(capsys: pytest.CaptureFixture[str]) -> None:
    from evfsam_lightning.cli.slurm import main

    code = main(["submit", str(REFCOCO), "--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00",
                 "--partition", "gpu", "strategy.name=deepspeed", "strategy.zero_stage=3", "--dry-run"])
    script = capsys.readouterr().out
    assert code == 0
    lines = script.splitlines()
    for directive in ("--job-name=evfsam_refcoco", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                      "--signal=USR1@180", "--requeue", "--open-mode=append", "--time=24:00:00",
                      "--partition=gpu"):
        assert f"#SBATCH {directive}" in lines, directive
    assert "##SBATCH --account=" in lines, "an option not given stays the cluster's default"
    assert "runs/evfsam_refcoco/slurm/%x-%j.out" in script
    assert "srun " in script and "-m evfsam_lightning.cli.train" in script
    assert "trainer.num_nodes=4 trainer.devices=8 strategy.name=deepspeed strategy.zero_stage=3" in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script


@pytest.mark.parametrize(("overrides", "gpus", "message"), [
    (["trainer.global_batch_size=100"], 8, "not divisible"),
    (["trainer.devices=4"], 8, "trainer.devices=4 disagrees"),
    (["trainer.accelerator=cpu"], 8, "trainer.accelerator=cpu"),
    ([], 0, "trainer.accelerator=gpu"),
])
def test_launcher_refuses_a_job_the_recipe_disagrees_with(overrides: list[str], gpus: int, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        render_batch_script(REFCOCO, Job(nodes=4, gpus_per_node=gpus), overrides)


def test_signal_must_come_before_the_time_limit() -> None:
    assert slurm_time_seconds("1") == 60
    assert slurm_time_seconds("1:30") == 90
    assert slurm_time_seconds("2:00:00") == 7200
    assert slurm_time_seconds("1-02") == 26 * 3600
    assert slurm_time_seconds("1-00:00:10") == 86410
    with pytest.raises(LaunchError, match="not shorter than --time"):
        render_batch_script(REFCOCO, Job(nodes=1, gpus_per_node=8, time="2", signal_seconds=180))


def test_cpu_job_takes_its_tasks_from_the_recipe(tmp_path: Path) -> None:
    overrides = ["trainer.devices=2", "trainer.global_batch_size=16", "trainer.micro_batch_size=4"]
    script, cfg = render_batch_script(QUICKSTART, Job(nodes=2, gpus_per_node=0), overrides, workdir=tmp_path)
    assert "#SBATCH --ntasks-per-node=2" in script.splitlines()
    assert "##SBATCH --gpus-per-node=" in script.splitlines()
    assert "#SBATCH --cpus-per-task=1" in script.splitlines()  # num_workers=0, plus the training process
    assert f"#SBATCH --output={tmp_path}/runs/quickstart/slurm/%x-%j.out" in script.splitlines()
    assert cfg.world_size == 4 and cfg.run_dir == Path("runs/quickstart")


# ------------------------------------------------------------------------------ real SLURM jobs
@slurm_job
def test_two_nodes_two_tasks_each_see_slurm_ranks(slurm_cluster_2nodes: LocalSlurmCluster, synthetic: Path,
                                                   tmp_path: Path) -> None:
    cluster = slurm_cluster_2nodes
    run_dir = tmp_path / "runs" / "twonodes"
    job = submit(cluster, tmp_path, str(QUICKSTART), "--nodes", "2", "--gpus-per-node", "0", "trainer.devices=2",
                 *tiny(synthetic, tmp_path / "runs", "twonodes", steps=4, every=2, ranks=4))
    assert cluster.wait(job, timeout=180) == "COMPLETED", job_log(run_dir, job)
    log = job_log(run_dir, job)
    ranks = {}
    for line in log.splitlines():
        if line.startswith("rank ") and "environment=" in line:
            head, *fields = line.split()[1:]
            ranks[int(head.split("/")[0].rstrip(":"))] = dict(f.split("=") for f in fields) | {
                "world": head.split("/")[1].rstrip(":")}
    assert sorted(ranks) == [0, 1, 2, 3], log
    assert {r["world"] for r in ranks.values()} == {"4"}
    assert {r["environment"] for r in ranks.values()} == {"SLURMEnvironment"}
    assert {r["node"]: r["node_rank"] for r in ranks.values()} == {"node1": "0", "node2": "1"}
    assert sorted(r["local_rank"] for r in ranks.values()) == ["0", "0", "1", "1"]
    assert last_step(run_dir) == 4


@slurm_job
def test_preempted_by_signal_and_time_limit_requeues_and_matches_uninterrupted(
        slurm_cluster_2nodes: LocalSlurmCluster, synthetic: Path, tmp_path: Path) -> None:
    cluster = slurm_cluster_2nodes
    # The uninterrupted reference runs on one node while the preempted job runs on the other. Steps:
    # enough that the time limit's signal (5-35 s after the start, see below) finds the job training.
    steps = 100
    common = [str(QUICKSTART), "--nodes", "1", "--gpus-per-node", "0", "trainer.devices=2"]
    reference = submit(cluster, tmp_path, *common, *tiny(synthetic, tmp_path / "runs", "reference",
                                                         steps=steps, every=10, ranks=2))
    run_dir = tmp_path / "runs" / "preempted"
    # --time 1 with USR1@25: slurmctld checks time limits every 30 s, so the signal comes 5-35 s in.
    job = submit(cluster, tmp_path, *common, "--time", "1", "--signal-seconds", "25",
                 *tiny(synthetic, tmp_path / "runs", "preempted", steps=steps, every=10, ranks=2))
    wait_requeued(cluster, job, restarts=1, timeout=90)
    assert 0 < last_step(run_dir) < steps, job_log(run_dir, job)
    # The remaining runs get all the time they need; the next one is preempted by hand (USR1).
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=30"], env=cluster.env, check=True)
    cluster.requeue_now(job)
    for restart in (2,):
        resumed_at = last_step(run_dir)
        wait_until(lambda at=resumed_at: last_step(run_dir) > at, "checkpoint after the resume", cluster, job)
        cluster.signal(job, "USR1")
        wait_requeued(cluster, job, restarts=restart)
        cluster.requeue_now(job)
    assert cluster.wait(job, timeout=240) == "COMPLETED", job_log(run_dir, job)
    assert cluster.wait(reference, timeout=240) == "COMPLETED", job_log(tmp_path / "runs" / "reference", reference)

    log = job_log(run_dir, job)
    assert log.count("preempted: saved") == 2, log
    assert log.count(f"requeued SLURM job {job}") == 2, log
    assert cluster.job_info(job)["Restarts"] == "2"
    assert_same_weights(final_weights(run_dir, steps), final_weights(tmp_path / "runs" / "reference", steps))


@slurm_job
def test_deepspeed_zero2_preempted_resumes_and_finishes(slurm_cluster_2nodes: LocalSlurmCluster, synthetic: Path,
                                                        tmp_path: Path) -> None:
    cluster = slurm_cluster_2nodes
    run_dir = tmp_path / "runs" / "zero2"
    job = submit(cluster, tmp_path, str(QUICKSTART), "--nodes", "1", "--gpus-per-node", "0", "trainer.devices=2",
                 "strategy.name=deepspeed", "strategy.zero_stage=2",
                 *tiny(synthetic, tmp_path / "runs", "zero2", steps=8, every=2, ranks=2))
    wait_until(lambda: last_step(run_dir) >= 2, "first checkpoint", cluster, job, timeout=180)
    cluster.signal(job, "USR1")
    wait_requeued(cluster, job, restarts=1)
    cluster.requeue_now(job)
    assert cluster.wait(job, timeout=180) == "COMPLETED", job_log(run_dir, job)
    log = job_log(run_dir, job)
    assert log.count("preempted: saved") == 1 and "resuming from" in log, log
    assert last_step(run_dir) == 8
    assert (run_dir / "checkpoints" / "step-00000008.ckpt").is_dir(), "DeepSpeed saves a sharded directory"


# ------------------------------------------------------------------------------ without SLURM
@pytest.mark.slow
@pytest.mark.distributed
def test_sigusr1_without_slurm_saves_exits_75_and_restart_matches(synthetic: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def train(name: str) -> subprocess.Popen:
        overrides = tiny(synthetic, tmp_path / "runs", name, steps=8, every=2, ranks=2)
        return subprocess.Popen([sys.executable, "-m", "evfsam_lightning.cli.train", str(QUICKSTART),
                                 "trainer.devices=2", *overrides], env=dict(env, MASTER_PORT=str(_free_port())),
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    run_dir = tmp_path / "runs" / "interrupted"
    reference, first = train("reference"), train("interrupted")  # side by side: independent runs
    deadline = time.monotonic() + 180
    while last_step(run_dir) < 2:
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.1)
    first.send_signal(signal.SIGUSR1)  # rank 0 only: the all-reduce tells rank 1
    first.send_signal(signal.SIGUSR1)  # a second signal while saving changes nothing
    out = first.communicate(timeout=120)[0]
    assert first.returncode == EXIT_PREEMPTED, out
    assert out.count("preempted: saved") == 1, out
    stopped_at = last_step(run_dir)
    assert 2 <= stopped_at < 8, out
    out = reference.communicate(timeout=240)[0]
    assert reference.returncode == 0, out

    second = train("interrupted")
    out = second.communicate(timeout=240)[0]
    assert second.returncode == 0, out
    assert f"resuming from {run_dir / 'checkpoints'}/step-{stopped_at:08d}.ckpt" in out, out
    assert_same_weights(final_weights(run_dir, 8), final_weights(tmp_path / "runs" / "reference", 8))
