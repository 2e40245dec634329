"""One structured configuration for a run, loaded from a recipe YAML plus `key=value` overrides.

Every field has a help text (shown by `evfsam-train --help-config`). Loading fails before any work
when a key is unknown, a value has the wrong type, or a combination is impossible, with a message
naming the key and what is allowed.

Long on purpose (one concept): the whole run schema, one dataclass per section with every key's
help, and its loading and validation; splitting it would scatter the keys a reader looks up together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def doc(default: Any = MISSING, help: str = "", factory=None):
    """A dataclass field with its help text."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A recipe that cannot run; the message names the key."""


@dataclass
class LoraConfig:
    rank: int = doc(0, "LoRA rank on BEiT-3's attention projections (0: off); then BEiT-3's own weights freeze")
    alpha: float = doc(16.0, "LoRA scale numerator: the update is (alpha / rank) B A")
    targets: list[str] = doc(help="projections that get LoRA, in both multiway branches (q_proj, k_proj, v_proj, "
                                  "out_proj)", factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


@dataclass
class ModelConfig:
    size: str = doc("tiny", "named size: evf-sam, evf-sam-beit3-base, tiny, evf-sam2, tiny-sam2; `custom` "
                            "(model.dims); or `auto`: the size of the `pretrained` folder's config.json")
    dims: dict[str, Any] = doc(help="with size=custom: {family, beit3: {...}, sam: {...}} dimensions", factory=dict)
    pretrained: str | None = doc(None, "EVF-SAM checkpoint folder (official layout) to start from")
    sam_checkpoint: str | None = doc(None, "SAM `sam_vit_*.pth` (or HF folder) for the SAM part")
    beit3_checkpoint: str | None = doc(None, "BEiT-3 `.pth` for the fusion encoder")
    tokenizer: str | None = doc(None, "tokenizer folder (sentencepiece.bpe.model); default: `pretrained`")
    mode: str = doc("frozen_image_encoder", "frozen_image_encoder (reference trainable set) or full")
    freeze: list[str] = doc(help="extra parameter-name prefixes to freeze", factory=list)
    unfreeze: list[str] = doc(help="parameter-name prefixes to train although the mode freezes them", factory=list)
    activation_checkpointing: bool = doc(False, "recompute BEiT-3 (and in full mode SAM) layers in backward")
    compile: bool = doc(False, "torch.compile the SAM image encoder and each BEiT-3 layer (in place: "
                               "checkpoint keys unchanged); the first steps compile")
    lora: LoraConfig = doc(help="parameter-efficient fine-tuning (exported merged into plain weights)",
                           factory=LoraConfig)
    # -- no-target decision (docs/no_target.md) --
    presence_head: bool = doc(False, "add a presence head on the fused BEiT-3 feature: a target/no-target score per "
                                     "expression (off: the reference model exactly)")
    presence_threshold: float = doc(0.5, "presence probability below which an expression gets 'no target' (an empty "
                                         "mask); stored with checkpoints and exports")


@dataclass
class SourceConfig:
    name: str = doc(MISSING, "source name (appears in batches, logs, per-source metrics and seeds)")
    urls: list[str] = doc(help="shard files: paths, globs, brace patterns (data/train-{000000..000009}.tar), dirs "
                               "with sizes.json, remote URLs, or pipe: commands", factory=list)
    weight: float = doc(1.0, "sampling weight of this source in the training mixture (ignored for val sources)")
    sizes: str | None = doc(None, "a sizes.json ({shard file name: samples}) for shards without one next to "
                                  "them, e.g. pipe: commands")


@dataclass
class SyntheticConfig:
    dir: str = doc("data/synthetic", "where the synthetic shards are (generated on first use)")
    train: int = doc(4000, "number of training images")
    val: int = doc(200, "number of validation images")
    seed: int = doc(0, "generator seed")
    grammar: str = doc("colour", "expression grammar: colour or full")
    image_size: int = doc(128, "side of the generated images")


@dataclass
class DataConfig:
    """The data pipeline's options: the one place a data option is declared (the data module reads
    this; what it takes from the model, trainer and run is `data.settings.PipelineSettings`)."""

    train: list[SourceConfig] = doc(help="training sources with weights", factory=list)
    val: list[SourceConfig] = doc(help="validation sources (finite, each sample once)", factory=list)
    synthetic: SyntheticConfig | None = doc(None, "generate the synthetic referring dataset if absent")
    num_workers: int = doc(2, "data loader workers per rank; the training stream depends on it (an exact resume "
                              "needs the same number)")
    max_expressions_per_image: int = doc(3, "(expression, mask) pairs drawn per training image")
    expression_sampling: str = doc("sentences", "how a referring training image's expressions are drawn: "
                                                "sentences (EVF-SAM's way: distinct sentences from all sentences "
                                                "of all its objects, each with its object's mask) or objects "
                                                "(distinct objects, one random sentence each)")
    negatives_per_image: int = doc(0, "training: up to this many no-target expressions per image, naming categories "
                                      "of the source's vocabulary.json absent from the image (0: off)")
    max_text_length: int = doc(64, "tokens per expression, </s> included")
    mixing: str = doc("sample", "sample: sources mixed per sample; batch: each batch from one source")
    samples_per_epoch: int = doc(0, "training images per epoch over all ranks (0: one pass of the mixture)")
    strict: bool = doc(False, "raise on a bad sample instead of skipping and counting it")
    val_batch_size: int = doc(4, "images per validation batch per rank")
    shuffle_buffer: int = doc(256, "raw samples (bytes) held per source and worker for shuffling")
    shuffle_shards: int = doc(1, "consecutive shards shuffled together; resuming re-reads up to this many per "
                                 "source and worker")
    embedding_cache: str | None = doc(None, "folder of precomputed SAM image features (evfsam-cache-embeddings): "
                                            "training skips the image encoder (validation keeps the images); needs "
                                            "model.mode=frozen_image_encoder")
    sam_resize: str = doc("auto", "where SAM-1's Pillow resize runs: worker, device (after the transfer, same "
                                  "pixels; frees the workers on a GPU), or auto (device when training on a GPU)")


@dataclass
class OptimConfig:
    lr: float = doc(3e-4, "peak learning rate (AdamW)")
    weight_decay: float = doc(0.0, "AdamW weight decay (never on norms, biases, embedding tables)")
    betas: list[float] = doc(help="AdamW betas", factory=lambda: [0.9, 0.95])
    eps: float = doc(1e-8, "AdamW epsilon")
    warmup_steps: int = doc(100, "linear warm-up steps")
    schedule: str = doc("linear", "decay after warm-up: linear, cosine or constant")
    min_lr_ratio: float = doc(0.0, "final LR as a fraction of lr")
    grad_clip: float = doc(1.0, "gradient-norm clipping (0: off)")
    bce_weight: float = doc(2.0, "weight of the BCE part of the mask loss")
    dice_weight: float = doc(0.5, "weight of the Dice part of the mask loss")
    max_nonfinite_steps: int = doc(20, "stop after this many consecutive non-finite losses")
    presence_weight: float = doc(1.0, "weight of the presence head's BCE term (with model.presence_head)")


@dataclass
class StrategyConfig:
    name: str = doc("auto", "auto, ddp, deepspeed (ZeRO) or fsdp (FSDP2 via ModelParallelStrategy)")
    zero_stage: int = doc(2, "DeepSpeed ZeRO stage (1, 2 or 3)")
    offload: bool = doc(False, "DeepSpeed ZeRO-Offload of optimizer state to CPU (DeepSpeedCPUAdam)")
    deepspeed_config: str | None = doc(None, "raw DeepSpeed JSON passed through (overrides zero_stage/offload)")


@dataclass
class TrainerConfig:
    accelerator: str = doc("auto", "cpu, gpu or auto")
    devices: int = doc(1, "devices (processes) per node")
    num_nodes: int = doc(1, "nodes")
    precision: str = doc("32", "32, bf16-mixed, 16-mixed, or auto (bf16-mixed on a GPU that has it, else 32)")
    global_batch_size: int = doc(8, "images per optimizer step over all ranks")
    micro_batch_size: int = doc(8, "images per forward per rank; accumulation = global / (micro x ranks)")
    max_steps: int = doc(1000, "optimizer steps")
    max_epochs: float = doc(0.0, "if > 0: train this many passes over the training data (sets max_steps from "
                                 "the shards' sizes.json, so the recipe fits any dataset size)")
    val_every_n_steps: int = doc(500, "validate every N optimizer steps (0: once, at the last step)")
    val_every_n_epochs: float = doc(0.0, "if > 0: validate every this many passes (sets val_every_n_steps)")
    log_every_n_steps: int = doc(10, "scalar logging interval")
    limit_val_batches: int = doc(0, "validation batches per run (0: all)")
    deterministic: bool = doc(False, "torch deterministic algorithms")


@dataclass
class CheckpointConfig:
    every_n_steps: int = doc(500, "save every N optimizer steps (and always at the end); 0: only at the end "
                                  "and on preemption")
    keep_top_k: int = doc(1, "best checkpoints kept by validation cIoU (besides the last)")
    keep_last: int = doc(2, "newest periodic checkpoints kept (2: one to fall back to should the newest be damaged)")
    save_frozen: bool = doc(True, "false: leave frozen weights out (reloaded from their source on resume)")
    resume: str = doc("auto", "auto (newest complete checkpoint of the run that verifies; a damaged one is skipped "
                              "with a warning), false (start over), or a checkpoint path (a .ckpt file or a "
                              "DeepSpeed/FSDP checkpoint directory)")
    reset_data_position: bool = doc(False, "resume on another process layout (devices x nodes, workers, micro-batch): "
                                           "keep weights, optimizer, schedule and step, restart the data stream at "
                                           "the new layout's next epoch boundary with shards not yet read")
    early_stopping_patience: int = doc(0, "stop after this many validations without a better val/ciou (0: off)")


#: logging.loggers -> (module that must import, the pip extra that installs it)
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", None), "csv": (None, None), "mlflow": ("mlflow", "mlflow"),
                   "wandb": ("wandb", "wandb")}


@dataclass
class LoggingConfig:
    loggers: list[str] = doc(help="any of tensorboard (<run dir>/tensorboard), csv (<run dir>/csv/version_<n>/metrics.csv, one per start), "
                                  "mlflow (<run dir>/mlruns unless MLFLOW_TRACKING_URI is set), wandb (honours "
                                  "WANDB_MODE; offline runs under <run dir>/wandb); a resumed run continues the same "
                                  "MLflow run and W&B run id", factory=lambda: ["tensorboard"])
    project: str = doc("evfsam", "MLflow experiment and W&B project name (the run is named after `name`)")
    tensorboard: bool = doc(True, "false: leave tensorboard out of logging.loggers (older recipes' switch)")
    val_images: int = doc(8, "validation samples drawn as images (image, truth, prediction, text)")
    progress_bar: bool = doc(True, "console progress bar")


@dataclass
class RunConfig:
    name: str = doc("run", "run name; the run directory is <root_dir>/<name> (stable across restarts)")
    root_dir: str = doc("runs", "where run directories live")
    seed: int = doc(0, "seed of model init and data order")
    model: ModelConfig = doc(help="model", factory=ModelConfig)
    data: DataConfig = doc(help="data", factory=DataConfig)
    optim: OptimConfig = doc(help="optimisation", factory=OptimConfig)
    trainer: TrainerConfig = doc(help="trainer", factory=TrainerConfig)
    strategy: StrategyConfig = doc(help="distributed strategy", factory=StrategyConfig)
    checkpoint: CheckpointConfig = doc(help="checkpoints and resume", factory=CheckpointConfig)
    logging: LoggingConfig = doc(help="logging", factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.root_dir) / self.name

    @property
    def world_size(self) -> int:
        return self.trainer.devices * self.trainer.num_nodes

    @property
    def accumulate_grad_batches(self) -> int:
        return self.trainer.global_batch_size // (self.trainer.micro_batch_size * self.world_size)


_CHOICES = {
    "model.mode": ("frozen_image_encoder", "full"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "strategy.name": ("auto", "ddp", "deepspeed", "fsdp"),
    "trainer.precision": ("32", "bf16-mixed", "16-mixed", "auto"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda"),
}
_DATA_CHOICES = {  # key under `data.`: allowed values
    "mixing": ("sample", "batch"),
    "expression_sampling": ("sentences", "objects"),
    "sam_resize": ("auto", "worker", "device"),
}


def _get(cfg: Any, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# -- value ranges of every numeric key (checked before any work) --------------------------------
_AT_LEAST = {  # key: smallest allowed value
    "seed": 0, "optim.weight_decay": 0, "optim.warmup_steps": 0, "optim.grad_clip": 0, "optim.bce_weight": 0,
    "optim.dice_weight": 0, "optim.max_nonfinite_steps": 1, "trainer.val_every_n_steps": 0,
    "trainer.log_every_n_steps": 1, "trainer.limit_val_batches": 0, "checkpoint.every_n_steps": 0,
    "checkpoint.keep_top_k": 0, "logging.val_images": 0, "optim.presence_weight": 0,
}
_DATA_AT_LEAST = {  # key under `data.`: smallest allowed value
    "num_workers": 0, "max_expressions_per_image": 1, "max_text_length": 2, "samples_per_epoch": 0,
    "val_batch_size": 1, "shuffle_buffer": 1, "shuffle_shards": 1, "negatives_per_image": 0,
    "synthetic.train": 1, "synthetic.val": 1, "synthetic.seed": 0, "synthetic.image_size": 32,
}
_POSITIVE = ("optim.lr", "optim.eps", "model.lora.alpha")
_FRACTION = ("optim.min_lr_ratio", "model.presence_threshold")  # in [0, 1]


def _check_at_least(obj: Any, table: dict[str, float], prefix: str = "") -> None:
    for key, low in table.items():
        value = _get(obj, key)
        if not value >= low:  # also refuses NaN
            raise ConfigError(f"{prefix}{key}={value} must be at least {low}")


def _check_choices(obj: Any, table: dict[str, tuple], prefix: str = "") -> None:
    for key, allowed in table.items():
        if _get(obj, key) not in allowed:
            raise ConfigError(f"{prefix}{key}={_get(obj, key)!r} is not allowed (allowed: {', '.join(allowed)})")


def _check_ranges(cfg: RunConfig) -> None:
    _check_at_least(cfg, _AT_LEAST)
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be positive")
    for key in _FRACTION:
        if not 0 <= _get(cfg, key) <= 1:
            raise ConfigError(f"{key}={_get(cfg, key)} must be in [0, 1]")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas={list(betas)} must be two numbers in [0, 1)")


def validate_data(data: DataConfig) -> None:
    """The data section's own checks (ranges, allowed values, sources), with messages naming the
    `data.` key. `validate` runs them for a recipe; the data module runs them for a DataConfig
    built in code (evaluation, tests, benchmarks)."""
    _check_at_least(data, {k: low for k, low in _DATA_AT_LEAST.items()
                           if data.synthetic is not None or not k.startswith("synthetic.")}, "data.")
    _check_choices(data, _DATA_CHOICES, "data.")
    for src in data.train:
        if not src.weight > 0:
            raise ConfigError(f"data.train source {src.name!r}: weight={src.weight} must be positive")
    for key in ("train", "val"):
        check_unique_names(getattr(data, key), f"data.{key}")


def check_unique_names(sources: list[SourceConfig], key: str) -> None:
    """Sources are told apart by name (batches, metrics, seeds, the data position): no name twice."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: source names must differ, got {names}")


def _check_run_paths(cfg: RunConfig) -> None:
    """root_dir must be (or become) a folder; checkpoint.resume false, auto, or an existing checkpoint that
    looks intact and safe."""
    import zipfile

    for parent in (cfg.run_dir, *cfg.run_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"root_dir={cfg.root_dir!r}: {parent} is a file, not a folder (choose another "
                                  "root_dir)")
            break
    resume = cfg.checkpoint.resume
    path = Path(resume)
    if resume in ("auto", "false"):
        pass
    elif not path.exists():
        raise ConfigError(f"checkpoint.resume={resume!r}: no such checkpoint (use auto, false, or a checkpoint "
                          "path)")
    elif path.is_dir():
        if not ((path / "latest").is_file() or any(path.glob("*.distcp"))
                or any(path.glob("*/mp_rank_*_model_states.pt"))):
            raise ConfigError(f"checkpoint.resume={resume!r}: a directory that is not a DeepSpeed or FSDP "
                              "checkpoint (give a .ckpt file, or auto)")
    elif not zipfile.is_zipfile(path):
        raise ConfigError(f"checkpoint.resume={resume!r}: not a PyTorch checkpoint (not a complete zip archive: "
                          "truncated, damaged, or another kind of file)")
    else:  # unpickle the structure only (tensors memory-mapped, not read): code in the pickle is refused here
        import pickle

        import torch

        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise ConfigError(f"checkpoint.resume={resume!r}: refused, the file holds code or objects a checkpoint "
                              "does not (unsafe pickle; only resume from checkpoints you trust)") from None
        except (RuntimeError, EOFError, ValueError) as e:
            raise ConfigError(f"checkpoint.resume={resume!r}: damaged checkpoint ({str(e).splitlines()[0]})") from None


def validate(cfg: RunConfig) -> RunConfig:
    """Checks that need more than a type: allowed values and impossible combinations."""
    if str(cfg.checkpoint.resume).lower() == "false":  # OmegaConf turns `resume=false` into the bool False
        cfg.checkpoint.resume = "false"
    _check_ranges(cfg)
    validate_data(cfg.data)
    _check_choices(cfg, _CHOICES)
    t = cfg.trainer
    for key in ("devices", "num_nodes", "global_batch_size", "micro_batch_size", "max_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(t, key)} must be at least 1")
    per_step = t.micro_batch_size * cfg.world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by trainer.micro_batch_size "
            f"x devices x num_nodes = {t.micro_batch_size} x {t.devices} x {t.num_nodes} = {per_step}")
    if cfg.strategy.zero_stage not in (1, 2, 3):
        raise ConfigError(f"strategy.zero_stage={cfg.strategy.zero_stage} is not allowed (allowed: 1, 2, 3)")
    if cfg.strategy.offload and cfg.strategy.name != "deepspeed":
        raise ConfigError("strategy.offload=true needs strategy.name=deepspeed")
    if cfg.model.size == "custom" and not cfg.model.dims:
        raise ConfigError("model.size=custom needs model.dims")
    if cfg.model.size == "auto" and not cfg.model.pretrained:
        raise ConfigError("model.size=auto takes the size from model.pretrained, which is not set")
    if cfg.model.lora.rank < 0:
        raise ConfigError(f"model.lora.rank={cfg.model.lora.rank} must be 0 (off) or positive")
    for key in ("max_epochs", "val_every_n_epochs"):
        if getattr(t, key) < 0:
            raise ConfigError(f"trainer.{key}={getattr(t, key)} must be 0 (off) or positive")
    has_val = bool(cfg.data.val) or cfg.data.synthetic is not None
    if cfg.checkpoint.early_stopping_patience < 0:
        raise ConfigError(f"checkpoint.early_stopping_patience={cfg.checkpoint.early_stopping_patience} must be "
                          "0 (off) or positive")
    if cfg.checkpoint.early_stopping_patience and not has_val:
        raise ConfigError("checkpoint.early_stopping_patience needs validation data (data.val)")
    if not cfg.data.train and cfg.data.synthetic is None:
        raise ConfigError("data.train is empty and data.synthetic is not set: nothing to train on")
    if not cfg.checkpoint.save_frozen and cfg.model.mode == "full" and not cfg.model.freeze:
        raise ConfigError("checkpoint.save_frozen=false with model.mode=full: there are no frozen weights to "
                          "leave out")
    m = cfg.model
    if not cfg.checkpoint.save_frozen and not m.pretrained:
        # The frozen weights of both parts (at least the ones the text path never uses) come back
        # from these files on resume, consolidation and export.
        unset = [k for k in ("sam_checkpoint", "beit3_checkpoint") if not getattr(m, k)]
        if unset:
            raise ConfigError(f"checkpoint.save_frozen=false: frozen weights are restored from their pretrained "
                              f"files, but model.{unset[0]} is not set (set model.pretrained, or model.sam_checkpoint "
                              "and model.beit3_checkpoint, or checkpoint.save_frozen=true)")
    if cfg.data.embedding_cache:
        if cfg.model.mode != "frozen_image_encoder":
            raise ConfigError(f"data.embedding_cache needs a frozen SAM image encoder: model.mode="
                              f"{cfg.model.mode!r} trains it, so cached features would be stale "
                              "(use model.mode=frozen_image_encoder, or drop data.embedding_cache)")
        encoder = "visual_model.vision_encoder."
        for prefix in cfg.model.unfreeze:
            if encoder.startswith(prefix) or prefix.startswith(encoder):
                raise ConfigError(f"data.embedding_cache needs a frozen SAM image encoder: model.unfreeze "
                                  f"entry {prefix!r} trains it")
    _validate_loggers(cfg.logging)
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be at least 1")
    _check_run_paths(cfg)
    return cfg


def _validate_loggers(logging: LoggingConfig) -> None:
    import importlib.util

    unknown = [name for name in logging.loggers if name not in LOGGER_PACKAGES]
    if unknown:
        raise ConfigError(f"logging.loggers: unknown logger {unknown[0]!r} (allowed: {', '.join(LOGGER_PACKAGES)})")
    if len(set(logging.loggers)) != len(logging.loggers):
        raise ConfigError(f"logging.loggers={logging.loggers} names a logger twice")
    for name in logging.loggers:
        module, extra = LOGGER_PACKAGES[name]
        if module and importlib.util.find_spec(module) is None:
            install = f'pip install "evfsam-lightning[{extra}]"' if extra else f"pip install {module}"
            raise ConfigError(f"logging.loggers: {name} needs the {module} package, which is not installed "
                              f"({install})")


def load(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Recipe YAML + `key=value` overrides -> a validated `RunConfig`."""
    base = OmegaConf.structured(RunConfig)
    try:
        layers = [base]
        if recipe is not None:
            layers.append(_load_recipe(Path(recipe)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must be key=value, got {bad}")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, recipe)) from None
    return validate(cfg)


def config_from_dict(d: dict) -> RunConfig:
    """A RunConfig from a plain dict (a checkpoint's saved hparams), defaults filled, not validated."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), d))


def _load_recipe(path: Path):
    """A recipe file as an OmegaConf mapping; a missing, unreadable, malformed or non-mapping file is
    a ConfigError naming it (YAML is parsed safely: tags that would build objects are refused)."""
    import yaml

    if not path.exists():
        raise ConfigError(f"recipe {path} not found (check the path; recipes/ holds the shipped ones)")
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a directory, not a YAML file")
    try:
        layer = OmegaConf.load(path)
    except OSError as e:
        raise ConfigError(f"recipe {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path}: not a text (YAML) file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe {path}: malformed YAML{line}: {problem}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"recipe {path}: the top level must be a mapping of keys (model:, data:, ...), "
                          f"not a {type(layer).__name__.replace('Config', '').lower()}")
    return layer


def _explain(e: OmegaConfBaseException, recipe) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    where = f" (recipe {recipe})" if recipe else ""
    if "is not a ListConfig" in msg:
        return f"`{key}`{where} must be a list, e.g. [a, b] (a single value is written [value])"
    if "not in" in msg or "Key '" in msg and "not" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _fields_at(parent)
        return f"unknown key `{key}`{where}; allowed here: {', '.join(allowed)}"
    return f"bad value for `{key}`{where}: {msg}"


def _fields_at(dotted: str) -> list[str]:
    cls: Any = RunConfig
    for part in [p for p in dotted.split(".") if p]:
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        sub = {f.name: f.default_factory for f in dataclasses.fields(cls)}.get(part)
        if sub in (None, dataclasses.MISSING) or not dataclasses.is_dataclass(sub):
            return sorted(types)
        cls = sub
    return [f.name for f in dataclasses.fields(cls)]


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def help_text(cls: Any = RunConfig, prefix: str = "") -> str:
    """Every key with its default and help, for `--help-config`."""
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            lines.append(f"{key}:  # {f.metadata.get('help', '')}")
            lines.append(help_text(sub, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (sub() if sub else "???")
        lines.append(f"  {key} = {default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
