"""One run schema: a data option is declared once (`config.DataConfig` / `SourceConfig`), and what
the pipeline takes from the model, trainer and run travels apart, in `PipelineSettings` (issue 15)."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from evfsam_lightning.config import ConfigError, DataConfig, SourceConfig, load
from evfsam_lightning.data.datamodule import EvfDataModule
from evfsam_lightning.data.settings import PipelineSettings
from evfsam_lightning.models.from_config import model_size
from evfsam_lightning.training.data_setup import data_for_run
from tests.data.conftest import write_source


def test_no_data_option_is_declared_in_two_dataclasses():
    options = {f.name for f in fields(DataConfig)} | {f.name for f in fields(SourceConfig)}
    assert not options & {f.name for f in fields(PipelineSettings)}


def test_settings_refuse_what_cannot_run():
    with pytest.raises(ConfigError, match="no tokenizer"):
        PipelineSettings(tokenizer="")
    with pytest.raises(ConfigError, match="batch_size=0"):
        PipelineSettings(tokenizer="tok", batch_size=0)


def test_a_recipe_reaches_the_data_module_with_the_run_s_settings(tmp_path, tokenizer_dir):
    """The recipe's data section arrives as it is (here a source's `sizes`, for shards without a
    sizes.json next to them); the settings come from the model, trainer and run."""
    write_source(tmp_path, "ade20k", 15, 3, sizes=False)
    sizes = tmp_path / "elsewhere.json"
    sizes.write_text(json.dumps({f"ade20k-{i:06d}.tar": 5 for i in range(3)}))
    (tmp_path / "recipe.yaml").write_text(f"""seed: 5
model: {{size: tiny, tokenizer: {tokenizer_dir}}}
trainer: {{accelerator: cpu, micro_batch_size: 3, global_batch_size: 3}}
data:
  num_workers: 0
  shuffle_buffer: 7
  train: [{{name: ade20k, urls: ["{tmp_path}/ade20k"], sizes: {sizes}}}]
""")
    cfg = load(tmp_path / "recipe.yaml")
    data, settings = data_for_run(cfg, model_size(cfg.model))
    assert data == DataConfig(**{**vars(cfg.data), "sam_resize": "worker"})  # auto, resolved for a CPU run
    assert settings == PipelineSettings(tokenizer=tokenizer_dir, batch_size=3, seed=5, sam_image_size=128,
                                        sam_variant="sam", beit_image_size=model_size(cfg.model).beit3.image_size)
    assert EvfDataModule(data, settings, rank=0, world_size=1).batches_per_epoch == 5  # 15 images / 3
