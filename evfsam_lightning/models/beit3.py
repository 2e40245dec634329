"""BEiT-3 multiway transformer (the early-fusion encoder of EVF-SAM).

Written from the architecture facts in SPEC section 1; module and parameter names follow the
official checkpoints (`mm_extractor.beit3.*`) so loading needs no renames. Every per-token module
exists twice: branch `A` for the vision tokens `[CLS, patches]` and branch `B` for the text tokens;
attention runs jointly over the concatenated sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class Beit3Config:
    """Dimensions of the BEiT-3 encoder (defaults: BEiT-3 large as used by EVF-SAM)."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    vocab_size: int = 64010
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    max_text_positions: int = 1024
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Multiway(nn.Module):
    """Applies branch `A` to tokens before `split` and branch `B` to the rest (dim 1)."""

    def __init__(self, make: callable):
        super().__init__()
        self.A = make()
        self.B = make()

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        if split >= x.shape[1]:
            return self.A(x)
        if split <= 0:
            return self.B(x)
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)


class FeedForward(nn.Module):
    """fc1 -> exact GELU -> sub-LN -> fc2."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference evaluates GELU in fp32 whatever the compute dtype.
        h = F.gelu(self.fc1(x).float()).type_as(x)
        return self.fc2(self.ffn_layernorm(h))


class MultiwayAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"BEiT-3 width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = Multiway(lambda: nn.Linear(dim, dim))
        self.k_proj = Multiway(lambda: nn.Linear(dim, dim))
        self.v_proj = Multiway(lambda: nn.Linear(dim, dim))
        self.out_proj = Multiway(lambda: nn.Linear(dim, dim))
        self.inner_attn_ln = Multiway(lambda: nn.LayerNorm(dim, eps=eps))

    def forward(self, x: torch.Tensor, split: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        q, k, v = (heads(p(x, split)) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.out_proj(self.inner_attn_ln(out, split), split)


class EncoderLayer(nn.Module):
    """Pre-LN layer with sub-LN: x + Attn(LN(x)); x + FFN(LN(x)); residual scale 1."""

    def __init__(self, cfg: Beit3Config):
        super().__init__()
        eps = cfg.layer_norm_eps
        self.self_attn = MultiwayAttention(cfg.embed_dim, cfg.num_heads, eps)
        self.self_attn_layer_norm = Multiway(lambda: nn.LayerNorm(cfg.embed_dim, eps=eps))
        self.ffn = Multiway(lambda: FeedForward(cfg.embed_dim, cfg.ffn_dim, eps))
        self.final_layer_norm = Multiway(lambda: nn.LayerNorm(cfg.embed_dim, eps=eps))

    def forward(self, x: torch.Tensor, split: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x, split), split, attn_mask)
        return x + self.ffn(self.final_layer_norm(x, split), split)


class VisionEmbedding(nn.Module):
    def __init__(self, cfg: Beit3Config):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Unused by EVF-SAM (masked image modelling only) but part of the official checkpoints.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.proj(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)


class Encoder(nn.Module):
    def __init__(self, cfg: Beit3Config):
        super().__init__()
        self.embed_positions = nn.Module()
        # Rows 0 and 1 of both tables are never used: positions start at 2 (fairseq convention).
        self.embed_positions.A = nn.Embedding(cfg.num_patches + 3, cfg.embed_dim)
        self.embed_positions.B = nn.Embedding(cfg.max_text_positions, cfg.embed_dim)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.depth))
        self.layer_norm = Multiway(lambda: nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps))


class Beit3(nn.Module):
    """`forward(pixels, input_ids, attention_mask)` -> encoder output (N, 1 + P + L, D)."""

    def __init__(self, cfg: Beit3Config, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = gradient_checkpointing
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (N, 3, 224, 224), input_ids (N, L), attention_mask (N, L) true for real tokens."""
        vision = self.vision_embed(pixels)
        split = vision.shape[1]
        text = self.text_embed(input_ids)
        pos = self.encoder.embed_positions
        vision = vision + pos.A.weight[2 : split + 2]
        text = text + pos.B.weight[2 : input_ids.shape[1] + 2]
        x = torch.cat([vision, text], dim=1)
        attn_mask = None
        # Testing for padding would stall the host on an accelerator; an all-true mask attends alike.
        # An exported graph (ONNX) must keep the masked path: its inputs may be padded.
        if attention_mask is not None and (attention_mask.device.type != "cpu" or torch.compiler.is_exporting()
                                           or not bool(attention_mask.all())):
            keep = torch.cat([attention_mask.new_ones(vision.shape[:2]), attention_mask], dim=1).bool()
            x = x * keep.unsqueeze(-1).to(x.dtype)  # padded tokens are zeroed, as in the reference
            attn_mask = keep[:, None, None, :]  # (N, 1, 1, S): padded keys are masked out
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, split, attn_mask, use_reentrant=False)
            else:
                x = layer(x, split, attn_mask)
        return self.encoder.layer_norm(x, split)
