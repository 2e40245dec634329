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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def run_training(cwd: Path, *overrides: str, timeout: int = 400, recipe: Path = QUICKSTART) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(*overrides, recipe=recipe), cwd=cwd, env=clean_env(), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


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
