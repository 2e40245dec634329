"""SAM-2 (Hiera) behind the `SamBackbone` interface, for EVF-SAM2.

Built from transformers' Sam2 modules (`Sam2VisionModel` = Hiera trunk + FPN neck,
`Sam2PromptEncoder`, `Sam2MaskDecoder`), which reach parity with the reference unchanged. The
reference image path, which this backbone reproduces:

- encode: Hiera -> FPN levels at strides 4, 8, 16 (the stride-32 level only feeds the top-down sum);
  `no_mem_embed` is added to the stride-16 map (the image embedding); the mask decoder's 1x1 convs
  `conv_s0` / `conv_s1` turn the stride-4 / stride-8 maps into its high-resolution features.
- decode: the text prompt is the only sparse token (no padding point), the dense embedding is
  `no_mask_embed`; the decoder always runs with all mask tokens (`multimask_output=True`) and the
  mask with the highest predicted IoU is kept.
- pre/postprocessing: plain resize to S x S (no padding); low-res logits go straight to (H, W).

The reference checkpoints hold the whole SAM-2, including the video modules (memory attention,
memory encoder, object-pointer projection, ...) that the image path never runs. They live here as
real modules under `video_memory` (transformers' SAM-2 video memory modules, see `VideoMemory`),
loaded from and exported to the official names and shapes, always frozen (never trained), and run by
the video tracker (`models/sam2_video.py`); those modules and their key maps are in `sam2_memory.py`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from evfsam_lightning.data import transforms
from evfsam_lightning.models.sam import SamBackbone, _mlp_rename, grid_positional_encoding, template_renames
from evfsam_lightning.models.sam2_memory import (
    VideoMemory,
    video_key_from_reference,
    video_key_to_reference,
    video_memory_shapes,
)

#: Hiera's patch embedding (stride 4) and two query-pooling steps put the image embedding at stride 16.
BACKBONE_STRIDE = 16


@dataclass
class Sam2Config:
    """Dimensions of SAM-2 (defaults: Hiera-L, `sam2_hiera_l.yaml`, as used by EVF-SAM2)."""

    image_size: int = 1024
    #: Hiera: width and heads of stage 1, multiplied by `dim_mul` / `head_mul` at each later stage
    embed_dim: int = 144
    num_heads: int = 2
    dim_mul: float = 2.0
    head_mul: float = 2.0
    #: Hiera: blocks per stage
    stages: list[int] = field(default_factory=lambda: [2, 6, 36, 4])
    #: Hiera: blocks (global index) with global attention
    global_attn_blocks: list[int] = field(default_factory=lambda: [23, 33, 43])
    #: Hiera: attention window per stage (a stage's first block still uses the previous stage's)
    window_spec: list[int] = field(default_factory=lambda: [8, 4, 16, 8])
    #: Hiera: size of the background positional embedding, interpolated to the patch grid
    window_pos_embed_bkg_size: list[int] = field(default_factory=lambda: [7, 7])
    mlp_ratio: float = 4.0
    #: Hiera: number of stage changes that max-pool the queries, and the pooling stride
    q_pool: int = 3
    q_stride: int = 2
    #: FPN width = prompt width = mask decoder width (C)
    prompt_dim: int = 256
    fpn_top_down_levels: list[int] = field(default_factory=lambda: [2, 3])
    #: mask decoder (hard-coded in the reference SAM2Base)
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    mask_in_chans: int = 16
    #: video modules (held for checkpoint round trips only): memory width, memory frames,
    #: memory-attention layers and FFN width, memory-encoder fuser blocks
    mem_dim: int = 64
    num_maskmem: int = 7
    memory_attention_layers: int = 4
    memory_attention_ffn_dim: int = 2048
    memory_fuser_layers: int = 2

    def stage_dims(self) -> tuple[list[int], list[int]]:
        """(width, heads) of each Hiera stage, rounded down at each stage change as the reference does."""
        dims, heads = [self.embed_dim], [self.num_heads]
        for _ in self.stages[1:]:
            dims.append(int(dims[-1] * self.dim_mul))
            heads.append(int(heads[-1] * self.head_mul))
        return dims, heads


def _hf_sam2_configs(cfg: Sam2Config):
    from transformers import (
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    dims, heads = cfg.stage_dims()
    s = cfg.image_size
    hiera = Sam2HieraDetConfig(
        hidden_size=cfg.embed_dim, num_attention_heads=cfg.num_heads, image_size=[s, s],
        query_stride=[cfg.q_stride, cfg.q_stride], num_query_pool_stages=cfg.q_pool,
        window_positional_embedding_background_size=list(cfg.window_pos_embed_bkg_size),
        blocks_per_stage=list(cfg.stages), embed_dim_per_stage=dims, num_attention_heads_per_stage=heads,
        window_size_per_stage=list(cfg.window_spec), global_attention_blocks=list(cfg.global_attn_blocks),
        mlp_ratio=float(cfg.mlp_ratio),
    )
    vision = Sam2VisionConfig(
        backbone_config=hiera, backbone_channel_list=dims[::-1], fpn_hidden_size=cfg.prompt_dim,
        backbone_feature_sizes=[[s // 4] * 2, [s // 8] * 2, [s // 16] * 2],
        fpn_top_down_levels=list(cfg.fpn_top_down_levels), num_feature_levels=3,
    )
    prompt = Sam2PromptEncoderConfig(hidden_size=cfg.prompt_dim, image_size=s, patch_size=BACKBONE_STRIDE,
                                     mask_input_channels=cfg.mask_in_chans)
    decoder = Sam2MaskDecoderConfig(
        hidden_size=cfg.prompt_dim, mlp_dim=cfg.decoder_mlp_dim, num_hidden_layers=cfg.decoder_depth,
        num_attention_heads=cfg.decoder_heads, num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        # With multimask_output=False the decoder then returns mask token 0, not a stability-based
        # pick; EVF-SAM2 never asks for it (it always selects among the multimask outputs by IoU).
        dynamic_multimask_via_stability=False,
    )
    for sub in (vision, vision.backbone_config, decoder):
        sub._attn_implementation = "sdpa"  # modules built standalone get no dispatch otherwise
    return vision, prompt, decoder


# (reference prefix, our prefix); a prefix without a trailing dot is a whole key. Most specific first.
_PREFIXES = [
    ("image_encoder.trunk.patch_embed.proj.", "vision_encoder.backbone.patch_embed.projection."),
    ("image_encoder.trunk.", "vision_encoder.backbone."),
    ("image_encoder.neck.", "vision_encoder.neck."),
    ("sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
     "prompt_encoder.shared_embedding.positional_embedding"),
    ("sam_prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("sam_prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("sam_prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("sam_prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("sam_prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("sam_prompt_encoder.", "prompt_encoder."),
    ("sam_mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("sam_mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("sam_mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("sam_mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("sam_mask_decoder.", "mask_decoder."),
    ("no_mem_embed", "no_memory_embedding"),
]
# Renames inside a key after the prefix swap (both sides in our prefixes): official, then ours.
_INFIXES = """
vision_encoder.backbone.blocks.{i}.norm{i}.     vision_encoder.backbone.blocks.{i}.layer_norm{i}.
vision_encoder.neck.convs.{i}.conv.             vision_encoder.neck.convs.{i}.
mask_decoder.transformer.layers.{i}.norm{i}.    mask_decoder.transformer.layers.{i}.layer_norm{i}.
mask_decoder.transformer.{path}.out_proj.       mask_decoder.transformer.{path}.o_proj.
"""
_INFIXES_FROM_REFERENCE = template_renames(_INFIXES, to_reference=False)
_INFIXES_TO_REFERENCE = template_renames(_INFIXES, to_reference=True)
_POINT_EMBEDDING = re.compile(r"^sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$")
_POINT_EMBED = "prompt_encoder.point_embed.weight"
_VIDEO = "video_memory."


def _swap_prefix(key: str, to_reference: bool) -> str:
    for ref, ours in _PREFIXES:
        src, dst = (ours, ref) if to_reference else (ref, ours)
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    return key


class Sam2Backbone(SamBackbone):
    """SAM-2: Hiera image encoder with FPN neck, prompt encoder, mask decoder with high-res features.

    `image_encoder_names` covers Hiera and the neck; `no_memory_embedding` and the decoder's
    `conv_s0`/`conv_s1` also act in `encode_image` (as in the reference's `forward_image`)."""

    family = "sam2"
    image_encoder_names = ("vision_encoder",)
    image_feature_prefixes = ("vision_encoder.", "no_memory_embedding", "mask_decoder.conv_s0.",
                              "mask_decoder.conv_s1.")
    image_feature_names = ("image_embeddings", "high_res_feat_s0", "high_res_feat_s1")

    def __init__(self, config: Sam2Config):
        super().__init__()
        from transformers.models.sam2.modeling_sam2 import Sam2MaskDecoder, Sam2PromptEncoder, Sam2VisionModel

        if config.decoder_depth != 2:
            # transformers ties the two-way blocks' MLP depth to the block count; the reference uses 2 and 2.
            raise ValueError(f"SAM-2 mask decoder depth must be 2 (got {config.decoder_depth})")
        self.config = config
        self.image_size = config.image_size
        self.prompt_dim = config.prompt_dim
        vision, prompt, decoder = _hf_sam2_configs(config)
        self.vision_encoder = Sam2VisionModel(vision)
        self.prompt_encoder = Sam2PromptEncoder(prompt)
        self.mask_decoder = Sam2MaskDecoder(decoder)
        self.no_memory_embedding = nn.Parameter(torch.zeros(1, 1, config.prompt_dim))
        self.video_memory = VideoMemory(config)
        self._video_keys = frozenset(video_memory_shapes(config))
        self._mlp_depths = {
            r"vision_encoder\.backbone\.blocks\.\d+\.mlp": 2,
            r"mask_decoder\.transformer\.layers\.\d+\.mlp": 2,
            r"mask_decoder\.output_hypernetworks_mlps\.\d+": 3,
            r"mask_decoder\.iou_prediction_head": config.iou_head_depth,
            r"mask_decoder\.pred_obj_score_head": 3,
        }

    # -- images -------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        return transforms.sam2_preprocess(image, self.image_size)

    def input_hw(self, height: int, width: int) -> tuple[int, int]:
        return self.image_size, self.image_size

    def encode_image(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """`image_embeddings` (B, C, S/16, S/16) with `no_mem_embed` added, and the decoder's
        high-resolution inputs `high_res_feat_s0` (B, C/8, S/4, S/4), `high_res_feat_s1` (B, C/4, S/8, S/8)."""
        level0, level1, level2 = self.vision_encoder(pixels).fpn_hidden_states
        return {
            "image_embeddings": level2 + self.no_memory_embedding.reshape(1, -1, 1, 1),
            "high_res_feat_s0": self.mask_decoder.conv_s0(level0),
            "high_res_feat_s1": self.mask_decoder.conv_s1(level1),
        }

    def postprocess(self, low_res: torch.Tensor, resize_hw: tuple[int, int],
                    original_hw: tuple[int, int]) -> torch.Tensor:
        """Low-res logits (N, K, 4h, 4w) -> float logits at the original size (N, K, H, W): one bilinear
        resize, as the reference (`resize_hw` is the unpadded S x S and plays no part)."""
        return transforms.postprocess_masks(low_res.float(), resize_hw, original_hw, self.image_size, padded=False)

    # -- prompts ------------------------------------------------------------------------------
    def image_positional_encoding(self, height: int, width: int) -> torch.Tensor:
        """Random-Fourier encoding of the embedding grid at cell centres: (1, C, h, w)."""
        return grid_positional_encoding(self.prompt_encoder.shared_embedding, height, width)

    def mask_decoder_outputs(self, features: dict[str, torch.Tensor], image_index: torch.Tensor,
                             prompt: torch.Tensor, multimask_output: bool = True) -> tuple[torch.Tensor, ...]:
        """The decoder's raw outputs for prompts (N, 1, C) of images `image_index` (N,): mask logits
        (N, K, 4h, 4w), IoU predictions (N, K), mask tokens (N, K, C), object-score logits (N, 1);
        K = the multimask tokens, or mask token 0 alone when `multimask_output` is False."""
        emb = features["image_embeddings"].index_select(0, image_index)
        n, c, h, w = emb.shape
        high_res = [features[k].index_select(0, image_index) for k in ("high_res_feat_s0", "high_res_feat_s1")]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, c, 1, 1).expand(n, c, h, w)
        pe = self.image_positional_encoding(h, w).to(emb.dtype).expand(n, c, h, w)
        masks, iou, tokens, object_score = self.mask_decoder(
            image_embeddings=emb, image_positional_embeddings=pe,
            sparse_prompt_embeddings=prompt.reshape(n, 1, -1, c), dense_prompt_embeddings=dense,
            multimask_output=multimask_output, high_resolution_features=high_res,
        )
        return masks[:, 0], iou[:, 0], tokens[:, 0], object_score[:, 0]

    def decode(self, features: dict[str, torch.Tensor], image_index: torch.Tensor, prompt: torch.Tensor,
               multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt (N, 1, C), one per expression; image_index (N,) its image. Returns the mask of highest
        predicted IoU among the multimask outputs, (N, 1, 4h, 4w) and (N, 1), or with
        `multimask_output` all of them, (N, K, 4h, 4w) and (N, K)."""
        masks, iou, _, _ = self.mask_decoder_outputs(features, image_index, prompt, multimask_output=True)
        if multimask_output:
            return masks, iou
        best = iou.argmax(dim=1, keepdim=True)  # the reference's argsort(descending)[:, :1]
        return masks.gather(1, best[:, :, None, None].expand(-1, -1, *masks.shape[-2:])), iou.gather(1, best)

    # -- checkpoint keys ----------------------------------------------------------------------
    def from_reference_key(self, key: str) -> str:
        if key in self._video_keys:
            return _VIDEO + video_key_from_reference(key)
        key = _swap_prefix(key, to_reference=False)
        for pattern, repl in _INFIXES_FROM_REFERENCE:
            key = re.sub(pattern, repl, key)
        for prefix, depth in self._mlp_depths.items():
            key = re.sub(rf"^({prefix})\.layers\.(\d+)\.", _mlp_rename(depth, to_reference=False), key)
        return key

    def to_reference_key(self, key: str) -> str:
        if key.startswith(_VIDEO):
            return video_key_to_reference(key[len(_VIDEO):])
        for prefix, depth in self._mlp_depths.items():
            key = re.sub(rf"^({prefix})\.(proj_in|proj_out|layers\.\d+)\.", _mlp_rename(depth, True), key)
        for pattern, repl in _INFIXES_TO_REFERENCE:
            key = re.sub(pattern, repl, key)
        return _swap_prefix(key, to_reference=True)

    def from_reference_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """As the base class, and the reference's one-row `point_embeddings.{i}` stacked into
        transformers' `point_embed` table."""
        rows = {int(m.group(1)): v for k, v in state.items() if (m := _POINT_EMBEDDING.match(k))}
        out = {self.from_reference_key(k): v for k, v in state.items() if not _POINT_EMBEDDING.match(k)}
        if rows:
            if sorted(rows) != list(range(len(rows))):
                raise ValueError(f"point_embeddings rows {sorted(rows)} are not 0..{len(rows) - 1}")
            out[_POINT_EMBED] = torch.cat([rows[i] for i in range(len(rows))], dim=0)
        return out

    def to_reference_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {self.to_reference_key(k): v for k, v in state.items() if k != _POINT_EMBED}
        if _POINT_EMBED in state:
            for i, row in enumerate(state[_POINT_EMBED].split(1, dim=0)):
                out[f"sam_prompt_encoder.point_embeddings.{i}.weight"] = row.clone()  # no shared storage
        return out
