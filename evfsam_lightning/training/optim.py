"""AdamW with parameter groups and the learning-rate schedules of the recipes."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

# Parameters that are table-like rather than weights: no weight decay, like norms and biases.
_NO_DECAY_NAMES = ("cls_token", "pos_embed", "embed_positions", "rel_pos", "no_mask_embed", "iou_token",
                   "mask_tokens")


def parameter_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; norms, biases and embedding tables without."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(t in name for t in _NO_DECAY_NAMES) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Multiplier of the base LR at optimizer step s: linear warm-up from 0 over `warmup_steps`, then
    `linear` or `cosine` decay to `min_lr_ratio` at `total_steps`, or `constant`."""
    if schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r} (allowed: linear, cosine, constant)")

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return f


def build_optimizer(groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                    cpu_offload: bool = False) -> torch.optim.Optimizer:
    if cpu_offload:  # DeepSpeed ZeRO-Offload runs the step on the CPU with its own Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
