"""Preemption: on SIGUSR1/SIGTERM save one complete checkpoint at a step boundary, requeue, exit.

The signal handler only records that a signal came (idempotent: a second signal while saving
changes nothing). At the next optimizer-step boundary all ranks agree through a collective (an
all-reduce of the flag, max), save one complete checkpoint together (`save_complete_checkpoint`,
which includes the data position), then rank 0 requeues the job when it runs under SLURM
(`scontrol requeue`) and every rank stops training. The process then exits with:

- `signals.EXIT_REQUEUED` (0): the job is requeued and will resume from that checkpoint on its own;
- `signals.EXIT_PREEMPTED` (75, EX_TEMPFAIL): saved, but nobody requeued the job (no SLURM, or the
  requeue failed): start the same command again to resume.

Lightning's own SLURM handler saves inside the signal handler (hangs with sharded strategies,
Lightning issue 21406), and its SIGTERM handler kills the ranks it launched; `slurm_plugins()`
disables the first, and `PreemptionCheckpoint` replaces the second once training starts.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from evfsam_lightning.training.callbacks import is_complete, periodic_checkpoint, save_complete_checkpoint
from evfsam_lightning.training.signals import (
    EXIT_PREEMPTED,
    EXIT_REQUEUED,
    install_signal_handlers,
    preemption_requested,
    requeue_slurm_job,
    slurm_job_id,
)


def slurm_plugins() -> list:
    """The trainer's cluster environment under SLURM, with Lightning's auto-requeue off (we requeue)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


class PreemptionCheckpoint(Callback):
    """On a preemption signal: one complete checkpoint at the next step boundary, requeue, stop.

    `exit_code` is None until a preemption stopped training, then `EXIT_REQUEUED` or
    `EXIT_PREEMPTED`; the caller exits the process with it (`evfsam-train` does).
    """

    def __init__(self, dirpath: str | Path, requeue: bool = True):
        self.dirpath = Path(dirpath)
        self.requeue = requeue
        self.exit_code: int | None = None
        self.checkpoint: Path | None = None
        self._checked_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registered its SIGTERM handler just before (it kills the ranks it launched and
        # raises at the next batch): from here on ours decides.
        install_signal_handlers()
        self._checked_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step == self._checked_step or self.exit_code is not None:
            return  # not an optimizer-step boundary (gradient accumulation), or already stopping
        self._checked_step = trainer.global_step
        flag = torch.tensor(float(preemption_requested()), device=pl_module.device)
        if trainer.strategy.reduce(flag, reduce_op="max").item() == 0:
            return
        self.checkpoint = self._save(trainer)
        requeued = False
        job_id = slurm_job_id()
        if trainer.is_global_zero:
            print(f"preempted: saved {self.checkpoint} at step {trainer.global_step}", flush=True)
            if self.requeue and job_id is not None:
                requeued = requeue_slurm_job(job_id)
                print(f"requeued SLURM job {job_id}" if requeued else f"could not requeue SLURM job {job_id}",
                      flush=True)
        requeued = trainer.strategy.broadcast(requeued, src=0)
        self.exit_code = EXIT_REQUEUED if requeued else EXIT_PREEMPTED
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning would validate before stopping: no time for that now

    def _save(self, trainer: L.Trainer) -> Path:
        # Through the periodic checkpoint when there is one: same name and rotation, so the
        # preemption checkpoint does not stay behind once the resumed run saves its next one.
        periodic = periodic_checkpoint(trainer, self.dirpath)
        if periodic is not None:
            return periodic.save_now(trainer)
        path = self.dirpath / f"step-{trainer.global_step:08d}.ckpt"
        if not trainer.strategy.broadcast(is_complete(path), src=0):  # rank 0 decides: ranks save together
            save_complete_checkpoint(trainer, path)
        return path


def preemption_exit_code(trainer: L.Trainer) -> int | None:
    """The exit code a preempted run should end with, or None when it was not preempted."""
    for callback in trainer.callbacks:
        if isinstance(callback, PreemptionCheckpoint) and callback.exit_code is not None:
            return callback.exit_code
    return None
