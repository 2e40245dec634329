"""The LightningModule: EVF-SAM with the reference loss, optimiser, schedule and metrics.

A little over 350 lines on purpose (one concept): Lightning's hooks for one model, training and
validation steps with their logging, non-finite-loss handling and the cached/frozen encoder paths."""

from __future__ import annotations

import logging
import random

import lightning as L
import numpy as np
import torch

from evfsam_lightning.config import config_from_dict
from evfsam_lightning.models.from_config import build_configured_model, compile_model
from evfsam_lightning.training.loading import TOKENIZER_KEY, tokenizer_files
from evfsam_lightning.training.losses import mask_loss
from evfsam_lightning.training.metrics import ReferringIoU
from evfsam_lightning.training.optim import build_optimizer, lr_lambda, parameter_groups
from evfsam_lightning.training.trainable import apply_trainable, fully_frozen_modules

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised on every rank after too many consecutive non-finite losses."""


class EvfSamModule(L.LightningModule):
    """Train EVF-SAM. `config` is a RunConfig as a plain dict (saved in checkpoints as hparams)."""

    def __init__(self, config: dict, val_sources: list[str] | None = None, tokenizer_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = config_from_dict(config)
        self.model = build_configured_model(self.cfg)
        m = self.cfg.model
        self.family = self.model.config.family
        split = apply_trainable(self.model, self.family, m.mode, m.freeze, m.unfreeze, lora=m.lora.rank > 0)
        self.frozen_names = set(split["frozen"])
        sources = list(val_sources if val_sources is not None else [s.name for s in self.cfg.data.val])
        self.val_iou = ReferringIoU(sources)  # indexed by validation loader (see validation_step)
        self.nonfinite_steps = 0
        self._nonfinite_run = 0
        self._skip_update = False
        self._engine_skip = False  # DeepSpeed: a step its engine must have skipped (non-finite loss)
        self._loss_flags: list[torch.Tensor] = []  # per micro-batch of the window: loss non-finite
        self._val_images: list[dict] = []
        # Frozen weights left out of checkpoints come back from the pretrained source.
        self.strict_loading = self.cfg.checkpoint.save_frozen
        # Checkpoints carry the tokenizer, so that they are usable on their own.
        self.tokenizer_files = tokenizer_files(tokenizer_dir) if tokenizer_dir else None
        self.train()  # puts the fully frozen modules in eval mode from the start

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.cfg.data.embedding_cache:
            from evfsam_lightning.data.embedding_cache import check_model

            check_model(self.model, self.cfg.data.embedding_cache)  # before any sharding

    def configure_model(self) -> None:
        if self.cfg.strategy.name == "fsdp" and not getattr(self, "_sharded", False):
            from evfsam_lightning.training.strategies import shard_model

            shard_model(self.model, self.device_mesh, self.cfg.trainer.precision)
            self._sharded = True
        if self.cfg.model.compile and not getattr(self, "_compiled", False):
            compile_model(self.model)
            self._compiled = True

    def on_fit_start(self) -> None:
        from evfsam_lightning.training.strategies import register_zero3_external_parameters, zero_stage

        if zero_stage(self.trainer.strategy) == 3:
            register_zero3_external_parameters(self.trainer.strategy.model.module, self.model)

    # -- modes ---------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        for module in fully_frozen_modules(self.model):
            module.eval()  # a frozen encoder never runs in train mode
        return self

    def on_train_start(self) -> None:
        self.train()  # Lightning does not call train() itself: enforce the frozen modules' eval mode

    def image_features(self, batch: dict) -> dict[str, torch.Tensor]:
        """SAM image features of the batch's images: those of an embedding cache when the batch
        carries `image_features` (bf16; the model casts them to its decoder's dtype), else the
        encoder's, run under no-grad when it is frozen."""
        cached = batch.get("image_features")
        if cached is not None:
            return cached
        frozen = fully_frozen_modules(self.model)
        if frozen:
            with torch.no_grad():
                return self.model.encode_images(batch["sam_pixel_values"])
        return self.model.encode_images(batch["sam_pixel_values"])

    def forward_losses(self, batch: dict, image_features: dict[str, torch.Tensor]):
        """The model's forward, its logits at original resolution and the mask loss. Image sizes come
        from the target masks' shapes (host metadata): no device synchronisation."""
        out = self.model(batch, image_features=image_features, full_resolution=False)
        masks = batch["masks"]
        logits = self.model.full_resolution_logits(out.low_res_logits, [int(m.shape[0]) for m in masks],
                                                   [tuple(m.shape[-2:]) for m in masks])
        if out.presence_logits is None:
            losses = mask_loss(logits, masks, self.cfg.optim.bce_weight, self.cfg.optim.dice_weight)
            return out, logits, losses
        # With the presence head, the head decides no-target expressions: their (all-zero) masks are
        # not asked of the decoder. A target is an expression whose mask has an object pixel.
        present = [(m == 1).flatten(1).any(1).to(lg.device) for lg, m in zip(logits, masks, strict=True)]
        losses = mask_loss([lg[p] for lg, p in zip(logits, present, strict=True)],
                           [m[p.to(m.device)] for m, p in zip(masks, present, strict=True)],
                           self.cfg.optim.bce_weight, self.cfg.optim.dice_weight)
        labels = torch.cat(present).to(out.presence_logits.device, torch.float32)
        presence = torch.nn.functional.binary_cross_entropy_with_logits(out.presence_logits.float(), labels)
        # 0 x logits keeps every decoder output in the graph when a batch holds only no-target expressions.
        losses["presence"] = self.cfg.optim.presence_weight * presence
        losses["loss"] = losses["loss"] + losses["presence"] + 0.0 * out.low_res_logits.float().sum()
        return out, logits, losses

    def _logging_step(self) -> bool:
        """Whether Lightning writes this step's logs (the test its own LearningRateMonitor makes)."""
        # Private on purpose: Lightning 2.6.6 has no public `should_update_logs` (its own
        # LearningRateMonitor reads this same attribute); re-deriving it would need private loop counters.
        return self.trainer._logger_connector.should_update_logs

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, _, losses = self.forward_losses(batch, self.image_features(batch))
        loss = losses["loss"]
        # Checked once per optimizer step (`_check_finite`): reading it here would stall the host.
        self._loss_flags.append(~torch.isfinite(loss.detach()))
        n_images = len(batch["masks"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n_images)
        self.log("train/bce", losses["bce"], batch_size=n_images)
        self.log("train/dice", losses["dice"], batch_size=n_images)
        if "presence" in losses:
            self.log("train/presence", losses["presence"], batch_size=n_images)
        if self._logging_step():  # a Python number is copied to the device: only when it is written
            self.log("train/expressions_per_image", batch["input_ids"].shape[0] / max(1, n_images),
                     batch_size=n_images)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._engine_skip:
            self._confirm_engine_skip()
        every = self.cfg.trainer.log_every_n_steps
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.global_step % every or datamodule is None or not hasattr(datamodule, "data_stats_total"):
            return
        # Cumulative counts of consumed images and skipped samples per reason, summed over ranks.
        for key, count in sorted(datamodule.data_stats_total.items()):
            name = "data/images" if key == "images" else f"data/skipped_{key}".replace("skipped_skipped", "skipped")
            self.log(name, float(count), reduce_fx="sum", sync_dist=True, batch_size=1)

    def _check_finite(self) -> None:
        """Before each optimizer step, all ranks agree which micro-batch losses of its window were
        non-finite (one host synchronisation per step); any makes the step a no-op (see
        `on_before_optimizer_step`), and too many in a row stop the run."""
        if not self._loss_flags:
            return
        flags, self._loss_flags = torch.stack(self._loss_flags).float(), []
        if self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="max")
        for bad in flags.tolist():
            if not bad:
                self._nonfinite_run = 0
                continue
            self._skip_update = True
            self._nonfinite_run += 1
            log.warning("non-finite loss at step %d (%d in a row)", self.global_step, self._nonfinite_run)
            if self._nonfinite_run >= self.cfg.optim.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self._nonfinite_run} consecutive non-finite losses (optim.max_nonfinite_steps="
                    f"{self.cfg.optim.max_nonfinite_steps}) at step {self.global_step}: lower optim.lr, "
                    "check the data (evfsam-data inspect) or use bf16-mixed instead of 16-mixed")

    def on_before_optimizer_step(self, optimizer) -> None:
        self._check_finite()
        # Under DeepSpeed the gradients live in its own buffers (p.grad is None): nothing to log here.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and self._logging_step():  # the norm costs a pass over all gradients: only when written
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: over all shards
            self.log("train/grad_norm", norm, batch_size=1)
        if self._skip_update:
            self._skip_update = False
            if self._deepspeed_optimizer() is not None:
                # DeepSpeed keeps the gradients in its own buffers: its engine skips a step whose
                # gradients are not finite (overflow check, forced on in `DeepSpeedAnyDevice`);
                # counted once the step has run and the engine confirms it (`_confirm_engine_skip`).
                self._engine_skip = True
                return
            # AdamW skips parameters without gradients: weights and optimizer state stay untouched.
            for p in self.model.parameters():
                p.grad = None
            self._count_skipped()

    def _count_skipped(self) -> None:
        self.nonfinite_steps += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=1)

    def _deepspeed_optimizer(self):
        """The ZeRO optimizer of a DeepSpeed run (None under any other strategy)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        engine = getattr(strategy, "deepspeed_engine", None) if strategy is not None else None
        return engine.optimizer if engine is not None else None

    def _confirm_engine_skip(self) -> None:
        """After a DeepSpeed step that had a non-finite loss: the engine must have skipped it."""
        self._engine_skip = False
        if not getattr(self._deepspeed_optimizer(), "overflow", False):
            raise NonFiniteLossError(f"DeepSpeed applied the optimizer step {self.global_step} although a loss was "
                                     "non-finite (its gradient overflow check did not skip it)")
        self._count_skipped()

    def configure_optimizers(self):
        o = self.cfg.optim
        groups = parameter_groups(self.model.named_parameters(), o.weight_decay)
        frozen = {id(p) for n, p in self.model.named_parameters() if n in self.frozen_names}
        if any(id(p) in frozen for g in groups for p in g["params"]):
            raise AssertionError("a frozen parameter reached the optimizer")
        optimizer = build_optimizer(groups, o.lr, tuple(o.betas), o.eps,
                                    cpu_offload=self.cfg.strategy.name == "deepspeed" and self.cfg.strategy.offload)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.schedule, o.warmup_steps, self.cfg.trainer.max_steps, o.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- validation ----------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not batch["masks"]:
            # Every sample of this rank's batch was skipped. The other ranks' forward may need this
            # rank (sharded weights are gathered collectively), and every rank must log the same
            # keys: run a placeholder image that weighs nothing in the loss and updates no metric.
            self.forward_losses(*self._placeholder(batch))
            self.log("val/loss", torch.zeros((), device=self.device), batch_size=0, sync_dist=True)
            return
        out, all_logits, losses = self.forward_losses(batch, self.model.encode_images(batch["sam_pixel_values"]))
        self.log("val/loss", losses["loss"], batch_size=len(batch["masks"]), sync_dist=True)
        rejected: list = [None] * len(all_logits)
        if out.presence_logits is not None:  # the head decides "no target"; rejected masks are empty
            counts = [int(m.shape[0]) for m in batch["masks"]]
            rejected = [~self.model.presence_head.present(p) for p in out.presence_logits.split(counts)]
            all_logits = [self.model.apply_presence(lg, p)
                          for lg, p in zip(all_logits, out.presence_logits.split(counts), strict=True)]
        # One loader per validation source, in order (the samples' own source names may differ).
        for logits, target, no in zip(all_logits, batch["masks"], rejected, strict=True):
            self.val_iou.update(logits, target, torch.full((logits.shape[0],), dataloader_idx, dtype=torch.long),
                                rejected=no)
        if len(self._val_images) < self.cfg.logging.val_images:
            self._collect_images(batch, all_logits)

    def _placeholder(self, batch: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """One black image with the empty expression and an all-ignore target, in the layout,
        dtypes and device of the (empty) `batch`, and its SAM image features."""
        sam = batch["sam_pixel_values"]
        size = sam.shape[-1]
        ids = batch["input_ids"].new_tensor([[0, 2]])  # <s> </s>
        placeholder = {
            **batch, "sam_pixel_values": sam.new_zeros((1, *sam.shape[1:])),
            "beit_pixel_values": batch["beit_pixel_values"].new_zeros((1, *batch["beit_pixel_values"].shape[1:])),
            "input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
            "image_index": ids.new_zeros(1), "offsets": ids.new_tensor([0, 1]),
            "resize_hw": ids.new_tensor([[size, size]]), "original_hw": ids.new_tensor([[size, size]]),
            "masks": [torch.full((1, size, size), 255, dtype=torch.uint8, device=sam.device)],
        }
        return placeholder, self.model.encode_images(placeholder["sam_pixel_values"])

    def on_validation_epoch_end(self) -> None:
        results = self.val_iou.compute()
        self.val_iou.reset()
        for source, r in results.items():
            if r["expressions"] == 0:
                continue
            prefix = "val" if source == "all" else f"val/{source}"
            # Already summed over ranks by the metric; sync_dist only averages equal values.
            self.log(f"{prefix}/giou", r["giou"], sync_dist=True, prog_bar=source == "all")
            self.log(f"{prefix}/ciou", r["ciou"], sync_dist=True)
            if r.get("no_target"):  # generalized referring (gRefCOCO): the GRES accuracies too
                self.log(f"{prefix}/n_acc", r["n_acc"], sync_dist=True)
                if r["t_acc"] == r["t_acc"]:  # NaN when the split holds no target expression
                    self.log(f"{prefix}/t_acc", r["t_acc"], sync_dist=True)
        self._log_images()

    def _collect_images(self, batch: dict, logits: list[torch.Tensor]) -> None:
        from evfsam_lightning.data.transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD

        mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
        std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
        expressions = batch.get("expressions") or [""] * batch["input_ids"].shape[0]
        offsets = batch["offsets"].tolist()
        for i in range(len(logits)):
            if len(self._val_images) >= self.cfg.logging.val_images:
                return
            h, w = batch["resize_hw"][i].tolist()
            pixels = batch["sam_pixel_values"][i, :, :h, :w].float().cpu() * std + mean
            oh, ow = batch["original_hw"][i].tolist()
            image = torch.nn.functional.interpolate(pixels[None], (oh, ow), mode="bilinear")[0]
            self._val_images.append({
                "image": image.clamp(0, 255).byte().permute(1, 2, 0).numpy(),
                "truth": (batch["masks"][i][0] == 1).cpu().numpy(),
                "prediction": (logits[i][0] > 0).cpu().numpy(),
                "text": expressions[offsets[i]],
            })

    def _log_images(self) -> None:
        """The validation panels (image, truth, prediction, text) to every logger that takes images:
        TensorBoard, W&B, MLflow (as artifacts); the CSV logger has no images."""
        images, self._val_images = self._val_images, []
        if not images or not self.trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

        from evfsam_lightning.training.visualize import mask_panel

        panels = [(f"val_masks/{i}", mask_panel(**sample), sample["text"]) for i, sample in enumerate(images)]
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                for key, panel, _ in panels:
                    logger.experiment.add_image(key, panel, self.global_step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image("val_masks", [p for _, p, _ in panels], step=self.global_step,
                                 caption=[t for _, _, t in panels])
            elif isinstance(logger, MLFlowLogger):
                for key, panel, _ in panels:
                    logger.experiment.log_image(logger.run_id, panel, key=key.replace("/", "_"), step=self.global_step)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain types only, so that checkpoints load with torch.load(weights_only=True).
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        if self.tokenizer_files is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer_files
        if not self.cfg.checkpoint.save_frozen:
            # Frozen parameters and the buffers (constants of the pretrained source) stay out: they
            # come back from their fp32 source on resume and in consolidation / export, never from
            # the copy a strategy held (bf16 under DeepSpeed). DeepSpeed and FSDP2 write the
            # remaining state themselves (`strategies.build_strategy`).
            state = checkpoint.get("state_dict", {})
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
            left_out = sorted(self.frozen_names | {n for n, _ in self.model.named_buffers()})
            if trainable & set(left_out):
                raise AssertionError("refusing to leave a trainable parameter out of the checkpoint")
            for name in left_out:
                state.pop(f"model.{name}", None)
            checkpoint["frozen_left_out"] = left_out

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(tuple(rng["python"][:1]) + (tuple(rng["python"][1]),) + tuple(rng["python"][2:]))
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
        # DeepSpeed and FSDP2 load the weights themselves (no `state_dict` here) and refuse a
        # checkpoint lacking a trainable weight in their `load_checkpoint` (strategies.py).
        if checkpoint.get("frozen_left_out") and "state_dict" in checkpoint:
            from evfsam_lightning.training.strategies import refuse_missing_trainable

            refuse_missing_trainable(self, checkpoint["state_dict"], "being resumed")
