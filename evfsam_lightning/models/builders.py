"""Named model sizes and the one place that turns dimensions into an `EvfSam`.

The numbers live here, not in the modules: `evf-sam` is SAM ViT-H + BEiT-3 large (the released
EVF-SAM), `evf-sam-beit3-base` swaps in BEiT-3 base, `evf-sam2` is SAM-2 Hiera-L + BEiT-3 large (the
released EVF-SAM2), `tiny` and `tiny-sam2` are CPU-sized models for tests and the quickstart. Any
other dimensions come from a config dict (e.g. a fixture manifest or a recipe).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from evfsam_lightning.models.beit3 import Beit3, Beit3Config
from evfsam_lightning.models.evfsam import EvfSam
from evfsam_lightning.models.sam import Sam1Backbone, Sam1Config
from evfsam_lightning.models.sam2 import Sam2Backbone, Sam2Config

BEIT3_LARGE = Beit3Config()
BEIT3_BASE = Beit3Config(embed_dim=768, depth=12, num_heads=12, ffn_dim=3072)
SAM_VIT_H = Sam1Config()
SAM_VIT_L = Sam1Config(encoder_dim=1024, encoder_depth=24, encoder_heads=16, global_attn_indexes=[5, 11, 17, 23])
SAM_VIT_B = Sam1Config(encoder_dim=768, encoder_depth=12, encoder_heads=12, global_attn_indexes=[2, 5, 8, 11])
SAM2_HIERA_L = Sam2Config()
TINY_BEIT3 = Beit3Config(embed_dim=128, depth=4, num_heads=4, ffn_dim=256, vocab_size=512, image_size=128,
                         patch_size=16, max_text_positions=128)


@dataclass
class EvfSamConfig:
    """Everything needed to build an EVF-SAM model."""

    family: str = "sam"  # "sam" (EVF-SAM, SAM-1) or "sam2" (EVF-SAM2)
    beit3: Beit3Config = field(default_factory=Beit3Config)
    sam: Any = field(default_factory=Sam1Config)

    def to_dict(self) -> dict:
        return {"family": self.family, "beit3": dataclasses.asdict(self.beit3), "sam": dataclasses.asdict(self.sam)}

    @classmethod
    def from_dict(cls, d: dict) -> EvfSamConfig:
        """Build from a dict with `family`, `beit3` and `sam` sections; unknown keys are errors."""
        unknown = set(d) - {"family", "beit3", "sam"}
        if unknown:
            raise ValueError(f"model config: unknown keys {sorted(unknown)} (allowed: family, beit3, sam)")
        family = d.get("family", "sam")
        sam_cls = sam_config_class(family)
        return cls(family=family, beit3=_dataclass_from(Beit3Config, d.get("beit3", {}), "beit3"),
                   sam=_dataclass_from(sam_cls, d.get("sam", {}), "sam"))


def _dataclass_from(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"model config: unknown keys {sorted(unknown)} in `{where}` (allowed: {sorted(names)})")
    return cls(**values)


def sam_config_class(family: str):
    if family == "sam":
        return Sam1Config
    if family == "sam2":
        return Sam2Config
    raise ValueError(f"unknown SAM family {family!r} (allowed: sam, sam2)")


MODEL_SIZES: dict[str, EvfSamConfig] = {
    "evf-sam": EvfSamConfig(beit3=BEIT3_LARGE, sam=SAM_VIT_H),
    "evf-sam-beit3-base": EvfSamConfig(beit3=BEIT3_BASE, sam=SAM_VIT_H),
    # CPU-sized (about 1.8M parameters), shaped after the quickstart calibration on 2 CPU threads.
    "tiny": EvfSamConfig(
        beit3=TINY_BEIT3,
        sam=Sam1Config(image_size=128, patch_size=8, encoder_dim=64, encoder_depth=2, encoder_heads=2,
                       global_attn_indexes=[0, 1], window_size=4, prompt_dim=64, decoder_heads=4,
                       decoder_mlp_dim=256, iou_head_hidden_dim=64),
    ),
    # SAM-2 Hiera-L (sam2_hiera_l.yaml) with its memory modules (run by the video tracker, never trained).
    "evf-sam2": EvfSamConfig(family="sam2", beit3=BEIT3_LARGE, sam=SAM2_HIERA_L),
    "tiny-sam2": EvfSamConfig(family="sam2", beit3=TINY_BEIT3, sam=Sam2Config(
        image_size=256, embed_dim=16, num_heads=1, stages=[1, 1, 2, 1], global_attn_blocks=[3],
        window_spec=[8, 4, 8, 4], prompt_dim=32, decoder_heads=4, decoder_mlp_dim=64, iou_head_hidden_dim=32,
        mem_dim=16, memory_attention_layers=1, memory_attention_ffn_dim=64, memory_fuser_layers=1)),
}


def model_config(name_or_dict: str | dict | EvfSamConfig) -> EvfSamConfig:
    """A named size, a dict of dimensions, or a config passed through."""
    if isinstance(name_or_dict, EvfSamConfig):
        return name_or_dict
    if isinstance(name_or_dict, str):
        if name_or_dict not in MODEL_SIZES:
            raise ValueError(f"unknown model size {name_or_dict!r} (known: {', '.join(MODEL_SIZES)})")
        return dataclasses.replace(MODEL_SIZES[name_or_dict])
    return EvfSamConfig.from_dict(dict(name_or_dict))


def build_backbone(cfg: EvfSamConfig):
    if cfg.family == "sam":
        return Sam1Backbone(cfg.sam)
    return Sam2Backbone(cfg.sam)


#: The parts `build_model` can leave on the meta device (`meta_parts`) for a checkpoint to fill.
META_PARTS = ("beit3", "sam")


def build_model(config: str | dict | EvfSamConfig, device: str | torch.device | None = None,
                gradient_checkpointing: bool = False, presence_head: bool = False,
                meta_parts: tuple[str, ...] = ()) -> EvfSam:
    """Build an `EvfSam` with freshly initialised weights; `device="meta"` builds without memory.
    `presence_head` adds the optional no-target head (not part of the reference model).
    `meta_parts` ("beit3", "sam") builds those parts on the meta device, for a checkpoint that holds
    all of their tensors (`checkpoints.load_into` gives them the file's tensors): at full size this
    skips initialising weights that are overwritten at once (about 20 s and one copy of 2.5 GB each).
    The other parts draw from the random stream as it stands (the same seed gives the same values;
    not the values of a build without `meta_parts`, whose skipped initialisations draw too)."""
    cfg = model_config(config)
    unknown = set(meta_parts) - set(META_PARTS)
    if unknown:
        raise ValueError(f"meta_parts {sorted(unknown)}: known parts are {META_PARTS}")

    def on(part: str | None):
        where = "meta" if part in meta_parts else device
        return torch.device(where) if where is not None else contextlib.nullcontext()

    with on("beit3"):
        beit3 = Beit3(cfg.beit3, gradient_checkpointing)
    with on("sam"):
        visual_model = build_backbone(cfg)
    with on(None):
        model = EvfSam(beit3=beit3, visual_model=visual_model, presence_head=presence_head)
    model.config = cfg
    return model
