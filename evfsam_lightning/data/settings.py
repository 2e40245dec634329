"""`PipelineSettings`: what the data module takes from outside the recipe's `data:` section.

A data option a user sets is a field of `config.DataConfig` (the one run schema) and only there;
`tests/data/test_settings.py` fails when a name is declared in both. These settings are derived
from the model (image sizes, SAM variant), the trainer (micro-batch size) or the run (seed, the
tokenizer folder once `model.tokenizer` / `model.pretrained` / the synthetic data set is resolved);
`training.data_setup.data_for_run` builds them with the run's resolved `DataConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError
from .examples import SAM_VARIANTS


@dataclass(frozen=True)
class PipelineSettings:
    """Derived and resolved values the data pipeline needs; not a place for user options."""

    tokenizer: str
    """Folder with the XLM-R `sentencepiece.bpe.model` (and `added_tokens.json`)."""
    batch_size: int = 2
    """Training images per micro-batch and rank (`trainer.micro_batch_size`)."""
    seed: int = 0
    """Seed of the whole training stream (the run's `seed`)."""
    sam_image_size: int = 1024
    """SAM input size S (the model's)."""
    sam_variant: str = "sam"
    """"sam": SAM-1 (longest side to S, zero padding); "sam2": plain resize to S x S (the model's family)."""
    beit_image_size: int = 224
    """BEiT-3 input size (the model's)."""

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise ConfigError("no tokenizer folder given to the data pipeline (one holding sentencepiece.bpe.model)")
        for name in ("batch_size", "sam_image_size", "beit_image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be at least 0")
        if self.sam_variant not in SAM_VARIANTS:
            raise ConfigError(f"sam_variant {self.sam_variant!r} not in {SAM_VARIANTS}")
