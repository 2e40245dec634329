"""Which parameters train: the modes of the recipes plus explicit freeze/unfreeze lists.

Frozen parameters get `requires_grad=False`, stay out of the optimizer, and their modules run in
eval mode under no-grad where the whole module is frozen (the SAM image encoder in the reference
set). Parameters that the text-prompted path never uses are always frozen: giving them
`requires_grad` would make DDP wait for gradients that never come.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from evfsam_lightning.models.lora import is_lora_parameter

BEIT3 = "mm_extractor."

#: Never used by the text-prompted loss (point/box/mask prompts, masked-image-modelling token,
#: SAM's constant Fourier matrix, and the IoU head, whose prediction the mask loss does not read:
#: in the reference it receives no gradient either).
UNUSED = {
    "sam": ("mm_extractor.beit3.vision_embed.mask_token", "visual_model.prompt_encoder.point_embed.",
            "visual_model.mask_decoder.iou_prediction_head.",
            "visual_model.prompt_encoder.not_a_point_embed.", "visual_model.prompt_encoder.mask_embed.",
            "visual_model.prompt_encoder.shared_embedding.positional_embedding"),
    # SAM-2 is frozen in EVF-SAM2; listed so an explicit unfreeze of these is refused.
    "sam2": ("mm_extractor.beit3.vision_embed.mask_token", "visual_model.video_memory.",
             "visual_model.mask_decoder.pred_obj_score_head.", "visual_model.mask_decoder.iou_prediction_head."),
}

#: The trainable set of each mode, as name prefixes.
MODES = {
    ("sam", "frozen_image_encoder"): ("mm_extractor.", "text_hidden_fcs.", "visual_model.prompt_encoder.no_mask_embed.",
                                      "visual_model.mask_decoder.", "presence_head."),
    ("sam", "full"): ("",),
    ("sam2", "frozen_image_encoder"): ("mm_extractor.", "text_hidden_fcs.", "presence_head."),
    ("sam2", "full"): ("mm_extractor.", "text_hidden_fcs.", "presence_head."),
}


def unused_prefixes(family: str) -> tuple[str, ...]:
    return UNUSED.get(family, UNUSED["sam"])


def apply_trainable(model: nn.Module, family: str, mode: str, freeze: Sequence[str] = (),
                    unfreeze: Sequence[str] = (), lora: bool = False) -> dict[str, list[str]]:
    """Set requires_grad on every parameter; returns {"trainable": [...], "frozen": [...]}.

    Order: the mode's set (with `lora`, BEiT-3 trains through its LoRA tensors only), minus
    `freeze`, plus `unfreeze`; the unused parameters are always frozen.
    A prefix in freeze/unfreeze that matches no parameter is an error (a typo would silently train
    or freeze the wrong thing)."""
    if (family, mode) not in MODES:
        raise ValueError(f"no trainable set for family {family!r} and mode {mode!r}")
    names = [n for n, _ in model.named_parameters()]
    for label, prefixes in (("freeze", freeze), ("unfreeze", unfreeze)):
        for p in prefixes:
            if not any(n.startswith(p) for n in names):
                raise ValueError(f"model.{label}: prefix {p!r} matches no parameter")
    unused = unused_prefixes(family)
    for p in unfreeze:
        hit = [n for n in names if n.startswith(p) and n.startswith(unused)]
        if hit:
            raise ValueError(f"model.unfreeze: {hit[0]} is never used by the text-prompted forward; it cannot train")
    trainable, frozen = [], []
    for name, param in model.named_parameters():
        on = name.startswith(MODES[(family, mode)])
        if lora and name.startswith(BEIT3):
            on = on and is_lora_parameter(name)
        on = (on and not name.startswith(tuple(freeze))) or name.startswith(tuple(unfreeze))
        on = on and not name.startswith(unused)
        param.requires_grad_(on)
        (trainable if on else frozen).append(name)
    return {"trainable": trainable, "frozen": frozen}


def fully_frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Top-level image-encoder modules whose every parameter is frozen: they run in eval mode, no grad."""
    return [m for m in model.visual_model.image_encoder() if not any(p.requires_grad for p in m.parameters())]
