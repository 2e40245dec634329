"""Preemption signals and SLURM requeue, with the standard library only (cheap to import first).

A process that installs these handlers is not killed by SIGUSR1 (SLURM's `--signal`) or SIGTERM
(SLURM's requeue and time limit, most other schedulers): the handler only records the signal, and
training (`preemption.PreemptionCheckpoint`) acts on it at the next optimizer step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

log = logging.getLogger(__name__)

EXIT_REQUEUED = 0  # saved, and the SLURM job is requeued: it resumes on its own
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): saved, nobody requeued: run the same command again
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []  # signals received by this process, in order (only ever appended to)


def _record(signum: int, frame) -> None:
    # A signal handler may interrupt anything, a checkpoint save included: only record.
    _received.append(signum)


def install_signal_handlers(signals: tuple[int, ...] = PREEMPTION_SIGNALS) -> bool:
    """Make `signals` only record a preemption request in this process (main thread only).

    Call it as early as possible (a signal before it would kill the process) and again once
    Lightning has installed its own handlers. Returns False off the main thread, where Python
    cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in signals:
        signal.signal(signum, _record)
    return True


def preemption_requested() -> bool:
    """Whether this process received a preemption signal."""
    return bool(_received)


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs (`<array job>_<task>` for array jobs), or None outside SLURM."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job_id: str) -> bool:
    """`scontrol requeue <job_id>`; True when SLURM accepted it."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("scontrol requeue %s failed: %s", job_id, e)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    return True
