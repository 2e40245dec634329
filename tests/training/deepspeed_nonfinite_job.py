"""One DeepSpeed (ZeRO-2, CPU) run on in-memory batches whose third loss is NaN; prints as JSON whether
weights and optimizer state came out of that step bit-identical, and the module's counter.

    python -m tests.training.deepspeed_nonfinite_job PRECISION [key=value ...]

A subprocess of tests/training/test_dtypes.py (DeepSpeed initialises a process group of its own).
"""

from __future__ import annotations

import json
import sys

import lightning as L
import torch

from evfsam_lightning.config import load
from evfsam_lightning.training.module import EvfSamModule, NonFiniteLossError
from evfsam_lightning.training.run import _as_dict
from evfsam_lightning.training.strategies import build_strategy
from tests.conftest import REPO
from tests.training.test_module import _batch, _Batches


class Snapshot(L.Callback):
    """Module weights and the ZeRO optimizer's fp32 partitions and Adam state before batch `index`,
    and whether they are unchanged after it."""

    def __init__(self, index: int):
        self.index = index
        self.before = None
        self.unchanged = None

    @staticmethod
    def _state(trainer, module) -> dict[str, torch.Tensor]:
        inner = trainer.strategy.deepspeed_engine.optimizer.optimizer  # the torch AdamW under ZeRO
        out = {f"w.{k}": v.detach().clone() for k, v in module.state_dict().items()}
        for g, group in enumerate(inner.param_groups):
            for i, p in enumerate(group["params"]):
                out[f"fp32.{g}.{i}"] = p.detach().clone()
                for name, t in inner.state.get(p, {}).items():
                    out[f"adam.{g}.{i}.{name}"] = torch.as_tensor(t).clone()
        return out

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.index:
            self.before = self._state(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.index:
            after = self._state(trainer, module)
            self.unchanged = sorted(k for k in self.before if not torch.equal(self.before[k], after[k]))


def main(precision: str, *overrides: str) -> None:
    cfg = load(REPO / "recipes" / "quickstart.yaml",
               ["data.synthetic.dir=unused", "strategy.name=deepspeed", "strategy.zero_stage=2",
                f"trainer.precision={precision}", "optim.warmup_steps=0", "optim.max_nonfinite_steps=5",
                "trainer.micro_batch_size=2", "trainer.global_batch_size=2", *overrides])
    module = EvfSamModule(_as_dict(cfg))
    snapshot = Snapshot(2)
    batches = [_batch(), _batch(), _batch(nan=True), _batch()]
    loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=build_strategy(cfg), precision=precision,
                        max_steps=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[snapshot],
                        gradient_clip_val=cfg.optim.grad_clip or None)
    error = None
    try:
        trainer.fit(module, train_dataloaders=loader)
    except NonFiniteLossError as e:
        error = str(e)
    logged = trainer.callback_metrics.get("train/nonfinite_steps")
    print("RESULT " + json.dumps({"changed": snapshot.unchanged, "nonfinite_steps": module.nonfinite_steps,
                                  "logged": None if logged is None else float(logged), "error": error,
                                  "global_step": trainer.global_step}))


if __name__ == "__main__":
    main(*sys.argv[1:])
