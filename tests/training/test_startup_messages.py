"""What a quickstart user reads: none of Lightning's warnings that do not apply to us, and a run
stopped by a preemption signal says so (not "finished") and how to continue."""

from __future__ import annotations

import signal
import subprocess

import pytest

from evfsam_lightning.training.signals import EXIT_PREEMPTED
from tests.training.conftest import clean_env, run_training, small_run, train_command

KNOWN_NOISE = ("Your `IterableDataset` has `__len__` defined", "`isinstance(treespec, LeafSpec)` is deprecated",
               "The `srun` command is available on your system but is not used")


@pytest.mark.slow
def test_quickstart_output_is_free_of_known_warnings_and_a_preempted_run_says_so(synthetic_dir, tmp_path):
    overrides = small_run(synthetic_dir, f"root_dir={tmp_path / 'runs'}", "name=noise", "trainer.max_steps=2",
                          "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "logging.tensorboard=false")
    run = subprocess.Popen(train_command(*overrides), cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in run.stdout:  # the handlers are installed before anything is printed
        lines.append(line)
        if line.startswith("run directory:"):
            run.send_signal(signal.SIGTERM)
            break
    lines.extend(run.stdout)
    out = "".join(lines)
    assert run.wait(timeout=300) == EXIT_PREEMPTED, out
    assert "preempted at step 1: run the same command to resume" in out, out
    assert "finished at step" not in out, out
    assert [w for w in KNOWN_NOISE if w in out] == [], out

    again = run_training(tmp_path, *overrides)  # "the same command"
    out = again.stdout + again.stderr
    assert "resuming from" in out and "finished at step 2" in out, out
    assert [w for w in KNOWN_NOISE if w in out] == [], out
