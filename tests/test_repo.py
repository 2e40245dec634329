"""Repository-level checks: lint, README commands and CI agree."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, readme_setup_commands, run_shell


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed (it comes with the dev extra)")
    result = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_setup_commands()
    assert len(commands) == 2
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_a_shell_command_past_its_timeout_is_killed_with_its_children(tmp_path):
    """The quickstart fixture runs the README command through the shell: at its timeout the
    training the shell started must die too, not keep a core busy under the rest of the suite."""
    with pytest.raises(subprocess.TimeoutExpired):
        run_shell("sleep 120 & echo $! > child; wait", tmp_path, timeout=2)
    stat = Path(f"/proc/{int((tmp_path / 'child').read_text())}/stat")
    # gone, or a zombie waiting for a reaper (the container's init may not reap)
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.slow
def test_readme_main_command_trains_a_model_that_reads_the_text(quickstart_run):
    """The quickstart as the README runs it (the `quickstart_run` fixture runs the command):
    validation gIoU >= 0.6, and at most half of that with the expressions shuffled among the objects
    of each image."""
    tmp_path, stdout = quickstart_run
    assert "tensorboard --logdir" in stdout and "checkpoints:" in stdout
    giou = float(re.search(r"val/giou: ([0-9.]+)", stdout).group(1))
    assert giou >= 0.6, stdout
    ckpt = re.search(r"last checkpoint: (\S+)", stdout).group(1)
    out = tmp_path / "shuffled.json"
    subprocess.run([sys.executable, "-m", "evfsam_lightning.cli.evaluate", "--checkpoint", ckpt, "--data",
                    "data/synthetic/val", "--shuffle-expressions", "--workers", "0", "--accelerator", "cpu",
                    "--out", str(out)], cwd=tmp_path, check=True, capture_output=True, timeout=600)
    shuffled = json.loads(out.read_text())["all"]["giou"]
    assert shuffled <= giou / 2, (giou, shuffled)
    events = list((tmp_path / "runs" / "quickstart" / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/bce", "train/dice", "train/grad_norm", "lr-AdamW", "val/giou", "val/ciou",
                "train/images_per_second", "data/images"):
        assert any(t.startswith(tag) for t in scalars), (tag, sorted(scalars))
    assert any(t.startswith("val_masks/") for t in acc.Tags()["images"])
