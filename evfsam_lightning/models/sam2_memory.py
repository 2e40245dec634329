"""The SAM-2 modules only video tracking runs (memory attention, memory encoder, object-pointer
projection, memory position encodings: `VideoMemory`, built from transformers' SAM-2 video modules),
with the official <-> our key maps of their weights. The image path (`sam2.Sam2Backbone`) holds
them under `video_memory` so that checkpoints load and export whole; `sam2_video.py` runs them."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from evfsam_lightning.models.sam import template_renames

if TYPE_CHECKING:
    from evfsam_lightning.models.sam2 import Sam2Config


def video_memory_shapes(cfg: Sam2Config) -> dict[str, tuple[int, ...]]:
    """Official names (under `visual_model.`) and shapes of the SAM-2 tensors that only video
    tracking uses, in the reference's state-dict order."""
    c, m = cfg.prompt_dim, cfg.mem_dim
    shapes: dict[str, tuple[int, ...]] = {
        "maskmem_tpos_enc": (cfg.num_maskmem, 1, 1, m), "no_mem_pos_enc": (1, 1, c), "no_obj_ptr": (1, c)}

    def weight_bias(name: str, *weight: int) -> None:
        shapes[f"{name}.weight"] = tuple(weight)
        shapes[f"{name}.bias"] = (weight[0],)

    weight_bias("mask_downsample", 1, 1, 4, 4)
    for i in range(cfg.memory_attention_layers):
        layer = f"memory_attention.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            weight_bias(f"{layer}.self_attn.{proj}", c, c)
        for proj, in_dim in (("q_proj", c), ("k_proj", m), ("v_proj", m), ("out_proj", c)):
            weight_bias(f"{layer}.cross_attn_image.{proj}", c, in_dim)
        weight_bias(f"{layer}.linear1", cfg.memory_attention_ffn_dim, c)
        weight_bias(f"{layer}.linear2", c, cfg.memory_attention_ffn_dim)
        for n in (1, 2, 3):
            weight_bias(f"{layer}.norm{n}", c)
    weight_bias("memory_attention.norm", c)
    # Mask downsampler: four (3x3 conv stride 2 with 4x the channels, LayerNorm2d, GELU), then a 1x1 conv.
    channels = 1
    for j in range(4):
        weight_bias(f"memory_encoder.mask_downsampler.encoder.{3 * j}", channels * 4, channels, 3, 3)
        weight_bias(f"memory_encoder.mask_downsampler.encoder.{3 * j + 1}", channels * 4)
        channels *= 4
    weight_bias("memory_encoder.mask_downsampler.encoder.12", c, channels, 1, 1)
    weight_bias("memory_encoder.pix_feat_proj", c, c, 1, 1)
    for i in range(cfg.memory_fuser_layers):
        block = f"memory_encoder.fuser.layers.{i}"
        shapes[f"{block}.weight"] = (c,)  # layer-scale gamma
        weight_bias(f"{block}.dwconv", c, 1, 7, 7)
        weight_bias(f"{block}.norm", c)
        weight_bias(f"{block}.pwconv1", 4 * c, c)
        weight_bias(f"{block}.pwconv2", c, 4 * c)
    weight_bias("memory_encoder.out_proj", m, c, 1, 1)
    for i in range(3):
        weight_bias(f"obj_ptr_proj.layers.{i}", c, c)
    return shapes


# -- video memory (real modules) ----------------------------------------------------------------
def _hf_video_config(cfg: Sam2Config):
    from transformers import Sam2VideoConfig

    c = cfg.prompt_dim
    video = Sam2VideoConfig(
        memory_attention_hidden_size=c, memory_attention_num_layers=cfg.memory_attention_layers,
        memory_attention_num_attention_heads=1, memory_attention_downsample_rate=1,
        memory_attention_feed_forward_hidden_size=cfg.memory_attention_ffn_dim,
        memory_attention_feed_forward_hidden_act="relu", memory_encoder_hidden_size=c,
        memory_encoder_output_channels=cfg.mem_dim, mask_downsampler_embed_dim=c, memory_fuser_embed_dim=c,
        memory_fuser_intermediate_dim=4 * c, memory_fuser_num_layers=cfg.memory_fuser_layers,
    )
    video._attn_implementation = "sdpa"
    return video


class MemoryAttention(nn.Module):
    """SAM-2 memory attention: layers of (RoPE self-attention, RoPE cross-attention to the memory, MLP),
    pre-norm, then a final LayerNorm. The layers are transformers' `Sam2VideoMemoryAttentionLayer`;
    their cross-attention is rebuilt for our memory width, because transformers hard-codes the
    keys' input width to 64 (SAM-2's `mem_dim`), and the axial RoPE angles are computed here for
    the actual feature grid (transformers precomputes them in non-persistent buffers for a fixed
    grid, which a meta-device build followed by `to_empty` would leave uninitialised)."""

    def __init__(self, cfg: Sam2Config):
        super().__init__()
        from transformers.models.sam2_video.modeling_sam2_video import (
            Sam2VideoMemoryAttentionLayer,
            Sam2VideoRoPEAttention,
        )

        video = _hf_video_config(cfg)
        self.layers = nn.ModuleList()
        for _ in range(cfg.memory_attention_layers):
            layer = Sam2VideoMemoryAttentionLayer(video)
            layer.cross_attn_image = Sam2VideoRoPEAttention(video, kv_in_dim=cfg.mem_dim, rope_k_repeat=True)
            self.layers.append(layer)
        self.layer_norm = nn.LayerNorm(cfg.prompt_dim)
        self.rope_theta = 10000.0

    def rope(self, height: int, width: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (1, h*w, head_dim) of the axial RoPE on a raster grid: the first half of the channel
        pairs rotate with the column, the second half with the row."""
        freqs = 1.0 / (self.rope_theta ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float()
                                           / head_dim))
        idx = torch.arange(height * width, device=device, dtype=torch.float32)
        t_x, t_y = idx % width, torch.div(idx, width, rounding_mode="floor")
        angles = torch.cat([torch.outer(t_x, freqs), torch.outer(t_y, freqs)], dim=-1)
        angles = angles.repeat_interleave(2, dim=-1)[None]
        return angles.cos(), angles.sin()

    def forward(self, curr: torch.Tensor, curr_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                num_obj_ptr_tokens: int, hw: tuple[int, int]) -> torch.Tensor:
        """curr/curr_pos (B, HW, C), memory/memory_pos (B, M, mem_dim) -> (B, HW, C)."""
        output = curr + 0.1 * curr_pos
        head_dim = self.layers[0].self_attn.head_dim
        cos_sin = self.rope(hw[0], hw[1], head_dim, curr.device)
        output, memory, memory_pos = output[:, None], memory[:, None], memory_pos[:, None]
        for layer in self.layers:
            output = layer(queries=output, keys=memory, key_point_embedding=memory_pos,
                           rope_position_embeddings=cos_sin, num_k_exclude_rope=num_obj_ptr_tokens)
        return self.layer_norm(output[:, 0])


class ObjectPointerProjection(nn.Module):
    """MLP (ReLU between layers) from the selected mask token to the object pointer."""

    def __init__(self, dim: int, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class VideoMemory(nn.Module):
    """The SAM-2 modules only video tracking runs: memory attention, memory encoder (transformers'
    `Sam2VideoMemoryEncoder`), object-pointer projection, temporal position encodings of the memory
    frames, no-memory position and no-object pointer. Names map to the official ones in
    `video_key_to_reference` / `video_key_from_reference`. Never trained (EVF-SAM2 keeps SAM-2 frozen)."""

    def __init__(self, cfg: Sam2Config):
        super().__init__()
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoMemoryEncoder

        c, m = cfg.prompt_dim, cfg.mem_dim
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(cfg.num_maskmem, 1, 1, m))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, c))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, c))
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.memory_attention = MemoryAttention(cfg)
        self.memory_encoder = Sam2VideoMemoryEncoder(_hf_video_config(cfg))
        self.obj_ptr_proj = ObjectPointerProjection(c)


# official (under `visual_model.`) <-> ours (under `video_memory.`): key templates, see `template_renames`
_VIDEO_NAMES = """
memory_attention.layers.{i}.{attn}.out_proj.   memory_attention.layers.{i}.{attn}.o_proj.
memory_attention.layers.{i}.norm{i}.           memory_attention.layers.{i}.layer_norm{i}.
memory_attention.norm.                         memory_attention.layer_norm.
memory_encoder.pix_feat_proj.                  memory_encoder.feature_projection.
memory_encoder.out_proj.                       memory_encoder.projection.
memory_encoder.fuser.layers.{i}.weight$        memory_encoder.memory_fuser.layers.{i}.scale$
memory_encoder.fuser.layers.{i}.dwconv.        memory_encoder.memory_fuser.layers.{i}.depthwise_conv.
memory_encoder.fuser.layers.{i}.norm.          memory_encoder.memory_fuser.layers.{i}.layer_norm.
memory_encoder.fuser.layers.{i}.pwconv{i}.     memory_encoder.memory_fuser.layers.{i}.pointwise_conv{i}.
"""
_VIDEO_RENAMES = template_renames(_VIDEO_NAMES, to_reference=False)
_VIDEO_RENAMES_BACK = template_renames(_VIDEO_NAMES, to_reference=True)
# the mask downsampler: official `encoder.{3j}` conv, `encoder.{3j+1}` LayerNorm2d, last index the 1x1 conv
_DOWNSAMPLER = re.compile(r"^memory_encoder\.mask_downsampler\.encoder\.(\d+)\.(.+)$")
_DOWNSAMPLER_OURS = re.compile(r"^memory_encoder\.mask_downsampler\.(?:layers\.(\d+)\.(conv|layer_norm)|final_conv)\.(.+)$")


def video_key_from_reference(key: str, num_down: int = 4) -> str:
    m = _DOWNSAMPLER.match(key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i == 3 * num_down:
            return f"memory_encoder.mask_downsampler.final_conv.{rest}"
        return f"memory_encoder.mask_downsampler.layers.{i // 3}.{('conv', 'layer_norm')[i % 3]}.{rest}"
    for pattern, repl in _VIDEO_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def video_key_to_reference(key: str, num_down: int = 4) -> str:
    m = _DOWNSAMPLER_OURS.match(key)
    if m:
        if m.group(1) is None:
            return f"memory_encoder.mask_downsampler.encoder.{3 * num_down}.{m.group(3)}"
        index = 3 * int(m.group(1)) + (0 if m.group(2) == "conv" else 1)
        return f"memory_encoder.mask_downsampler.encoder.{index}.{m.group(3)}"
    for pattern, repl in _VIDEO_RENAMES_BACK:
        key = re.sub(pattern, repl, key)
    return key
