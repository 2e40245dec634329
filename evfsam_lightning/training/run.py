"""Assemble a training run from a `RunConfig`: data, module, callbacks, logger, trainer, resume."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import socket
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, TQDMProgressBar

from evfsam_lightning.config import ConfigError, RunConfig, to_yaml
from evfsam_lightning.training.callbacks import (
    CompleteCheckpoint,
    DamagedCheckpoint,
    DataPositionReset,
    FinalCheckpoint,
    PeriodicCheckpoint,
    ProcessLayout,
    StagedCheckpointIO,
    Throughput,
    atomic_write_text,
    find_resume_checkpoint,
    is_complete,
    remove_stale_staging,
    verify_checkpoint,
)
from evfsam_lightning.training.peers import PeerTable
from evfsam_lightning.training.preemption import PreemptionCheckpoint, preemption_exit_code, slurm_plugins
from evfsam_lightning.training.preflight import preflight, tokenizer_setting
from evfsam_lightning.training.signals import EXIT_REQUEUED

log = logging.getLogger(__name__)


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _expressions_in_shards(folder: Path) -> list[str]:
    """Every expression of the JSON records of a shard folder (read with the stream's shard reader;
    images are not decoded). A damaged shard raises: the folder was just written."""
    from evfsam_lightning.data.stream import SkipLog, iter_shard

    out = []
    for tar in sorted(folder.glob("*.tar")):
        for sample in iter_shard(str(tar), SkipLog(strict=True)):
            record = json.loads(sample["json"])
            out.extend(e for o in record["objects"] for e in o["expressions"])
    return out


_SYNTHETIC_ENTRIES = {"train", "val", "tokenizer", "report.json", "READY.json"}


def ensure_synthetic(cfg: RunConfig) -> tuple[Path, Path]:
    """Generate the synthetic dataset and its tokenizer once (any rank may get here first; a file
    lock makes the others wait). Generation is atomic: it fills a temporary folder beside the
    destination and renames it into place, so a failed or killed generation leaves no partial
    dataset; a partial one from before (no READY.json) is replaced. Returns (shard root, tokenizer)."""
    import shutil

    from evfsam_lightning.data.sources.synthetic import generate_synthetic
    from evfsam_lightning.data.tokenizer import build_tokenizer

    syn = cfg.data.synthetic
    root = Path(syn.dir)
    done = root / "READY.json"
    with _file_lock(root.parent / f".{root.name}.lock"):
        wanted = {"train": syn.train, "val": syn.val, "seed": syn.seed, "grammar": syn.grammar,
                  "image_size": syn.image_size}
        if done.is_file() and json.loads(done.read_text()) == wanted:
            return root, root / "tokenizer"
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # of a killed generation (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if root.exists() and (not root.is_dir() or not {p.name for p in root.iterdir()} <= _SYNTHETIC_ENTRIES):
            raise ConfigError(f"data.synthetic.dir={syn.dir!r} exists and is not a synthetic dataset (it holds other "
                              "files): choose another folder")
        if root.exists():
            state = "an older" if done.is_file() else "a partial (interrupted)"
            print(f"replacing {state} synthetic dataset in {root}")
        print(f"generating the synthetic dataset in {root} ({syn.train} train / {syn.val} val images) ...")
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        try:
            generate_synthetic(tmp, n_train=syn.train, n_val=syn.val, image_size=syn.image_size, seed=syn.seed,
                               grammar=syn.grammar, workers=min(2, os.cpu_count() or 1), overwrite=True)
            build_tokenizer(_expressions_in_shards(tmp / "train"), tmp / "tokenizer", vocab_size=128)
            atomic_write_text(tmp / "READY.json", json.dumps(wanted))
            if root.exists():  # the old dataset goes aside first: a rename cannot replace a folder
                old = root.parent / f".{root.name}.tmp-{os.getpid()}-old"
                os.replace(root, old)
                os.replace(tmp, root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root, root / "tokenizer"


def data_config(cfg: RunConfig, model_cfg):
    """The data pipeline's config from the run config (shards, tokenizer, preprocessing sizes)."""
    from evfsam_lightning.data.datamodule import DataConfig, SourceConfig

    d = cfg.data
    train = [SourceConfig(s.name, list(s.urls), s.weight) for s in d.train]
    val = [SourceConfig(s.name, list(s.urls), s.weight) for s in d.val]
    setting = tokenizer_setting(cfg)  # its folder and sentencepiece model are checked by preflight()
    tokenizer = setting[1] if setting else None
    if d.synthetic is not None:
        root, tok = ensure_synthetic(cfg)
        train = train or [SourceConfig("synthetic", [str(root / "train")])]
        val = val or [SourceConfig("synthetic", [str(root / "val")])]
        tokenizer = tokenizer or str(tok)
    return DataConfig(
        sources=train, val_sources=val, tokenizer=str(tokenizer), batch_size=cfg.trainer.micro_batch_size,
        num_workers=d.num_workers, max_expressions_per_image=d.max_expressions_per_image,
        negatives_per_image=d.negatives_per_image,
        expression_sampling=d.expression_sampling,
        sam_image_size=model_cfg.sam.image_size, sam_variant=model_cfg.family,
        beit_image_size=model_cfg.beit3.image_size, max_text_length=d.max_text_length, seed=cfg.seed,
        mixing=d.mixing, samples_per_epoch=d.samples_per_epoch or None, shuffle_buffer=d.shuffle_buffer,
        shuffle_shards=d.shuffle_shards, eval_batch_size=d.val_batch_size, strict=d.strict,
        embedding_cache=d.embedding_cache, sam_resize=resolve_sam_resize(cfg),
    )


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


def resolve_epochs(cfg: RunConfig, data) -> RunConfig:
    """`trainer.max_epochs` / `val_every_n_epochs` -> steps, from the training images per epoch
    (`data.samples_per_epoch`, else the shards' sizes.json), so one recipe fits any dataset size."""
    from evfsam_lightning.data.stream import expand_urls, shard_sizes

    t = cfg.trainer
    if not (t.max_epochs or t.val_every_n_epochs):
        return cfg
    images = data.samples_per_epoch
    if images is None:
        sizes = [shard_sizes(expand_urls(src.urls), src.sizes) for src in data.sources]
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


LOGGER_IDS = "loggers.json"


def active_loggers(cfg: RunConfig) -> list[str]:
    return [n for n in cfg.logging.loggers if n != "tensorboard" or cfg.logging.tensorboard]


def _logger_ids(cfg: RunConfig) -> dict:
    """The MLflow run and W&B run ids of the run's previous start (`<run dir>/loggers.json`), for a
    run that resumes from a checkpoint; a run that starts over gets new ones."""
    path = cfg.run_dir / LOGGER_IDS
    if resume_path(cfg) is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("%s is not valid JSON: the loggers start new runs", path)
        return {}


def mlflow_tracking_uri(cfg: RunConfig) -> str:
    """MLFLOW_TRACKING_URI when set, else the file store `<run dir>/mlruns`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or (cfg.run_dir.resolve() / "mlruns").as_uri()


def _continuing_mlflow_logger(**kwargs):
    """Lightning's MLFlowLogger for a run that may continue an MLflow run: MLflow refuses to change a
    logged param, and a resumed run may change some (trainer.max_steps raised to train on), so only
    params the run has not logged yet are logged; changed ones are named in a warning (the run
    directory's config.yaml has their new values)."""
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only

    class ContinuingMLFlowLogger(MLFlowLogger):
        @rank_zero_only
        def log_hyperparams(self, params) -> None:
            logged = self.experiment.get_run(self.run_id).data.params
            flat = _flatten_dict(_convert_params(params))
            changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != str(v)[:250])
            if changed:
                log.warning("MLflow run %s keeps the first values of %s (MLflow params cannot change)",
                            self.run_id, ", ".join(changed))
            super().log_hyperparams({k: v for k, v in flat.items() if k not in logged})

    return ContinuingMLFlowLogger(**kwargs)


def build_loggers(cfg: RunConfig) -> list:
    """Lightning's own loggers for `logging.loggers`, each writing in the run directory (see the
    config help); a resumed run continues the MLflow run and W&B run id of its previous start."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    ids = _logger_ids(cfg)
    loggers = []
    for name in active_loggers(cfg):
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=str(cfg.run_dir), name="tensorboard", version=""))
        elif name == "csv":
            # One version_<n>/metrics.csv per start: Lightning's writer empties an existing file.
            loggers.append(CSVLogger(save_dir=str(cfg.run_dir), name="csv"))
        elif name == "mlflow":
            uri = mlflow_tracking_uri(cfg)
            if uri.startswith("file:"):  # MLflow 3 wants an opt-in to its (maintained, not deprecated) file store
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            previous = ids.get("mlflow") or {}
            loggers.append(_continuing_mlflow_logger(experiment_name=cfg.logging.project, run_name=cfg.name, tracking_uri=uri,
                                        run_id=previous.get("run_id") if previous.get("tracking_uri") == uri else None))
        elif name == "wandb":
            loggers.append(WandbLogger(project=cfg.logging.project, name=cfg.name, save_dir=str(cfg.run_dir.resolve()),
                                       id=ids.get("wandb") or uuid.uuid4().hex[:12], resume="allow"))
    return loggers


def save_logger_ids(cfg: RunConfig, trainer: L.Trainer) -> None:
    """Record the MLflow run and W&B run ids (rank 0, before fit) for the next start of the run."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    ids = {}
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            ids["mlflow"] = {"run_id": logger.run_id, "tracking_uri": mlflow_tracking_uri(cfg)}
        elif isinstance(logger, WandbLogger):
            ids["wandb"] = logger.experiment.id
    if ids:
        atomic_write_text(cfg.run_dir / LOGGER_IDS, json.dumps(ids, indent=1))


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


class RunLock:
    """One training process per run directory: rank 0 holds `<run_dir>/.lock` (an flock, which
    the kernel drops when its holder dies, even by SIGKILL) and writes its host and PID into it.

    A second run refuses at once naming the holder. A lock left by a dead holder is free and is
    taken over with a message naming that holder. A requeued SLURM job whose previous incarnation
    still appears to hold the lock (a network file system that has not yet noticed its death)
    takes it over when the recorded SLURM job id is its own."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = self._holder()
        job = os.environ.get("SLURM_JOB_ID")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not (job and holder.get("slurm_job_id") == job):
                os.close(fd)
                who = f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}"
                raise ConfigError(f"run directory {self.path.parent} is in use by another evfsam-train ({who}, "
                                  f"lock {self.path}); wait for it to end, or use another name=") from None
            print(f"run lock {self.path}: held by an earlier start of this SLURM job {job} "
                  f"(host {holder.get('host')}, PID {holder.get('pid')}); taking it over", flush=True)
        else:
            if holder.get("pid"):
                print(f"run lock {self.path}: taking over the stale lock of host {holder.get('host')}, "
                      f"PID {holder.get('pid')} (that process is gone)", flush=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean end leaves no holder to report as stale
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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
    loggers = build_loggers(cfg)
    val_every = t.val_every_n_steps * accumulate if t.val_every_n_steps else None
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
    from evfsam_lightning.training.module import EvfSamModule

    if holds_lock:  # what a killed save left behind; no save of this run can be under way now
        for path in remove_stale_staging(cfg.run_dir / "checkpoints"):
            print(f"removed {path}, left by an interrupted checkpoint save", flush=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    cfg = resolve_precision(resolve_pretrained(cfg))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    try:  # the datamodule opens the embedding cache: a missing or stale one stops the run here
        datamodule = EvfDataModule(data_config(cfg, model_size(cfg.model)))
    except EmbeddingCacheError as e:
        raise ConfigError(f"data.embedding_cache: {e}") from None
    datamodule.reset_data_position = cfg.checkpoint.reset_data_position
    cfg = resolve_epochs(cfg, datamodule.config)
    config_dict = _as_dict(cfg)
    module = EvfSamModule(config_dict, val_sources=[s.name for s in datamodule.config.val_sources],
                          tokenizer_dir=datamodule.config.tokenizer)
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
