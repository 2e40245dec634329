"""A 2-process CPU DDP training run that records the keys each rank consumes per step.

Started by test_resume.py as a subprocess (Lightning's DDP launcher re-executes the command line,
which must not be pytest's). Writes OUT/rank{r}.json: [[global_step, [keys...]], ...]."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from evfsam_lightning.data.datamodule import EvfDataModule
from tests.data.conftest import data_settings


class KeyRecorder(L.LightningModule):
    def __init__(self, out: Path):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out = out
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        self.seen.append([self.global_step, batch["keys"] + batch["expressions"]])
        return (self.weight * batch["sam_pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--shards", type=Path, required=True, help="the `three_sources` folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--ckpt")
    args = p.parse_args()
    dm = EvfDataModule(*data_settings(args.tokenizer, args.shards, num_workers=2))
    callbacks = []
    if args.save_every:
        callbacks.append(ModelCheckpoint(dirpath=args.out / "ckpt", filename="{step}",
                                         every_n_train_steps=args.save_every, save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=args.max_steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        enable_checkpointing=bool(args.save_every))
    trainer.fit(KeyRecorder(args.out), datamodule=dm, ckpt_path=args.ckpt)


if __name__ == "__main__":
    main()
