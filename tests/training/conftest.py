"""Shared pieces for training tests that run the real CLI in subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

QUICKSTART = REPO / "recipes" / "quickstart.yaml"


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A free port not handed out before in this session (runs started side by side must not share one)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def clean_env() -> dict[str, str]:
    """The environment for a child training run: no rank variables left by another run."""
    drop = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "PL_"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


def train_command(*overrides: str, recipe: Path = QUICKSTART) -> list[str]:
    return [sys.executable, "-m", "evfsam_lightning.cli.train", str(recipe), "logging.progress_bar=false",
            *overrides]


def start_process(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """A child process in the background (e.g. a reference run beside the run under test);
    `finish_process` collects it."""
    return subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_process(job: subprocess.Popen, timeout: int = 400, ok=(0,)) -> subprocess.CompletedProcess:
    """Wait for `job` (killed at the timeout) and assert its exit code is in `ok`, showing its output."""
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        raise
    shown = " ".join(str(a) for a in job.args[2:])
    assert job.returncode in ok, f"{shown} -> {job.returncode}\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


def start_training(cwd: Path, *overrides: str, recipe: Path = QUICKSTART) -> subprocess.Popen:
    """A training run in the background (its own port); `finish_training` collects it."""
    return start_process(train_command(*overrides, recipe=recipe), cwd, clean_env())


finish_training = finish_process


def run_training(cwd: Path, *overrides: str, timeout: int = 400, recipe: Path = QUICKSTART) -> subprocess.CompletedProcess:
    return finish_training(start_training(cwd, *overrides, recipe=recipe), timeout)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset (and tokenizer) generated once for all training tests."""
    root = tmp_path_factory.mktemp("synthetic")
    from evfsam_lightning.config import load
    from evfsam_lightning.training.synthetic import ensure_synthetic

    cfg = load(QUICKSTART, [f"data.synthetic.dir={root / 'data'}", "data.synthetic.train=96",
                            "data.synthetic.val=16"])
    ensure_synthetic(cfg)
    return root / "data"


def small_run(synthetic_dir: Path, *overrides: str) -> tuple[str, ...]:
    """Overrides of a quick run on the shared small dataset."""
    return (f"data.synthetic.dir={synthetic_dir}", "data.synthetic.train=96", "data.synthetic.val=16",
            "data.num_workers=0", "trainer.val_every_n_steps=0", "logging.val_images=2", *overrides)
