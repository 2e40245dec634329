"""SAM backbones behind one small interface, so EVF-SAM (SAM-1) and EVF-SAM2 (SAM-2) share the
rest of the model.

A backbone turns preprocessed images into features (`encode_image`), turns one prompt embedding
per expression into low-resolution mask logits (`decode`), brings logits back to the original image
(`postprocess`), and maps state-dict keys to and from the official (reference) names.

SAM-1 uses the well-kept modules of `transformers.models.sam`: they reach parity with the reference
once the mask decoder's LayerNorm eps is 1e-5 (the reference two-way transformer's value;
transformers defaults to 1e-6).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from evfsam_lightning.data import transforms


class SamBackbone(nn.Module):
    """Interface of a SAM family. Subclasses set `family`, `image_size`, `prompt_dim`."""

    family: str
    image_size: int
    prompt_dim: int
    #: attribute names of the sub-modules that make up the image encoder (frozen in the reference set)
    image_encoder_names: tuple[str, ...] = ()
    #: state-dict prefixes of every tensor that `encode_image` reads (what an embedding cache depends on)
    image_feature_prefixes: tuple[str, ...] = ()
    #: the keys of the dict that `encode_image` returns
    image_feature_names: tuple[str, ...] = ()

    def image_feature_state(self) -> dict[str, torch.Tensor]:
        """The parameters and buffers that `encode_image` reads, by state-dict name."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.image_feature_prefixes)}

    def input_hw(self, height: int, width: int) -> tuple[int, int]:
        """The (h', w') that preprocessing resizes an (H, W) image to (its unpadded part of S x S)."""
        raise NotImplementedError

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, features: dict[str, torch.Tensor], image_index: torch.Tensor, prompt: torch.Tensor,
               multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def postprocess(self, low_res: torch.Tensor, resize_hw, original_hw) -> torch.Tensor:
        raise NotImplementedError

    def from_reference_key(self, key: str) -> str:
        raise NotImplementedError

    def to_reference_key(self, key: str) -> str:
        raise NotImplementedError

    def from_reference_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official SAM-part tensors (keys without `visual_model.`) under our names. One tensor per
        key here; a family whose modules merge or split reference tensors overrides this."""
        return {self.from_reference_key(k): v for k, v in state.items()}

    def to_reference_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of `from_reference_state`."""
        return {self.to_reference_key(k): v for k, v in state.items()}

    def image_encoder(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.image_encoder_names]


def grid_positional_encoding(embedding: nn.Module, height: int, width: int) -> torch.Tensor:
    """Random-Fourier encoding (transformers' SAM/SAM-2 `shared_embedding`) of the cell centres of an
    (height, width) grid: (1, C, height, width)."""
    table = embedding.positional_embedding
    ys = (torch.arange(height, device=table.device, dtype=table.dtype) + 0.5) / height
    xs = (torch.arange(width, device=table.device, dtype=table.dtype) + 0.5) / width
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
    return embedding(grid).permute(2, 0, 1).unsqueeze(0)


@dataclass
class Sam1Config:
    """Dimensions of SAM-1 (defaults: ViT-H as used by EVF-SAM)."""

    image_size: int = 1024
    patch_size: int = 16
    encoder_dim: int = 1280
    encoder_depth: int = 32
    encoder_heads: int = 16
    global_attn_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    mask_in_chans: int = 16

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


def _hf_sam_config(cfg: Sam1Config):
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(
        hidden_size=cfg.encoder_dim, output_channels=cfg.prompt_dim, num_hidden_layers=cfg.encoder_depth,
        num_attention_heads=cfg.encoder_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        mlp_ratio=float(cfg.mlp_ratio), window_size=cfg.window_size, global_attn_indexes=list(cfg.global_attn_indexes),
        num_pos_feats=cfg.prompt_dim // 2,
    )
    prompt = SamPromptEncoderConfig(hidden_size=cfg.prompt_dim, image_size=cfg.image_size,
                                    patch_size=cfg.patch_size, mask_input_channels=cfg.mask_in_chans)
    decoder = SamMaskDecoderConfig(
        hidden_size=cfg.prompt_dim, mlp_dim=cfg.decoder_mlp_dim, num_hidden_layers=cfg.decoder_depth,
        num_attention_heads=cfg.decoder_heads, num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        layer_norm_eps=1e-5,  # the reference TwoWayTransformer uses nn.LayerNorm's default
    )
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    for sub in (config, vision, prompt, decoder, config.vision_config, config.mask_decoder_config):
        sub._attn_implementation = "sdpa"  # fused attention; modules built standalone get no dispatch otherwise
    return config


_TEMPLATE_FIELDS = {"{i}": r"(\d+)", "{attn}": r"(self_attn|cross_attn_image)", "{path}": r"(.+)"}


def template_renames(table: str, to_reference: bool) -> list[tuple[str, str]]:
    """`re.sub` (pattern, replacement) pairs, in order, from one table of key templates (a line
    each: the official template, then ours, separated by spaces), for either direction. A template matches from the start of a key; `{i}` is an index,
    `{attn}` an attention block, `{path}` any dotted path (the same fields, in the same order, on
    both sides); a trailing `$` makes it match a whole key."""
    out = []
    for official, ours in (line.split() for line in table.strip().splitlines()):
        src, dst = (ours, official) if to_reference else (official, ours)
        end = "$" if src.endswith("$") else ""
        pattern, replacement, n = "^", "", 0
        for part in re.split(r"(\{\w+\})", src.removesuffix("$")):
            pattern += _TEMPLATE_FIELDS[part] if part in _TEMPLATE_FIELDS else re.escape(part)
        for part in re.split(r"(\{\w+\})", dst.removesuffix("$")):
            if part in _TEMPLATE_FIELDS:
                n += 1
                replacement += rf"\g<{n}>"
            else:
                replacement += part
        out.append((pattern + end, replacement))
    return out


def _mlp_rename(depth: int, to_reference: bool):
    """transformers' SamFeedForward names its layers proj_in / layers.0..d-3 / proj_out; the
    reference MLP names them layers.0..d-1."""
    def ref_to_ours(i: int) -> str:
        return "proj_in" if i == 0 else "proj_out" if i == depth - 1 else f"layers.{i - 1}"

    if not to_reference:
        return lambda m: f"{m.group(1)}.{ref_to_ours(int(m.group(2)))}."
    inverse = {ref_to_ours(i): f"layers.{i}" for i in range(depth)}
    return lambda m: f"{m.group(1)}.{inverse[m.group(2)]}."


class Sam1Backbone(SamBackbone):
    """SAM-1: ViT image encoder with windowed + global attention, prompt encoder, two-way mask decoder."""

    family = "sam"
    image_encoder_names = ("vision_encoder",)
    image_feature_prefixes = ("vision_encoder.",)
    image_feature_names = ("image_embeddings",)

    # (reference pattern, ours) in the order they apply; inverse rules are derived below.
    _RENAMES = [
        (r"^image_encoder\.", "vision_encoder."),
        (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
        (r"^(vision_encoder\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
        (r"^vision_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
        (r"^vision_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
        (r"^vision_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
        (r"^vision_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
        (r"^vision_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
        (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
         "prompt_encoder.shared_embedding.positional_embedding"),
        (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
        (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
        (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
        (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
        (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
        (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
        (r"^(mask_decoder\.transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
        (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
        (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
        (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
        (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    ]

    def __init__(self, config: Sam1Config):
        super().__init__()
        from transformers.models.sam.modeling_sam import SamMaskDecoder, SamPromptEncoder, SamVisionEncoder

        self.config = config
        self.image_size = config.image_size
        self.prompt_dim = config.prompt_dim
        hf = _hf_sam_config(config)
        self.vision_encoder = SamVisionEncoder(hf.vision_config)
        self.prompt_encoder = SamPromptEncoder(hf)
        self.mask_decoder = SamMaskDecoder(hf.mask_decoder_config)
        # A buffer in the reference: a constant random projection, never trained.
        self.prompt_encoder.shared_embedding.positional_embedding.requires_grad_(False)
        self._mlp_depths = {r"mask_decoder\.output_hypernetworks_mlps\.\d+": 3,
                            r"mask_decoder\.iou_prediction_head": config.iou_head_depth}

    # -- images -------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        return transforms.sam_preprocess(image, self.image_size)

    def input_hw(self, height: int, width: int) -> tuple[int, int]:
        return transforms.sam_resize_hw(height, width, self.image_size)

    def encode_image(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_embeddings": self.vision_encoder(pixels).last_hidden_state}

    def postprocess(self, low_res: torch.Tensor, resize_hw, original_hw) -> torch.Tensor:
        return transforms.postprocess_masks(low_res, resize_hw, original_hw, self.image_size, padded=True)

    # -- prompts ------------------------------------------------------------------------------
    def image_positional_encoding(self, height: int, width: int) -> torch.Tensor:
        """Random-Fourier encoding of the embedding grid at cell centres: (1, C, h, w)."""
        return grid_positional_encoding(self.prompt_encoder.shared_embedding, height, width)

    def decode(self, features: dict[str, torch.Tensor], image_index: torch.Tensor, prompt: torch.Tensor,
               multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt (N, 1, C), one per expression; image_index (N,) its image. Returns low-res logits
        (N, K, 4h, 4w) and IoU predictions (N, K): K = 1 (mask token 0) or the multimask tokens."""
        emb = features["image_embeddings"]
        n = prompt.shape[0]
        _, c, h, w = emb.shape
        emb = emb.index_select(0, image_index)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, c, 1, 1).expand(n, c, h, w)
        pe = self.image_positional_encoding(h, w).to(emb.dtype).expand(n, c, h, w)
        masks, iou = self.mask_decoder(
            image_embeddings=emb, image_positional_embeddings=pe,
            sparse_prompt_embeddings=prompt.reshape(n, 1, -1, c),
            dense_prompt_embeddings=dense, multimask_output=multimask_output,
        )
        return masks[:, 0], iou[:, 0]

    # -- checkpoint keys ----------------------------------------------------------------------
    def from_reference_key(self, key: str) -> str:
        for pattern, repl in self._RENAMES:
            key = re.sub(pattern, repl, key)
        for prefix, depth in self._mlp_depths.items():
            key = re.sub(rf"^({prefix})\.layers\.(\d+)\.", _mlp_rename(depth, to_reference=False), key)
        return key

    def to_reference_key(self, key: str) -> str:
        for prefix, depth in self._mlp_depths.items():
            key = re.sub(rf"^({prefix})\.(proj_in|proj_out|layers\.\d+)\.", _mlp_rename(depth, True), key)
        for pattern, repl in reversed(self._RENAMES):
            key = _invert(pattern, repl, key)
        return key


def _invert(pattern: str, repl: str, key: str) -> str:
    """Apply a reference->ours rename backwards (rules are simple prefix swaps or one group)."""
    if "\\1" in repl:  # ...norm(\d) -> ...layer_norm\2: handled by a dedicated inverse
        if "layer_norm" in repl:
            prefix = pattern.split("(")[1].split(")")[0]
            return re.sub(rf"^({prefix})\.layer_norm(\d)\.", r"\1.norm\2.", key)
        raise AssertionError(repl)
    src = pattern.lstrip("^").rstrip("$").replace("\\.", ".")
    if repl.endswith(".") or pattern.endswith("$"):
        if key.startswith(repl) and (not pattern.endswith("$") or key == repl):
            return src + key[len(repl):]
    return key
