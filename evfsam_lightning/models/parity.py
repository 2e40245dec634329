"""Pieces shared by the parity checks of both SAM families (`tools/check_parity.py`): the BEiT-3
dimensions of a fixture manifest, the reference training step, and the report they write to."""

from __future__ import annotations

from typing import Protocol

import torch

from evfsam_lightning.models.evfsam import EvfOutput, EvfSam
from evfsam_lightning.training.losses import mask_loss


class ParityReport(Protocol):
    """Rows of a parity table (implemented by `tools/check_parity.py`'s `Report`)."""

    def exact(self, name: str, ours, golden) -> None: ...

    def close(self, name: str, ours: torch.Tensor, golden: torch.Tensor, tol: float = ...) -> None: ...

    def relative(self, name: str, ours: torch.Tensor, golden: torch.Tensor, rtol: float = ...) -> None: ...

    def mask(self, name: str, ours: torch.Tensor, golden: torch.Tensor, logits: torch.Tensor, tol: float) -> None: ...


def beit3_config_from_manifest(manifest: dict) -> dict:
    """Our BEiT-3 config dict from the torchscale EncoderConfig a fixture manifest records."""
    enc = manifest["architecture"]["beit3"]["encoder_config"]
    return {
        "embed_dim": enc["encoder_embed_dim"], "depth": enc["encoder_layers"],
        "num_heads": enc["encoder_attention_heads"], "ffn_dim": enc["encoder_ffn_embed_dim"],
        "vocab_size": enc["vocab_size"], "image_size": enc["img_size"], "patch_size": enc["patch_size"],
        "max_text_positions": enc["max_source_positions"], "layer_norm_eps": enc.get("layernorm_eps", 1e-5),
    }


def check_text_path(model: EvfSam, beit_out: torch.Tensor, io: dict[str, torch.Tensor],
                    inter: dict[str, torch.Tensor], report: ParityReport) -> torch.Tensor:
    """BEiT-3's output, its first token and the projected prompt (the sparse embedding) against the
    fixture; returns the prompt."""
    if "beit3.encoder_out" in inter:
        report.close("beit3.encoder_out", beit_out, inter["beit3.encoder_out"])
    report.close("beit3_feature", beit_out[:, :1], io["beit3_feature"])
    prompt = model.text_hidden_fcs[0](beit_out[:, :1])
    report.close("prompt_embedding", prompt, io["prompt_embedding"])
    report.close("sparse_embeddings", prompt, io["sparse_embeddings"])
    return prompt


def check_training(model: EvfSam, io: dict[str, torch.Tensor], manifest: dict, report: ParityReport,
                   resize_hw: torch.Tensor) -> tuple[EvfOutput, dict[str, torch.Tensor], torch.Tensor]:
    """The reference training forward (SAM frozen, its image features computed without gradients),
    the loss and its parts, and the gradients of the projector (and their norms) after backward.
    `resize_hw` (2,) is the SAM input size of the fixture image. Returns the forward's output, the
    image features and the image index of each expression, for family-specific rows."""
    model.train()
    for p in model.visual_model.parameters():
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    offset = io["train_offset"]
    n = int(offset[-1])
    counts = (offset[1:] - offset[:-1]).tolist()
    image_index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    batch = {
        "sam_pixel_values": io["sam_pixel_values"].expand(len(counts), -1, -1, -1),
        "beit_pixel_values": io["beit_pixel_values"].expand(len(counts), -1, -1, -1),
        "input_ids": io["train_input_ids"], "attention_mask": io["train_attention_masks"].bool(),
        "image_index": image_index,
        "resize_hw": resize_hw.expand(len(counts), 2),
        "original_hw": io["original_size_hw"].expand(len(counts), 2),
    }
    with torch.no_grad():
        frozen_feats = model.encode_images(batch["sam_pixel_values"])
    out = model(batch, image_features=frozen_feats)
    feature = model.fusion_feature(batch["beit_pixel_values"].index_select(0, image_index),
                                   batch["input_ids"], batch["attention_mask"])
    report.close("train_beit3_feature", feature, io["train_beit3_feature"])
    report.close("train_prompt_embeddings", out.prompt_embeddings, io["train_prompt_embeddings"])
    report.close("train_low_res_masks", out.low_res_logits, io["train_low_res_masks"])
    targets = list(io["gt_masks"][:n].split(counts))
    w = manifest.get("results", {}).get("loss_weights", {})
    losses = mask_loss(out.logits, targets, w.get("bce_loss_weight", 2.0), w.get("dice_loss_weight", 0.5))
    report.relative("loss", losses["loss"], io["loss"])
    report.relative("mask_bce_loss", losses["bce"], io["mask_bce_loss"])
    report.relative("mask_dice_loss", losses["dice"], io["mask_dice_loss"])
    losses["loss"].backward()
    named = dict(model.named_parameters())
    for key in sorted(k for k in io if k.startswith("grad.")):
        name = key[len("grad."):]
        grad = named[name].grad
        report.close(key, grad if grad is not None else torch.zeros_like(named[name]), io[key])

    def norm(prefix: str) -> torch.Tensor:
        grads = [p.grad.double().pow(2).sum() for k, p in named.items() if k.startswith(prefix) and p.grad is not None]
        return torch.stack(grads).sum().sqrt()

    report.close("projector_grad_norm", norm("text_hidden_fcs."), io["projector_grad_norm"])
    if "mm_extractor_grad_norm" in io:
        report.close("mm_extractor_grad_norm", norm("mm_extractor."), io["mm_extractor_grad_norm"])
    return out, frozen_feats, image_index
