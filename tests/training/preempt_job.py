"""`evfsam-train` as users run it, plus (when EVFSAM_TEST_PREEMPT_AT is set) a SIGUSR1 that rank 0
sends itself right after its micro-batch number EVFSAM_TEST_PREEMPT_AT (0-based, counted in this
process): a preemption arriving at a known point, e.g. in the middle of an accumulation window.

    python -m tests.training.preempt_job RECIPE key=value ...

Every rank imports this module (Lightning's launcher re-executes the command line); only rank 0
signals, as a scheduler signalling the batch step's first process would. The run then saves at the
next optimizer-step boundary and exits 75 (`signals.EXIT_PREEMPTED`).
"""

from __future__ import annotations

import os
import signal
import sys

import lightning as L

from evfsam_lightning.cli.train import main
from evfsam_lightning.training import run


class SignalAt(L.Callback):
    def __init__(self, at: int):
        self.at = at
        self.seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.seen == self.at and trainer.is_global_zero:
            print(f"test: SIGUSR1 after micro-batch {self.at} (step {trainer.global_step})", flush=True)
            os.kill(os.getpid(), signal.SIGUSR1)
        self.seen += 1


if __name__ == "__main__":
    at = os.environ.get("EVFSAM_TEST_PREEMPT_AT")
    if at is not None:
        build = run.build_trainer
        run.build_trainer = lambda cfg, extra_callbacks=(): build(cfg, (*extra_callbacks, SignalAt(int(at))))
    sys.exit(main(sys.argv[1:]))
