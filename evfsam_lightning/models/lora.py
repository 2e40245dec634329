"""LoRA on BEiT-3's attention projections: a low-rank update that trains, on weights that do not.

`LoraLinear` is an `nn.Linear` whose `weight` and `bias` keep their names, plus `lora_a` (r x in)
and `lora_b` (out x r): output = x W^T + b + (alpha / r) x A^T B^T. Because the base weights keep
their names, pretrained loading, key reports and "frozen weights left out of checkpoints" work
unchanged; the LoRA tensors are extra keys (`...q_proj.A.lora_a`). `merge_lora` folds the update
into the weights and puts plain `nn.Linear`s back, so a merged model is an ordinary EVF-SAM.

We do not use `peft`: its LoRA wraps each layer and renames its weights (`base_layer.weight`),
which our official-layout loaders and checkpoint key checks would have to special-case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: BEiT-3 attention projections; each exists twice (branch A for vision, B for text tokens).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_ATTENTION = "mm_extractor.beit3.encoder.layers."


class LoraLinear(nn.Linear):
    """`nn.Linear` plus a trainable rank-`rank` update scaled by `alpha / rank` (B starts at zero,
    so a fresh LoraLinear computes exactly what the base layer computes)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int, alpha: float,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` computing the same function."""
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling
            out.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _target_layers(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    unknown = set(targets) - set(DEFAULT_TARGETS)
    if unknown:
        raise ValueError(f"model.lora.targets: {sorted(unknown)} are not BEiT-3 attention projections "
                         f"(allowed: {', '.join(DEFAULT_TARGETS)})")
    out = []
    for name, module in model.named_modules():
        parts = name.split(".")
        # ...layers.<i>.self_attn.<target>.<A|B>: both multiway branches of each targeted projection.
        if name.startswith(_ATTENTION) and len(parts) >= 3 and parts[-2] in targets and parts[-1] in ("A", "B") \
                and parts[-3] == "self_attn" and isinstance(module, nn.Linear):
            out.append((name, module))
    return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Replace the targeted projections by `LoraLinear`s holding the same weights; returns their names.
    Call it after loading pretrained weights (the LoRA tensors are new)."""
    if rank < 1:
        raise ValueError(f"model.lora.rank={rank} must be at least 1")
    layers = _target_layers(model, targets)
    if not layers:
        raise ValueError(f"model.lora.targets={list(targets)} matches no BEiT-3 attention projection")
    for name, base in layers:
        lora = LoraLinear(base.in_features, base.out_features, base.bias is not None, rank=rank, alpha=alpha,
                          device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            lora.weight.copy_(base.weight)
            if base.bias is not None:
                lora.bias.copy_(base.bias)
        lora.weight.requires_grad_(base.weight.requires_grad)
        _set(model, name, lora)
    return [name for name, _ in layers]


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its weights, in place; returns how many layers were merged."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    for name, module in layers:
        _set(model, name, module.merged())
    return len(layers)


def is_lora_parameter(name: str) -> bool:
    return name.endswith((".lora_a", ".lora_b"))
