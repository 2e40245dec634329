"""One `evfsam-train` per run directory: the run lock (`<run dir>/.lock`)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from evfsam_lightning.config import ConfigError


class RunLock:
    """One training process per run directory: rank 0 holds `<run_dir>/.lock` (an flock, which
    the kernel drops when its holder dies, even by SIGKILL) and writes its host and PID into it.

    A second run refuses at once naming the holder. A lock left by a dead holder is free and is
    taken over with a message naming that holder. A requeued SLURM job whose previous incarnation
    still appears to hold the lock (a network file system that has not yet noticed its death)
    takes it over when the recorded SLURM job id is its own."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = self._holder()
        job = os.environ.get("SLURM_JOB_ID")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not (job and holder.get("slurm_job_id") == job):
                os.close(fd)
                who = f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}"
                raise ConfigError(f"run directory {self.path.parent} is in use by another evfsam-train ({who}, "
                                  f"lock {self.path}); wait for it to end, or use another name=") from None
            print(f"run lock {self.path}: held by an earlier start of this SLURM job {job} "
                  f"(host {holder.get('host')}, PID {holder.get('pid')}); taking it over", flush=True)
        else:
            if holder.get("pid"):
                print(f"run lock {self.path}: taking over the stale lock of host {holder.get('host')}, "
                      f"PID {holder.get('pid')} (that process is gone)", flush=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean end leaves no holder to report as stale
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
