"""The data module's two inputs from a run config: its data section, resolved, and the settings
that come from the model, trainer and run (`data.settings.PipelineSettings`)."""

from __future__ import annotations

import dataclasses

from evfsam_lightning.config import ConfigError, DataConfig, RunConfig, SourceConfig
from evfsam_lightning.data.settings import PipelineSettings
from evfsam_lightning.training.preflight import tokenizer_setting
from evfsam_lightning.training.synthetic import ensure_synthetic


def data_for_run(cfg: RunConfig, model_cfg) -> tuple[DataConfig, PipelineSettings]:
    """`cfg.data` with the synthetic sources filled in (where `data.train` / `data.val` are empty)
    and `data.sam_resize` resolved, and the settings from the model (`model_cfg`: its dimensions),
    the trainer's micro-batch, the run's seed and tokenizer."""
    d = cfg.data
    train, val = d.train, d.val
    setting = tokenizer_setting(cfg)  # its folder and sentencepiece model are checked by preflight()
    tokenizer = setting[1] if setting else None
    if d.synthetic is not None:
        root, tok = ensure_synthetic(cfg)
        train = train or [SourceConfig("synthetic", [str(root / "train")])]
        val = val or [SourceConfig("synthetic", [str(root / "val")])]
        tokenizer = tokenizer or str(tok)
    data = dataclasses.replace(d, train=train, val=val, sam_resize=resolve_sam_resize(cfg))
    settings = PipelineSettings(tokenizer=str(tokenizer), batch_size=cfg.trainer.micro_batch_size, seed=cfg.seed,
                                sam_image_size=model_cfg.sam.image_size, sam_variant=model_cfg.family,
                                beit_image_size=model_cfg.beit3.image_size)
    return data, settings


def resolve_sam_resize(cfg: RunConfig) -> str:
    """`data.sam_resize=auto`: "device" when the run trains on a GPU and the installed Pillow's
    resize is reproduced there (`pillow_resize.device_resize_available`), else "worker". On a CPU
    the workers' Pillow (SIMD) is the faster of the two."""
    import torch

    from evfsam_lightning.data.pillow_resize import device_resize_available

    choice = cfg.data.sam_resize
    if choice == "auto":
        accelerator = cfg.trainer.accelerator
        gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        choice = "device" if gpu else "worker"
    if choice == "device" and not device_resize_available():
        if cfg.data.sam_resize == "device":
            raise ConfigError("data.sam_resize=device: the installed Pillow resizes differently from "
                              "pillow_resize's implementation; use data.sam_resize=worker")
        return "worker"
    return choice
