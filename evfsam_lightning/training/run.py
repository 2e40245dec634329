"""Assemble a training run from a `RunConfig`: data, module, callbacks, logger, trainer, resume."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, TQDMProgressBar

from evfsam_lightning.config import ConfigError, DataConfig, RunConfig, to_yaml
from evfsam_lightning.training.callbacks import (
    CompleteCheckpoint,
    DamagedCheckpoint,
    FinalCheckpoint,
    PeriodicCheckpoint,
    StagedCheckpointIO,
    atomic_write_text,
    find_resume_checkpoint,
    is_complete,
    remove_stale_staging,
    verify_checkpoint,
)
from evfsam_lightning.training.loggers import (
    active_loggers,
    build_loggers,
    mlflow_tracking_uri,
    save_logger_ids,
)
from evfsam_lightning.training.peers import PeerTable
from evfsam_lightning.training.preemption import PreemptionCheckpoint, preemption_exit_code, slurm_plugins
from evfsam_lightning.training.preflight import preflight
from evfsam_lightning.training.run_callbacks import DataPositionReset, ProcessLayout, Throughput
from evfsam_lightning.training.run_lock import RunLock
from evfsam_lightning.training.signals import EXIT_REQUEUED

log = logging.getLogger(__name__)


def resolve_pretrained(cfg: RunConfig) -> RunConfig:
    """Resolve Hub ids of `model.pretrained` / `tokenizer` / `sam_checkpoint` to local folders, check
    that `model.pretrained` holds what the run needs (naming any missing file) and turn
    `model.size=auto` into that folder's dimensions, so that checkpoints load without the folder."""
    from evfsam_lightning.hub import resolve
    from evfsam_lightning.models import checkpoints as ck

    m = cfg.model
    # Hub ids (`org/name[@revision]`) become their local snapshot folders, once, before any work.
    hub = {key: str(resolve(getattr(m, key), f"model.{key}")) for key in ("pretrained", "tokenizer", "sam_checkpoint")
           if getattr(m, key)}
    if hub:
        m = dataclasses.replace(m, **hub)
        cfg = dataclasses.replace(cfg, model=m)
    if not m.pretrained:
        return cfg
    try:
        ck.check_reference_folder(m.pretrained, with_tokenizer=not m.tokenizer)
    except ck.CheckpointError as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    if m.size != "auto":
        return cfg
    dims = ck.folder_model_config(m.pretrained).to_dict()
    return dataclasses.replace(cfg, model=dataclasses.replace(m, size="custom", dims=dims))


def resolve_epochs(cfg: RunConfig, data: DataConfig) -> RunConfig:
    """`trainer.max_epochs` / `val_every_n_epochs` -> steps, from the training images per epoch
    (`data.samples_per_epoch`, else the shards' sizes.json), so one recipe fits any dataset size."""
    from evfsam_lightning.data.stream import expand_urls, shard_sizes

    t = cfg.trainer
    if not (t.max_epochs or t.val_every_n_epochs):
        return cfg
    images = data.samples_per_epoch
    if not images:  # 0: one pass over the training shards
        sizes = [shard_sizes(expand_urls(src.urls), src.sizes) for src in data.train]
        if any(s is None for s in sizes):
            raise ConfigError("trainer.max_epochs / val_every_n_epochs need the training images per epoch: give "
                              "every training source a sizes.json or set data.samples_per_epoch")
        images = sum(sum(s) for s in sizes)
    steps_per_epoch = images / t.global_batch_size
    new = {}
    if t.max_epochs:
        new["max_steps"] = max(1, math.ceil(t.max_epochs * steps_per_epoch))
    if t.val_every_n_epochs:
        new["val_every_n_steps"] = max(1, round(t.val_every_n_epochs * steps_per_epoch))
    print(f"{images} training images per epoch, {steps_per_epoch:.1f} steps of {t.global_batch_size}: "
          + ", ".join(f"trainer.{k}={v}" for k, v in new.items()))
    return dataclasses.replace(cfg, trainer=dataclasses.replace(t, **new))


def resolve_precision(cfg: RunConfig) -> RunConfig:
    """`trainer.precision=auto`: bf16-mixed where a GPU supports it, else 32 (bf16 autocast is slower
    than fp32 on CPUs)."""
    import torch

    t = cfg.trainer
    if t.precision != "auto":
        return cfg
    gpu = t.accelerator != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return dataclasses.replace(cfg, trainer=dataclasses.replace(t, precision="bf16-mixed" if gpu else "32"))


def resume_path(cfg: RunConfig) -> str | None:
    """The checkpoint a run resumes from: `false` none; `auto` the newest complete checkpoint of
    the run that verifies (a damaged one is skipped with a warning naming the file); a path as
    given, verified against its marker when it has one (damaged: a ConfigError naming the file).
    Only rank 0 calls it; the others take its choice (`_resume_chosen_by_rank_zero`)."""
    r = cfg.checkpoint.resume
    if r == "false":
        return None
    if r == "auto":
        found = find_resume_checkpoint(cfg.run_dir / "checkpoints", verify=True)
        return str(found) if found else None
    if is_complete(r):
        try:
            verify_checkpoint(r)
        except DamagedCheckpoint as e:
            raise ConfigError(f"checkpoint.resume={r}: {e}") from None
    return r


def _resume_chosen_by_rank_zero(trainer: L.Trainer, cfg: RunConfig) -> None:
    """Make the trainer load the checkpoint rank 0 chooses: Lightning asks for it (`resume_start`)
    once the ranks are connected; rank 0 looks at the file system, every rank takes its answer (a
    broadcast), so ranks that see the run directory differently (a checkpoint appearing, a network
    file system's cache) still resume from the same checkpoint. An error is raised on every rank."""
    # Private on purpose: Lightning 2.6.6 has no public hook that picks the checkpoint after the ranks
    # are connected (`fit(ckpt_path=...)` is fixed before the process group exists); this wraps the
    # connector's own `resume_start`, which `fit` calls at that moment.
    connector = trainer._checkpoint_connector
    original = connector.resume_start

    def resume_start(checkpoint_path=None, weights_only=None):
        choice, error = None, None
        if trainer.is_global_zero:
            try:
                choice = resume_path(cfg)
            except ConfigError as e:
                error = str(e)
            if not error:
                print(f"  resuming from {choice}" if choice else "  starting from scratch", flush=True)
        choice, error = trainer.strategy.broadcast((choice, error), src=0)
        if error:
            raise ConfigError(error)
        return original(choice, weights_only)

    connector.resume_start = resume_start


def launch_rank(devices: int = 1) -> int:
    """This process's global rank as its launcher set it, before the trainer connects the ranks
    (torchrun: RANK; a Lightning-launched child: LOCAL_RANK > 0; srun: SLURM_PROCID; a node
    started by hand: NODE_RANK x devices + LOCAL_RANK)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = os.environ
    if env.get("RANK", "").isdigit():
        return int(env["RANK"])
    local = int(env.get("LOCAL_RANK", "0") or 0)
    if local > 0:
        return local
    if SLURMEnvironment.detect() and env.get("SLURM_PROCID", "").isdigit():
        return int(env["SLURM_PROCID"])
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")) or 0)
    return node * devices + local


def build_trainer(cfg: RunConfig, extra_callbacks=()) -> L.Trainer:
    from evfsam_lightning.training.strategies import build_strategy

    t = cfg.trainer
    ckpt_dir = cfg.run_dir / "checkpoints"
    accumulate = cfg.accumulate_grad_batches
    callbacks = [
        PeriodicCheckpoint(ckpt_dir, every_n_steps=cfg.checkpoint.every_n_steps, keep_last=cfg.checkpoint.keep_last),
        FinalCheckpoint(ckpt_dir),
        PreemptionCheckpoint(ckpt_dir),
        Throughput(t.global_batch_size, t.log_every_n_steps),
        ProcessLayout(),
        DataPositionReset(),
        PeerTable(),
        *extra_callbacks,
    ]
    if cfg.logging.progress_bar:  # refreshed (and the loss read from the device) once per log interval
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps)))
    if active_loggers(cfg):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.checkpoint.keep_top_k > 0 and (cfg.data.val or cfg.data.synthetic is not None):
        callbacks.append(CompleteCheckpoint(
            dirpath=ckpt_dir, filename="best-step{step:08d}-ciou{val/ciou:.4f}", auto_insert_metric_name=False,
            monitor="val/ciou", mode="max", save_top_k=cfg.checkpoint.keep_top_k, save_last=False))
    if cfg.checkpoint.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val/ciou", mode="max", patience=cfg.checkpoint.early_stopping_patience,
                                       check_on_train_epoch_end=False))
    loggers = build_loggers(cfg, resuming=resume_path(cfg) is not None)
    # 0: once, at the last step. (Lightning's None validates at every end of epoch instead, so a run
    # shorter than one pass over the data never validated.)
    val_every = (t.val_every_n_steps or t.max_steps) * accumulate
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
        strategy=build_strategy(cfg), max_steps=t.max_steps, accumulate_grad_batches=accumulate,
        gradient_clip_val=cfg.optim.grad_clip or None, log_every_n_steps=t.log_every_n_steps,
        val_check_interval=val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        limit_val_batches=t.limit_val_batches or None, enable_progress_bar=cfg.logging.progress_bar,
        default_root_dir=str(cfg.run_dir), logger=loggers or False, callbacks=callbacks, use_distributed_sampler=False,
        deterministic=t.deterministic, enable_checkpointing=True,
        plugins=[*slurm_plugins(), StagedCheckpointIO()],
    )


def silence_known_warnings() -> None:
    """Filter the warnings Lightning prints on every run that we know do not apply (by message and
    module, so that anything else still shows)."""
    # TrainStream/EvalStream split their batches across workers and ranks themselves: __len__ is exact.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", module=r"lightning\.")
    # Lightning's own pytree helper calls torch's deprecated LeafSpec check: not ours to change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.")
    if "SLURM_JOB_ID" not in os.environ:  # outside a SLURM allocation there is nothing to srun into
        warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used",
                                module=r"lightning\.")


def train(cfg: RunConfig) -> L.Trainer:
    """Run (or resume) training; returns the trainer after fit. The rank-0 process holds the run
    directory's lock (`RunLock`) for the whole run."""
    preflight(cfg)  # every file the run needs, before anything is built or written
    silence_known_warnings()  # before launch_rank, whose SLURM detection prints the srun hint
    lock = RunLock(cfg.run_dir) if launch_rank(cfg.trainer.devices) == 0 else None
    if lock is None:
        return _train(cfg, holds_lock=False)
    with lock:
        return _train(cfg, holds_lock=True)


def _train(cfg: RunConfig, holds_lock: bool) -> L.Trainer:
    from evfsam_lightning.data.datamodule import EvfDataModule
    from evfsam_lightning.data.embedding_cache import EmbeddingCacheError
    from evfsam_lightning.models.from_config import model_size
    from evfsam_lightning.training.data_setup import data_for_run
    from evfsam_lightning.training.module import EvfSamModule

    if holds_lock:  # what a killed save left behind; no save of this run can be under way now
        for path in remove_stale_staging(cfg.run_dir / "checkpoints"):
            print(f"removed {path}, left by an interrupted checkpoint save", flush=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    cfg = resolve_precision(resolve_pretrained(cfg))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    try:  # the datamodule opens the embedding cache: a missing or stale one stops the run here
        datamodule = EvfDataModule(*data_for_run(cfg, model_size(cfg.model)))
    except EmbeddingCacheError as e:
        raise ConfigError(f"data.embedding_cache: {e}") from None
    datamodule.reset_data_position = cfg.checkpoint.reset_data_position
    cfg = resolve_epochs(cfg, datamodule.data)
    config_dict = _as_dict(cfg)
    module = EvfSamModule(config_dict, val_sources=[s.name for s in datamodule.data.val],
                          tokenizer_dir=datamodule.settings.tokenizer)
    trainer = build_trainer(cfg)
    if trainer.is_global_zero:
        atomic_write_text(cfg.run_dir / "config.yaml", to_yaml(cfg))
        save_logger_ids(cfg, trainer)
    if trainer.is_global_zero:
        print(f"run directory: {cfg.run_dir.resolve()}")
        print(f"  checkpoints: {(cfg.run_dir / 'checkpoints').resolve()}")
        logs = {"tensorboard": f"tensorboard --logdir {(cfg.run_dir / 'tensorboard').resolve()}",
                "csv": f"{(cfg.run_dir / 'csv').resolve()}/version_<n>/metrics.csv (one per start)",
                "mlflow": f"mlflow ui --backend-store-uri {mlflow_tracking_uri(cfg)}",
                "wandb": f"{(cfg.run_dir / 'wandb').resolve()} (WANDB_MODE={os.environ.get('WANDB_MODE', 'online')})"}
        for name in active_loggers(cfg):
            print(f"  {name}: {logs[name]}")
    _resume_chosen_by_rank_zero(trainer, cfg)
    trainer.fit(module, datamodule=datamodule)
    if trainer.is_global_zero:
        _print_summary(cfg, trainer)
    return trainer


def _print_summary(cfg: RunConfig, trainer: L.Trainer) -> None:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    last = find_resume_checkpoint(cfg.run_dir / "checkpoints")
    code = preemption_exit_code(trainer)
    if code is not None:
        then = "the requeued SLURM job resumes on its own" if code == EXIT_REQUEUED else \
            "run the same command to resume"
        print(f"preempted at step {trainer.global_step}: {then}")
        if last is not None:
            print(f"  last checkpoint: {last}")
        return
    print(f"finished at step {trainer.global_step}")
    if trainer.global_step < cfg.trainer.max_steps and cfg.checkpoint.early_stopping_patience:
        print(f"  stopped early: val/ciou did not improve for {cfg.checkpoint.early_stopping_patience} validations")
    for key in ("val/giou", "val/ciou"):
        if key in metrics:
            print(f"  {key}: {metrics[key]:.4f}")
    if last is not None:
        print(f"  last checkpoint: {last}")
        # A run directory stands for its best checkpoint (the last one when nothing was validated).
        print(f"  evaluate: evfsam-eval --checkpoint {cfg.run_dir} --data <shards>")
        print(f"  export:   evfsam-export --checkpoint {cfg.run_dir} --out exported/{cfg.name}")


def _as_dict(cfg: RunConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
