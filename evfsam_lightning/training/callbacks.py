"""Checkpoints that are complete or invisible, the `last` pointer, automatic resume, throughput.

A checkpoint (a file, or a directory for DeepSpeed/FSDP) counts only once its sidecar marker
`<checkpoint>.complete` exists. The marker is written by rank 0 after every rank has finished
writing (a barrier); `last.json` then points at it (written to a temporary name and moved into
place). Removing a checkpoint removes its marker first. Resume therefore never reads a
half-written checkpoint: one without a marker is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

log = logging.getLogger(__name__)
MARKER_SUFFIX = ".complete"
LAST_POINTER = "last.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def marker_of(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + MARKER_SUFFIX)


def is_complete(checkpoint: str | Path) -> bool:
    return Path(checkpoint).exists() and marker_of(checkpoint).is_file()


def find_resume_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: `last.json` if it names a complete one, otherwise
    the complete checkpoint with the highest step among the markers."""
    checkpoint_dir = Path(checkpoint_dir)
    pointer = checkpoint_dir / LAST_POINTER
    if pointer.is_file():
        try:
            target = checkpoint_dir / json.loads(pointer.read_text())["checkpoint"]
            if is_complete(target):
                return target
            log.warning("%s names %s, which is not complete; looking for the newest complete one", pointer, target)
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s is unreadable; looking for the newest complete checkpoint", pointer)
    best: tuple[int, Path] | None = None
    for marker in checkpoint_dir.glob(f"*{MARKER_SUFFIX}"):
        ckpt = marker.with_name(marker.name[: -len(MARKER_SUFFIX)])
        try:
            step = int(json.loads(marker.read_text())["step"])
        except (json.JSONDecodeError, KeyError, ValueError, OSError):
            continue
        if ckpt.exists() and (best is None or step > best[0]):
            best = (step, ckpt)
    return best[1] if best else None


def save_complete_checkpoint(trainer: L.Trainer, filepath: str | Path, weights_only: bool = False) -> None:
    """Save on every rank, then (after all ranks are done) mark complete and move `last.json`."""
    filepath = Path(filepath)
    trainer.save_checkpoint(str(filepath), weights_only)
    trainer.strategy.barrier("checkpoint_written")
    if trainer.is_global_zero:
        atomic_write_text(marker_of(filepath), json.dumps({"step": trainer.global_step, "time": time.time()}))
        atomic_write_text(filepath.parent / LAST_POINTER, json.dumps({"checkpoint": filepath.name,
                                                                       "step": trainer.global_step}))
    trainer.strategy.barrier("checkpoint_marked")


def remove_checkpoint(path: str | Path) -> None:
    """Marker first: a checkpoint half removed is never taken for a complete one."""
    path = Path(path)
    marker_of(path).unlink(missing_ok=True)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class CompleteCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose saves are marked complete and whose removals unmark first."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        save_complete_checkpoint(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            remove_checkpoint(filepath)

    def save_now(self, trainer: L.Trainer) -> Path:
        """Save at the current step, out of schedule, as if it were a scheduled save: it takes this
        callback's name and rotation, so the next save removes it (after a resume too). All ranks
        call it. Only for a callback without a monitor."""
        if self.monitor is not None:
            raise ValueError("save_now is for periodic checkpoints (monitor=None)")
        if self._last_global_step_saved != trainer.global_step:
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))
        return Path(self._last_checkpoint_saved)


class FinalCheckpoint(Callback):
    """Saves a complete checkpoint when training ends, unless that step is saved already."""

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.dirpath / f"step-{trainer.global_step:08d}.ckpt"
        if not is_complete(path):
            save_complete_checkpoint(trainer, path)


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
