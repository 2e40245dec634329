"""The run's callbacks besides the checkpoint writers (`callbacks.py`): images per second, where each
rank runs, and the loop counters after a data-position reset."""

from __future__ import annotations

import os
import socket
import time

import lightning as L
from lightning.pytorch.callbacks import Callback


class DataPositionReset(Callback):
    """After a resume with `checkpoint.reset_data_position=true` that changed the layout, the data
    module restarts at an epoch boundary of the new layout (`train_stream.reset_position`); Lightning's
    loop counters are moved to match: the epoch's batch counter to 0, the run's batch counter to
    global_step x the new accumulation (so validation and accumulation windows fall on optimizer
    steps). Weights, optimizer, schedulers and global step stay as saved."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if not getattr(trainer.datamodule, "position_was_reset", False):
            return
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        current, total = progress["current"], progress["total"]
        shift = current["ready"]
        for key in current:
            current[key] -= shift
        shift = total["ready"] - checkpoint["global_step"] * trainer.accumulate_grad_batches
        for key in total:
            total[key] -= shift
        progress["is_last_batch"] = False


class Throughput(Callback):
    """Images per second over each logging interval (all ranks together)."""

    def __init__(self, images_per_step: int, every_n_steps: int):
        self.images_per_step = images_per_step
        self.every = max(1, every_n_steps)
        self._t0: float | None = None
        self._step0 = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, step
            return
        if step - self._step0 >= self.every:
            rate = (step - self._step0) * self.images_per_step / (now - self._t0)
            pl_module.log("train/images_per_second", rate, batch_size=1, rank_zero_only=True)
            self._t0, self._step0 = now, step


class ProcessLayout(Callback):
    """Each rank prints where it runs (rank, node, host, cluster environment) when fit starts: the
    first thing to read in the log of a multi-node job that does not come together."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A single-device strategy has no cluster environment.
        environment = type(getattr(trainer.strategy, "cluster_environment", None)).__name__
        node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
        print(f"rank {trainer.global_rank}/{trainer.world_size}: node_rank={trainer.node_rank} "
              f"local_rank={trainer.local_rank} node={node} environment={environment}", flush=True)
