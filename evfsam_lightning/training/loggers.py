"""The run's loggers (`logging.loggers`: Lightning's TensorBoard, CSV, MLflow and W&B loggers), and
the MLflow/W&B run ids a resumed run continues (`<run dir>/loggers.json`)."""

from __future__ import annotations

import json
import logging
import os
import uuid

import lightning as L

from evfsam_lightning.config import RunConfig
from evfsam_lightning.training.callbacks import atomic_write_text

log = logging.getLogger(__name__)


LOGGER_IDS = "loggers.json"


def active_loggers(cfg: RunConfig) -> list[str]:
    return [n for n in cfg.logging.loggers if n != "tensorboard" or cfg.logging.tensorboard]


def _logger_ids(cfg: RunConfig, resuming: bool) -> dict:
    """The MLflow run and W&B run ids of the run's previous start (`<run dir>/loggers.json`), for a
    run that resumes from a checkpoint; a run that starts over gets new ones."""
    path = cfg.run_dir / LOGGER_IDS
    if not resuming or not path.is_file():
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


def build_loggers(cfg: RunConfig, resuming: bool) -> list:
    """Lightning's own loggers for `logging.loggers`, each writing in the run directory (see the
    config help); a resumed run (`resuming`) continues the MLflow run and W&B run id of its previous
    start."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    ids = _logger_ids(cfg, resuming)
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
