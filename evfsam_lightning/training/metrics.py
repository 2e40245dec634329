"""Referring-segmentation metrics as torchmetrics Metrics (SPEC section 5).

Per expression, I and U of the prediction (logits > 0) against the ground truth, ignoring pixels
marked 255. gIoU = mean over expressions of I/U (an empty union counts 1.0); cIoU = sum(I) / sum(U).
States are sums, so they add up exactly across ranks. One metric tracks several sources at once
(fixed source ids), which keeps the state shapes equal on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

IGNORE_VALUE = 255


def intersection_union(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mask I and U for (n, H, W) logits and (n, H, W) targets in {0, 1, 255}."""
    valid = target != IGNORE_VALUE
    pred = (logits > 0) & valid
    gt = (target == 1) & valid
    inter = (pred & gt).flatten(1).sum(1)
    union = (pred | gt).flatten(1).sum(1)
    return inter.double(), union.double()


class ReferringIoU(Metric):
    """gIoU and cIoU per source. `update(logits, target, source_ids)` with one source id per mask."""

    full_state_update = False

    def __init__(self, sources: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.sources = list(sources)
        n = len(self.sources)
        for name in ("intersection", "union", "iou_sum", "count"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor, source_ids: torch.Tensor) -> None:
        inter, union = intersection_union(logits, target.to(logits.device))
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
        ids = source_ids.to(self.intersection.device)
        # Strategies may cast the states (DeepSpeed makes them float32): follow the state dtype.
        inter, union, iou = (t.to(self.intersection) for t in (inter, union, iou))
        self.intersection.index_add_(0, ids, inter)
        self.union.index_add_(0, ids, union)
        self.iou_sum.index_add_(0, ids, iou)
        self.count.index_add_(0, ids, torch.ones_like(iou))

    def compute(self) -> dict[str, float]:
        """{source: {"giou", "ciou", "expressions"}} plus "all" over every source."""
        out = {}
        for i, name in enumerate(self.sources):
            out[name] = _summary(self.intersection[i], self.union[i], self.iou_sum[i], self.count[i])
        out["all"] = _summary(self.intersection.sum(), self.union.sum(), self.iou_sum.sum(), self.count.sum())
        return out


def _summary(inter, union, iou_sum, count) -> dict[str, float]:
    n = float(count)
    return {
        "giou": float(iou_sum / count) if n else float("nan"),
        "ciou": float(inter / union) if float(union) > 0 else (1.0 if n else float("nan")),
        "expressions": int(n),
    }
