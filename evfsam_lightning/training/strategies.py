"""Recipe -> Lightning strategy: DDP, DeepSpeed ZeRO (2/3, offload, raw JSON) and FSDP2.

All of them also run on CPU with gloo so that CI exercises the real code paths:
- DeepSpeed: Lightning refuses CPU in three places (a CUDA check in `setup_environment`, the
  device-index check in `setup_distributed`, `device_rank=None` given to `deepspeed.initialize`);
  `DeepSpeedAnyDevice` lifts exactly those on CPU and changes nothing on GPUs.
- FSDP2: Lightning's `ModelParallelStrategy` with `fully_shard` applied in the module's
  `configure_model` (see `shard_model`) runs unchanged on CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, Strategy

from evfsam_lightning.config import RunConfig


def refuse_missing_trainable(module: torch.nn.Module, saved_keys, source) -> None:
    """Raise `CheckpointError` naming the trainable parameters of `module` (a LightningModule: keys
    `model.*`) that a checkpoint's saved keys lack. Frozen weights may be absent
    (`checkpoint.save_frozen=false`): they come back from their pretrained source."""
    from evfsam_lightning.models.checkpoints import CheckpointError

    saved = set(saved_keys)
    missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in saved]
    if missing:
        raise CheckpointError(f"checkpoint {source} lacks trainable weights: {', '.join(missing[:10])}"
                              + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))


def deepspeed_module_keys(checkpoint_dir: str | Path) -> set[str]:
    """The module keys a DeepSpeed checkpoint directory saved (from its first model-states file)."""
    folder = Path(checkpoint_dir)
    tag = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else "checkpoint"
    files = sorted((folder / tag).glob("*model_states.pt"))
    if not files:
        from evfsam_lightning.models.checkpoints import CheckpointError

        raise CheckpointError(f"{folder / tag}: no DeepSpeed model-states file")
    return set(torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)["module"])


class DeepSpeedAnyDevice(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, usable on CPU (gloo) as well as CUDA.

    Overrides private methods (`_setup_model_and_optimizer`, `_init_deepspeed_distributed`) on purpose:
    Lightning 2.6.6 refuses CPU inside them and offers no public switch (checked against 2.6.6)."""

    def _on_cpu(self) -> bool:
        return self.root_device.type == "cpu"

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # skips only the CUDA-accelerator check

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """DeepSpeed's load, after refusing (before anything is loaded) a checkpoint that lacks a
        trainable weight. With `exclude_frozen_parameters` the frozen ones are absent and keep the
        values the module was built with: their fp32 pretrained source."""
        refuse_missing_trainable(self.lightning_module, deepspeed_module_keys(checkpoint_path), checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self._on_cpu():
            engine, ds_optimizer = super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        else:
            import deepspeed

            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank),  # CPU devices have no index
                config=self.config, model=model,
                model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
                optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False,
            )
        require_overflow_check(ds_optimizer)
        return engine, ds_optimizer


def require_overflow_check(ds_optimizer) -> None:
    """Make the ZeRO optimizer skip any step whose gradients are not finite, in every precision:
    fp16 and bf16 check already (bf16 unless its JSON turns `check_grad_overflow` off), ZeRO-3
    tests its gradient norm, but fp32 ZeRO-1/2 would apply NaN. A non-finite loss then leaves
    weights and optimizer state untouched (the module confirms and counts it after the step)."""
    if hasattr(ds_optimizer, "check_grad_overflow"):
        ds_optimizer.check_grad_overflow = True
    elif not hasattr(ds_optimizer, "overflow"):
        from evfsam_lightning.config import ConfigError

        raise ConfigError(f"strategy.deepspeed_config: its optimizer ({type(ds_optimizer).__name__}) cannot skip "
                          "a step with non-finite gradients; use ZeRO stage 1, 2 or 3")


#: Parameters that `EvfSam.forward` reads outside their own module's forward (a module's `.weight`
#: used as a tensor). ZeRO-3 gathers a parameter for the module whose forward uses it and again in
#: that module's backward; for these that module is `EvfSam`, whose dataclass output hides its
#: tensors from DeepSpeed's backward hooks, so they are registered with the step's root module.
ZERO3_EXTERNAL_PARAMETERS = ("visual_model.prompt_encoder.no_mask_embed.weight",)


def zero_stage(strategy: Strategy) -> int:
    """The ZeRO stage of a DeepSpeed strategy, 0 for any other strategy."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return 0
    return int(strategy.config.get("zero_optimization", {}).get("stage", 0))


def register_zero3_external_parameters(root: torch.nn.Module, model: torch.nn.Module) -> list[str]:
    """ZeRO-3: keep `ZERO3_EXTERNAL_PARAMETERS` gathered through the forward and backward of `root`
    (the module DeepSpeed's engine calls). Returns the names registered."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    params = dict(model.named_parameters())
    names = [n for n in ZERO3_EXTERNAL_PARAMETERS if n in params]
    for name in names:
        register_external_parameter(root, params[name])
    return names


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed JSON of a recipe (a raw `strategy.deepspeed_config` file wins)."""
    s = cfg.strategy
    if s.deepspeed_config:
        path = Path(s.deepspeed_config)
        try:
            config = json.loads(path.read_text())
            config.setdefault("train_micro_batch_size_per_gpu", cfg.trainer.micro_batch_size)
            return config
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"strategy.deepspeed_config: cannot read {path}: {e}") from e
    zero = {"stage": s.zero_stage, "contiguous_gradients": True, "overlap_comm": torch.cuda.is_available(),
            "reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8)}
    if s.zero_stage == 3:
        zero.update({"stage3_param_persistence_threshold": int(1e5), "stage3_prefetch_bucket_size": int(5e7)})
    if s.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    # The micro-batch is stated: Lightning cannot read it from our iterable loaders.
    config = {"zero_optimization": zero, "zero_allow_untested_optimizer": True,
              "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size}
    if cfg.trainer.precision == "bf16-mixed":
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}  # skip steps with non-finite grads
    return config


class FrozenAwareModelParallel(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2) that also resumes from a distributed checkpoint
    written with `checkpoint.save_frozen=false`: only the tensors the checkpoint holds are read (the
    frozen ones keep their pretrained values), after refusing one that lacks a trainable weight."""

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        meta_file = path / "meta.pt"
        if not path.is_dir() or not meta_file.is_file():
            return super().load_checkpoint(checkpoint_path, weights_only)
        metadata = torch.load(meta_file, map_location="cpu", weights_only=True)
        if not metadata.get("frozen_left_out"):
            return super().load_checkpoint(checkpoint_path, weights_only)
        prefix = "state_dict."
        saved = {k[len(prefix):] for k in FileSystemReader(str(path)).read_metadata().state_dict_metadata
                 if k.startswith(prefix)}
        refuse_missing_trainable(self.lightning_module, saved, path)
        module = self.model
        state = {k: v for k, v in get_model_state_dict(module).items() if k in saved}
        dcp_load({"state_dict": state}, checkpoint_id=path)
        set_model_state_dict(module, state, options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp_load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return metadata


def build_strategy(cfg: RunConfig) -> Strategy | str:
    name = cfg.strategy.name
    if name == "auto":
        return "ddp" if cfg.world_size > 1 else "auto"
    if name == "ddp":
        return DDPStrategy(find_unused_parameters=False)
    if name == "deepspeed":
        # save_frozen=false: DeepSpeed itself leaves the frozen weights out of its model states.
        return DeepSpeedAnyDevice(config=deepspeed_config(cfg), exclude_frozen_parameters=not cfg.checkpoint.save_frozen)
    if name == "fsdp":
        return FrozenAwareModelParallel(data_parallel_size=cfg.world_size, tensor_parallel_size=1,
                                     save_distributed_checkpoint=True)
    raise ValueError(f"strategy.name={name!r} is not supported")


def shard_model(model: torch.nn.Module, device_mesh, mixed_precision: str = "32") -> None:
    """FSDP2: shard each transformer layer, then the whole model (parameters as DTensors)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    kwargs = {"mesh": mesh}
    if mixed_precision == "bf16-mixed":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.mm_extractor.beit3.encoder.layers:
        fully_shard(layer, **kwargs)
    for name in ("layers", "blocks"):
        for layer in getattr(model.visual_model.vision_encoder, name, []):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    # The module runs the image encoder through this method, not `forward`: it must unshard too.
    register_fsdp_forward_method(model, "encode_images")
