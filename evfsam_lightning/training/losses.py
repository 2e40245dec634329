"""The reference mask loss (SPEC section 3): per-mask BCE averaged over pixels plus a Dice loss
with scale 1000, each summed over masks and divided by the number of masks in the batch, both at
the original image resolution. Pixels marked 255 (ignore) in a target count in neither part; with no
such pixels the formulas are the reference's exactly."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from evfsam_lightning.data.schema import IGNORE_VALUE

_DICE_SCALE = 1000.0
_EPS = 1e-6


def _per_mask(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE (pixel mean) and Dice per mask for (n, H, W) logits and (n, H, W) uint8 targets."""
    logits = logits.float().flatten(1)
    target = target.flatten(1)
    valid = (target != IGNORE_VALUE).float()
    t = (target == 1).float()
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    bce = (bce * valid).sum(1) / valid.sum(1).clamp_min(1.0)
    p = logits.sigmoid() * valid
    numerator = 2 * (p / _DICE_SCALE * t).sum(-1)
    denominator = (p / _DICE_SCALE).sum(-1) + (t / _DICE_SCALE).sum(-1)
    dice = 1 - (numerator + _EPS) / (denominator + _EPS)
    return bce, dice


def mask_loss(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], bce_weight: float = 2.0,
              dice_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """Per image i: logits (n_i, H_i, W_i) and targets (n_i, H_i, W_i) in {0, 1, 255}.

    Returns `loss` = bce_weight * bce + dice_weight * dice, and the weighted parts `bce` and `dice`
    (as the reference reports them)."""
    if len(logits) != len(targets):
        raise ValueError(f"{len(logits)} logit groups for {len(targets)} target groups")
    total = sum(int(t.shape[0]) for t in targets)
    bce_sum = logits[0].new_zeros((), dtype=torch.float32)
    dice_sum = bce_sum.clone()
    for lg, tg in zip(logits, targets, strict=True):
        if lg.shape != tg.shape:
            raise ValueError(f"logits {tuple(lg.shape)} and targets {tuple(tg.shape)} differ")
        n = int(tg.shape[0])
        if n == 0:
            continue
        bce, dice = _per_mask(lg, tg.to(lg.device))
        # Same arithmetic as the reference: per-image mean over its masks, re-weighted by its count.
        bce_sum = bce_sum + bce.sum() / (n + 1e-8) * n
        dice_sum = dice_sum + dice.sum() / (n + 1e-8) * n
    bce = bce_weight * bce_sum / (total + 1e-8)
    dice = dice_weight * dice_sum / (total + 1e-8)
    return {"loss": bce + dice, "bce": bce, "dice": dice}
