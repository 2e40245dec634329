"""Checkpoints that are complete, verified or invisible; the `last` pointer; automatic resume.

A checkpoint (a file, or a directory for DeepSpeed/FSDP) is written under a staging name beside
its destination (`.<name>.partial`, same file system: never through `$TMPDIR`), fsynced, renamed
into place by rank 0 after every rank has finished writing (a barrier), and only then counts:
rank 0 writes its sidecar marker `<checkpoint>.complete`, which records the size and CRC-32 of
every file of the checkpoint (for a sharded directory each rank checksums its share of the
files), then moves `last.json` to it. Marker and pointer are written to a temporary name,
fsynced and renamed, after the data they vouch for is on disk. Removing a checkpoint removes its
marker first. Resume therefore never reads a half-written checkpoint (one without a marker is
ignored) and never a damaged one: `resume=auto` verifies sizes and checksums and falls back to
the next older complete checkpoint with a warning naming the damaged file.

Checksum: zlib's CRC-32 over 8 MiB chunks, about 0.9 GB/s on one core of the 2-core CI machine
(several GB/s on a training node), so verifying a multi-GB checkpoint costs seconds, and the file
is read into the page cache the load then uses. A CRC-32 detects every error burst of up to 32
bits (a flipped byte, a zeroed run is caught with probability 1 - 2^-32), and the recorded size
catches truncation. A write that fails (disk full, quota, I/O error) stops the run with one line
(`CheckpointWriteError`) after removing the staging files; the previous checkpoint is untouched.

Over 350 lines on purpose (one concept): checkpoint integrity (staging, markers, verification,
rotation, resume choice) is one protocol, and the callbacks here are its writers. The run's other
callbacks are in `run_callbacks.py`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from evfsam_lightning.models.checkpoints import CheckpointError

log = logging.getLogger(__name__)
MARKER_SUFFIX = ".complete"
LAST_POINTER = "last.json"
STAGING_SUFFIX = ".partial"
CHUNK = 8 << 20


class DamagedCheckpoint(CheckpointError):
    """A checkpoint marked complete whose files no longer match its marker; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, I/O error); one line naming the file."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name beside `path`, fsync, rename into place, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def marker_of(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + MARKER_SUFFIX)


def staging_of(checkpoint: str | Path) -> Path:
    """Where a checkpoint is written before it is renamed into place (same folder, hidden)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f".{checkpoint.name}{STAGING_SUFFIX}")


def is_complete(checkpoint: str | Path) -> bool:
    return Path(checkpoint).exists() and marker_of(checkpoint).is_file()


def checkpoint_files(checkpoint: str | Path) -> list[str]:
    """The files of a checkpoint, relative to it ("." for a single-file checkpoint), sorted."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    return ["."]


def file_digest(path: str | Path, fsync: bool = False) -> dict:
    """{"size", "crc32"} of one file, read in 8 MiB chunks (optionally fsynced: the rank that
    checksums a file also makes sure it is on disk before the marker vouches for it)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return {"size": size, "crc32": f"{crc:08x}"}


def _member(checkpoint: Path, rel: str) -> Path:
    return checkpoint if rel == "." else checkpoint / rel


def verify_checkpoint(checkpoint: str | Path) -> None:
    """Check a complete checkpoint against its marker (every file's size, then CRC-32); raise
    `DamagedCheckpoint` naming the first file that differs. Markers written before checksums were
    recorded (no "files") pass unverified."""
    checkpoint = Path(checkpoint)
    try:
        files = json.loads(marker_of(checkpoint).read_text()).get("files")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise DamagedCheckpoint(f"checkpoint {checkpoint}: its marker {marker_of(checkpoint)} is unreadable "
                                f"({e})") from None
    if files is None:
        return
    for rel, want in files.items():  # sizes first: cheap, and the commonest damage (truncation)
        path = _member(checkpoint, rel)
        try:
            size = path.stat().st_size
        except OSError:
            raise DamagedCheckpoint(f"checkpoint {checkpoint}: {path} is missing") from None
        if size != want["size"]:
            raise DamagedCheckpoint(f"checkpoint {checkpoint}: {path} has {size} bytes, {want['size']} were written")
    for rel, want in files.items():
        path = _member(checkpoint, rel)
        got = file_digest(path)["crc32"]
        if got != want["crc32"]:
            raise DamagedCheckpoint(f"checkpoint {checkpoint}: {path} is damaged (CRC-32 {got}, "
                                    f"{want['crc32']} when written)")


def complete_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, newest first: the one `last.json` names (if complete), then
    the others by decreasing step."""
    checkpoint_dir = Path(checkpoint_dir)
    found: list[tuple[int, str, Path]] = []
    for marker in checkpoint_dir.glob(f"*{MARKER_SUFFIX}"):
        ckpt = marker.with_name(marker.name[: -len(MARKER_SUFFIX)])
        try:
            step = int(json.loads(marker.read_text())["step"])
        except (json.JSONDecodeError, KeyError, ValueError, TypeError, OSError):
            continue
        if ckpt.exists():
            found.append((step, ckpt.name, ckpt))
    ordered = [c for _, _, c in sorted(found, reverse=True)]
    pointer = checkpoint_dir / LAST_POINTER
    if pointer.is_file():
        try:
            target = checkpoint_dir / json.loads(pointer.read_text())["checkpoint"]
            if target in ordered:
                ordered.remove(target)
                ordered.insert(0, target)
            else:
                log.warning("%s names %s, which is not complete; looking for the newest complete one", pointer, target)
        except (json.JSONDecodeError, KeyError, TypeError, OSError):
            log.warning("%s is unreadable; looking for the newest complete checkpoint", pointer)
    return ordered


def find_resume_checkpoint(checkpoint_dir: str | Path, verify: bool = False) -> Path | None:
    """The newest complete checkpoint of a run: `last.json` if it names a complete one, otherwise
    the complete checkpoint with the highest step among the markers. With `verify`, a checkpoint
    whose files do not match its marker is skipped with a warning naming the file, and the next
    older complete one is taken."""
    for ckpt in complete_checkpoints(checkpoint_dir):
        if not verify:
            return ckpt
        try:
            verify_checkpoint(ckpt)
        except DamagedCheckpoint as e:
            msg = f"skipping a damaged checkpoint: {e}; trying the next older complete one"
            log.warning(msg)
            print(f"warning: {msg}", flush=True)
            continue
        return ckpt
    return None


def remove_stale_staging(checkpoint_dir: str | Path) -> list[Path]:
    """Remove what a killed save left behind (staging files and folders, temporary marker or
    pointer files) and checkpoints without a marker; returns what was removed. Rank 0 calls it
    before training starts, when no save of this run is under way."""
    checkpoint_dir = Path(checkpoint_dir)
    removed = []
    if not checkpoint_dir.is_dir():
        return removed
    for path in checkpoint_dir.iterdir():
        name = path.name
        stale = (name.startswith(".") and (name.endswith(STAGING_SUFFIX) or ".tmp" in name)) \
            or (name.startswith(("step-", "best-")) and not name.endswith(MARKER_SUFFIX) and not is_complete(path))
        if stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class StagedCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint file straight to the path it is given (our staging name beside the
    destination) and fsyncs it: no `$TMPDIR` copy, no second in-memory copy of the checkpoint."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("StagedCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except RuntimeError as e:  # torch's zip writer reports a failed write as "unexpected pos"
            cause = _os_error_in(e)
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from e


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError (e.g. ENOSPC) an exception was raised while handling, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _all_gather(trainer: L.Trainer, obj):
    import torch.distributed as dist

    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        out = [None] * trainer.world_size
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _previous_size(folder: Path) -> int | None:
    """Bytes of the newest complete checkpoint (what the next one will need, about)."""
    for ckpt in complete_checkpoints(folder):
        try:
            files = json.loads(marker_of(ckpt).read_text()).get("files") or {}
        except (OSError, json.JSONDecodeError):
            continue
        if files:
            return sum(f["size"] for f in files.values())
    return None


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _write_error(filepath: Path, error: BaseException) -> str:
    where = getattr(error, "filename", None) or filepath
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    msg = f"could not write checkpoint {filepath} ({where}: {reason})"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        need, free = _previous_size(filepath.parent), _free_bytes(filepath.parent)
        if need is not None:
            msg += f"; it needs about {_mb(need)} (the size of the previous checkpoint)"
        if free is not None:
            msg += f", {_mb(free)} free in {filepath.parent}"
    return msg + "; the previous complete checkpoint is untouched: free space and run the same command to resume"


def save_complete_checkpoint(trainer: L.Trainer, filepath: str | Path, weights_only: bool = False) -> None:
    """Save on every rank under the staging name, checksum (each rank its share of the files),
    then rank 0 renames into place, writes the marker and moves `last.json`. A failure on any
    rank raises `CheckpointWriteError` on every rank, with the staging files removed."""
    filepath = Path(filepath)
    staging = staging_of(filepath)
    if trainer.is_global_zero:
        remove_checkpoint(staging)
    trainer.strategy.barrier("checkpoint_staging")
    error: str | None = None
    try:
        trainer.save_checkpoint(str(staging), weights_only)
    except Exception as e:  # DeepSpeed / DCP may wrap the OSError of a failed write
        cause = _os_error_in(e)
        if cause is None:
            raise
        error = _write_error(filepath, cause)
    errors = [e for e in _all_gather(trainer, error) if e]
    files: dict = {}
    if not errors:
        rank, world = trainer.global_rank, trainer.world_size
        try:  # each rank checksums (and fsyncs) its share of the files
            names = checkpoint_files(staging) if staging.exists() else []
            mine = {rel: file_digest(_member(staging, rel), fsync=True) for i, rel in enumerate(names)
                    if i % world == rank}
        except OSError as e:
            mine = {"__error__": _write_error(filepath, e)}
        for part in _all_gather(trainer, mine):
            if "__error__" in part:
                errors.append(part["__error__"])
            files.update(part)
        if not files and not errors:
            errors.append(f"could not write checkpoint {filepath}: nothing was written")
    if not errors and trainer.is_global_zero:
        try:
            if filepath.exists() or marker_of(filepath).exists():
                remove_checkpoint(filepath)
            os.replace(staging, filepath)
            _fsync_dir(filepath.parent)
            marker = {"step": trainer.global_step, "time": time.time(), "world_size": trainer.world_size,
                      "files": files}
            atomic_write_text(marker_of(filepath), json.dumps(marker))
            atomic_write_text(filepath.parent / LAST_POINTER, json.dumps({"checkpoint": filepath.name,
                                                                           "step": trainer.global_step}))
        except OSError as e:
            remove_checkpoint(filepath)
            error = _write_error(filepath, e)
    errors += [e for e in _all_gather(trainer, error if trainer.is_global_zero and not errors else None) if e]
    if errors:
        if trainer.is_global_zero:
            remove_checkpoint(staging)
        trainer.strategy.barrier("checkpoint_failed")
        raise CheckpointWriteError(errors[0])
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

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        # Lightning keeps the checkpoint the run resumed from forever (a leak at every preemption):
        # ours rotates like any other checkpoint of this folder.
        if previous == current:
            return False
        return Path(self.dirpath).absolute() in Path(previous).absolute().parents



class PeriodicCheckpoint(CompleteCheckpoint):
    """`step-NNNNNNNN` every `every_n_steps` optimizer steps; the `keep_last` newest are kept (the
    step is the monitored value), so an older complete one is there to fall back to should the
    newest be damaged. The checkpoint a run resumed from rotates like any other."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep_last: int):
        super().__init__(dirpath=dirpath, filename="step-{step:08d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_steps, monitor="step", mode="max", save_top_k=keep_last,
                         save_last=False)

    def save_now(self, trainer: L.Trainer) -> Path:
        """Save at the current step, out of schedule, as if it were a scheduled save: it takes this
        callback's name and rotation, so a later save removes it (after a resume too). All ranks
        call it; a step saved already (e.g. the one the run resumed from) is not saved again."""
        candidates = self._monitor_candidates(trainer)
        path = Path(self.format_checkpoint_name(candidates))
        if self._last_global_step_saved == trainer.global_step \
                or trainer.strategy.broadcast(is_complete(path), src=0):
            return path
        self._save_topk_checkpoint(trainer, candidates)
        return Path(self._last_checkpoint_saved)


def periodic_checkpoint(trainer: L.Trainer, dirpath: str | Path) -> PeriodicCheckpoint | None:
    """The trainer's `PeriodicCheckpoint` writing to `dirpath`, if any."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, PeriodicCheckpoint) and Path(callback.dirpath).resolve() == Path(dirpath).resolve():
            return callback
    return None


class FinalCheckpoint(Callback):
    """Saves a complete checkpoint when training ends, unless that step is saved already. Through
    the periodic checkpoint when there is one, so that it rotates: the run ends with one last
    checkpoint (plus the best ones), not the last periodic one and the final one."""

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        periodic = periodic_checkpoint(trainer, self.dirpath)
        if periodic is not None:
            periodic.save_now(trainer)
            return
        path = self.dirpath / f"step-{trainer.global_step:08d}.ckpt"
        if not trainer.strategy.broadcast(is_complete(path), src=0):
            save_complete_checkpoint(trainer, path)
