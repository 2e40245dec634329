"""The model of a run config: its size (`model_size`), built with its pretrained weights, LoRA layers
and activation checkpointing (`build_configured_model`), optionally compiled (`compile_model`).

Training, evaluation, prediction, the embedding cache and the benchmarks build their model here, so
none of them needs the LightningModule (or Lightning) to get one."""

from __future__ import annotations

from pathlib import Path

import torch

from evfsam_lightning.config import ModelConfig, RunConfig
from evfsam_lightning.models import checkpoints as ck
from evfsam_lightning.models.builders import EvfSamConfig, build_model, model_config
from evfsam_lightning.models.lora import add_lora


def model_size(m: ModelConfig) -> EvfSamConfig:
    """The `EvfSamConfig` of a run's model section (`auto`: the pretrained folder's config.json)."""
    if m.size == "auto":
        return ck.folder_model_config(m.pretrained)
    return model_config(dict(m.dims)) if m.size == "custom" else model_config(m.size)


def compile_model(model) -> None:
    """`torch.compile` the compute-heavy blocks in place (`nn.Module.compile`, so parameter names and
    checkpoint keys stay as they are): the SAM image encoder as one graph (fixed input size) and
    each BEiT-3 layer (the sequence length varies with the expressions; one layer's graph serves all
    layers)."""
    model.visual_model.vision_encoder.compile()
    for layer in model.beit3.encoder.layers:
        layer.compile()


def add_configured_lora(model, cfg: RunConfig):
    """LoRA layers as the run config asks (none when model.lora.rank is 0)."""
    lora = cfg.model.lora
    if lora.rank:
        add_lora(model, lora.rank, lora.alpha, lora.targets)
    return model


def build_configured_model(cfg: RunConfig, device: str | torch.device | None = None):
    """The model of a run config with its pretrained weights loaded (pretrained folder, then SAM and
    BEiT-3 checkpoints, each reporting its keys), and its LoRA layers if any."""
    m = cfg.model
    # Parts a checkpoint below fills completely are built without memory and take its tensors.
    meta = ("beit3", "sam") if m.pretrained else tuple(
        part for part, path in (("beit3", m.beit3_checkpoint), ("sam", m.sam_checkpoint)) if path)
    model = build_model(model_size(m), device=device, gradient_checkpointing=m.activation_checkpointing,
                        presence_head=m.presence_head, meta_parts=meta)
    if m.presence_head:
        model.presence_head.threshold.fill_(m.presence_threshold)
    if m.pretrained:
        folder = Path(m.pretrained)
        # A released checkpoint has no presence head: it starts freshly initialised.
        ck.load_reference_weights(model, ck._weights_file(folder), allow_missing=("presence",) if m.presence_head else ())
        if m.presence_head and (folder / ck.PRESENCE_FILE).is_file():
            ck.load_presence_head(model, folder / ck.PRESENCE_FILE)
            model.presence_head.threshold.fill_(m.presence_threshold)
    if m.sam_checkpoint:
        path = Path(m.sam_checkpoint)
        (ck.load_hf_sam_checkpoint if path.is_dir() else ck.load_sam_checkpoint)(model, path)
    if m.beit3_checkpoint:
        ck.load_beit3_checkpoint(model, m.beit3_checkpoint)
    # built without memory on purpose (an explicit or an ambient `torch.device("meta")`, e.g. FLOP counting)
    on_meta = (torch.device(device) if device is not None else torch.empty(()).device).type == "meta"
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left and not on_meta:  # a checkpoint that lacked part of what it was to fill (load_into names missing keys first)
        raise ck.CheckpointError(f"model.pretrained / sam_checkpoint / beit3_checkpoint leave {len(left)} tensors "
                                 f"unset: {', '.join(left[:10])}")
    if device is not None and not on_meta:
        model.to(device)  # the checkpoints' tensors were taken as they were read, on the CPU
    if m.activation_checkpointing and m.mode == "full" and hasattr(model.visual_model.vision_encoder,
                                                                    "gradient_checkpointing_enable"):
        model.visual_model.vision_encoder.gradient_checkpointing_enable({"use_reentrant": False})
    return add_configured_lora(model, cfg)
