"""Referring-segmentation metrics as torchmetrics Metrics (SPEC section 5, GRES for no-target).

Per expression, I and U of the prediction (logits > 0) against the ground truth, ignoring pixels
marked 255. gIoU = mean over expressions of I/U (an empty union counts 1.0); cIoU = sum(I) / sum(U).

Generalized referring (gRefCOCO; the GRES/ReLA protocol): a *no-target* expression is one whose
ground truth has no object pixel (the converters write gRefCOCO's no-target refs as all-zero masks).
EVF-SAM has no separate no-target head, so "predicted no target" means an empty prediction (no
pixel with logits > 0 outside the ignored ones). The formulas above already are GRES's gIoU and cIoU:
a no-target expression scores 1 when the prediction is empty (empty union) and 0 otherwise
(I = 0, U = the predicted area, which also enters cIoU's denominator). On top of them:
N-acc = no-target expressions predicted empty / no-target expressions, and
T-acc = target expressions predicted non-empty / target expressions. They are reported (keys
"no_target", "n_acc", "t_acc") for every split that holds no-target expressions.

With a presence head the head decides instead (`rejected`: the expressions it scores below its
threshold): a rejected expression is an empty prediction, and a no-target expression scores 1 when
rejected and 0 when not, whatever the decoder drew (the GRES protocol, where a separate no-target
output decides). `PresenceSweep` gives the same numbers at several thresholds from one pass.

States are int64 sums (pixel counts, expression counts, and each expression's I/U in fixed point,
`round(I/U * 2**32)`), so they add up exactly in any order: the numbers do not depend on how the
expressions are split over ranks, and no strategy's float cast (DeepSpeed makes float states
float32) rounds them. One metric tracks several sources at once (fixed source ids), which keeps
the state shapes equal on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from evfsam_lightning.data.schema import IGNORE_VALUE

_STATES = ("intersection", "union", "iou_sum", "count", "no_target", "no_target_empty", "target_found")
#: one expression's I/U in the int64 `iou_sum` state: 2**-32 resolution, room for 2**31 expressions
IOU_SCALE = 2 ** 32


def mask_areas(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per mask, over the non-ignored pixels of (n, H, W) logits and (n, H, W) targets in
    {0, 1, 255}: "intersection", "union", "predicted" and "target" pixel counts (float64)."""
    valid = target != IGNORE_VALUE
    pred = (logits > 0) & valid
    gt = (target == 1) & valid
    return {"intersection": (pred & gt).flatten(1).sum(1).double(), "union": (pred | gt).flatten(1).sum(1).double(),
            "predicted": pred.flatten(1).sum(1).double(), "target": gt.flatten(1).sum(1).double()}


class ReferringIoU(Metric):
    """gIoU and cIoU per source, plus N-acc and T-acc where a source has no-target expressions.
    `update(logits, target, source_ids)` with one source id per mask."""

    full_state_update = False

    def __init__(self, sources: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.sources = list(sources)
        n = len(self.sources)
        for name in _STATES:
            self.add_state(name, default=torch.zeros(n, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor, source_ids: torch.Tensor,
               rejected: torch.Tensor | None = None) -> None:
        """`rejected`: bool (n,), the expressions a presence head calls "no target" (their
        predictions count as empty); None: "no target" is an empty prediction."""
        a = mask_areas(logits, target.to(logits.device))
        if rejected is not None:
            a = {k: v.unsqueeze(1) for k, v in a.items()}
            values = expression_values(a, rejected.to(logits.device).unsqueeze(1))
            values = {k: v.squeeze(1) for k, v in values.items()}
        else:
            values = expression_values(a, a["predicted"] == 0)
        _add(self, values, source_ids)

    def compute(self) -> dict[str, dict[str, float]]:
        """{source: {"giou", "ciou", "expressions"[, "no_target", "n_acc", "t_acc"]}} plus "all"
        over every source."""
        out = {name: _summary({s: getattr(self, s)[i] for s in _STATES}) for i, name in enumerate(self.sources)}
        out["all"] = _summary({s: getattr(self, s).sum() for s in _STATES})
        return out


def expression_values(a: dict[str, torch.Tensor], rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metric states' per-expression terms from `mask_areas` (each (n, k)) and the decision
    `rejected` ((n, k) bool, "no target"; broadcast over k decisions per expression)."""
    no_target = a["target"] == 0
    inter = torch.where(rejected, 0.0, a["intersection"])
    union = torch.where(rejected, a["target"], a["union"])
    # A target expression scores I/U (its union holds its target pixels); a no-target one 1 when
    # rejected. Without a head `rejected` is "predicted empty", where this is I/U with an empty union as 1.
    iou = torch.where(no_target, rejected.double(), inter / union.clamp_min(1))
    return {"intersection": inter, "union": union, "iou_sum": torch.round(iou * IOU_SCALE),
            "count": torch.ones_like(iou), "no_target": no_target.expand_as(iou),
            "no_target_empty": no_target & rejected, "target_found": ~no_target & ~rejected}


def _add(metric: Metric, values: dict[str, torch.Tensor], source_ids: torch.Tensor) -> None:
    ids = source_ids.to(metric.intersection.device)
    for name, value in values.items():
        getattr(metric, name).index_add_(0, ids, value.to(torch.int64))


class PresenceSweep(Metric):
    """The generalized metrics of a presence head at several thresholds from one pass: per
    expression, the areas of the decoder's mask and the head's score. `update(logits, target,
    source_ids, scores)` with the decoder's logits (before any rejection) and the head's
    probabilities; an expression is "no target" at threshold t when its score is below t (the
    head's own rule), so t = 0 rejects nothing and t = 1 everything below a score of 1."""

    full_state_update = False

    def __init__(self, sources: Sequence[str], thresholds: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.sources = list(sources)
        self.thresholds = [float(t) for t in thresholds]
        for name in _STATES:
            self.add_state(name, default=torch.zeros(len(self.sources), len(self.thresholds), dtype=torch.int64),
                           dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor, source_ids: torch.Tensor,
               scores: torch.Tensor) -> None:
        a = {k: v.unsqueeze(1) for k, v in mask_areas(logits, target.to(logits.device)).items()}
        thresholds = torch.tensor(self.thresholds, dtype=torch.float32, device=logits.device)
        rejected = scores.float().to(logits.device).unsqueeze(1) < thresholds  # (n, thresholds)
        _add(self, expression_values(a, rejected), source_ids)

    def compute(self) -> dict[str, list[dict]]:
        """{source: [{"threshold", "giou", "ciou", "expressions", "no_target", "n_acc", "t_acc"}, ...]}
        (one row per threshold; NaN where a split has no expression of a kind) plus "all"."""
        def rows(states: dict[str, torch.Tensor]) -> list[dict]:
            return [{"threshold": t, **_summary({s: v[j] for s, v in states.items()}, generalized=True)}
                    for j, t in enumerate(self.thresholds)]

        out = {name: rows({s: getattr(self, s)[i] for s in _STATES}) for i, name in enumerate(self.sources)}
        out["all"] = rows({s: getattr(self, s).sum(0) for s in _STATES})
        return out


def _summary(s: dict[str, torch.Tensor], generalized: bool = False) -> dict[str, float]:
    n = float(s["count"])
    out = {
        "giou": int(s["iou_sum"]) / IOU_SCALE / n if n else float("nan"),
        "ciou": int(s["intersection"]) / int(s["union"]) if int(s["union"]) > 0 else (1.0 if n else float("nan")),
        "expressions": int(n),
    }
    no_target = float(s["no_target"])
    if no_target or generalized:
        targets = n - no_target
        out["no_target"] = int(no_target)
        out["n_acc"] = float(s["no_target_empty"]) / no_target if no_target else float("nan")
        out["t_acc"] = float(s["target_found"]) / targets if targets else float("nan")
    return out
