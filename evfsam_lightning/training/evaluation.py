"""Evaluation of any checkpoint on shard splits: gIoU and cIoU per split (plus N-acc and T-acc
where a split holds no-target expressions), on one or more ranks. Every expression of every object
is scored (the reference's protocol, see `eval_stream.EvalStream`); an image is encoded once for all
of its expressions.

Each image is processed on its own with its expressions' padding trimmed, so the numbers do not
depend on how images are grouped into batches or ranks (1 and 2 ranks give identical results).
"""

from __future__ import annotations

import lightning as L
import torch

from evfsam_lightning.training.metrics import PresenceSweep, ReferringIoU


def shuffle_expressions_within_images(batch: dict) -> dict:
    """The text-blind control: every expression is replaced by one of the image's next object
    (cyclically over the image's objects; an object's k-th expression takes the next object's
    (k mod m)-th of m). Images with one object keep their expressions."""
    ids, mask, offsets = batch["input_ids"], batch["attention_mask"], batch["offsets"].tolist()
    objects = batch["object_index"].tolist()
    order = list(range(ids.shape[0]))
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        by_object: dict[int, list[int]] = {}
        for p in range(start, end):
            by_object.setdefault(objects[p], []).append(p)
        groups = list(by_object.values())
        if len(groups) < 2:
            continue
        for g, positions in enumerate(groups):
            donor = groups[(g + 1) % len(groups)]
            for k, p in enumerate(positions):
                order[p] = donor[k % len(donor)]
    index = torch.tensor(order, dtype=torch.long, device=ids.device)
    return {**batch, "input_ids": ids[index], "attention_mask": mask[index]}


def single_image_batch(batch: dict, i: int) -> dict:
    """Image i of a collated batch with its expressions, padding trimmed to their longest."""
    start, end = batch["offsets"][i].item(), batch["offsets"][i + 1].item()
    mask = batch["attention_mask"][start:end]
    length = int(mask.any(0).nonzero().max()) + 1 if end > start else 1
    return {
        "sam_pixel_values": batch["sam_pixel_values"][i : i + 1],
        "beit_pixel_values": batch["beit_pixel_values"][i : i + 1],
        "input_ids": batch["input_ids"][start:end, :length], "attention_mask": mask[:, :length],
        "image_index": torch.zeros(end - start, dtype=torch.long, device=mask.device),
        "resize_hw": batch["resize_hw"][i : i + 1], "original_hw": batch["original_hw"][i : i + 1],
    }


class EvalModule(L.LightningModule):
    """`sweep_thresholds` (a model with a presence head): also the generalized metrics at each of
    these thresholds (`PresenceSweep`, from the same pass), in `sweep` after the run."""

    def __init__(self, model: torch.nn.Module, sources: list[str], shuffle_expressions: bool = False,
                 sweep_thresholds: list[float] | None = None):
        super().__init__()
        self.model = model
        self.metric = ReferringIoU(sources)
        self.shuffle = shuffle_expressions
        self.results: dict | None = None
        self.sweep_metric = PresenceSweep(sources, sweep_thresholds) if sweep_thresholds else None
        self.sweep: dict | None = None

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.shuffle:
            batch = shuffle_expressions_within_images(batch)
        for i, target in enumerate(batch["masks"]):
            if target.shape[0] == 0:
                continue
            out = self.model(single_image_batch(batch, i))
            sid = dataloader_idx  # one loader per split, in order (the samples' own source names may differ)
            ids = torch.full((target.shape[0],), sid, dtype=torch.long)
            if out.presence_logits is None:
                self.metric.update(out.logits[0], target, ids)
                continue
            # With a presence head, the head decides: an expression below its threshold is "no
            # target", an empty mask.
            self.metric.update(out.logits[0], target, ids, rejected=~self.model.presence_head.present(out.presence_logits))
            if self.sweep_metric is not None:
                self.sweep_metric.update(out.logits[0], target, ids, out.presence_logits.float().sigmoid())

    def on_test_epoch_end(self) -> None:
        self.results = self.metric.compute()
        if self.sweep_metric is not None:
            self.sweep = self.sweep_metric.compute()
