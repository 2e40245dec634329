"""The run config: every recipe validates, bad configs fail before any work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from evfsam_lightning.config import ConfigError, help_text, load
from evfsam_lightning.models.builders import build_model, model_config
from tests.conftest import REPO
from tests.training.conftest import QUICKSTART

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "evfsam_multitask.yaml", "evfsam_refcoco.yaml", "finetune_custom.yaml",
            "full_finetune.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_builds_its_model_on_meta(recipe: Path):
    cfg = load(recipe)
    text = recipe.read_text()
    assert text.startswith("#") and "evfsam-" in text.split("\n\n")[0], "recipes start with how to launch them"
    if cfg.model.size == "auto":  # the size of the pretrained folder, which the repository does not ship
        assert cfg.model.pretrained
        return
    size = model_config(dict(cfg.model.dims)) if cfg.model.size == "custom" else model_config(cfg.model.size)
    model = build_model(size, device="meta")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert cfg.trainer.global_batch_size % (cfg.trainer.micro_batch_size * cfg.world_size) == 0


def test_multitask_recipe_is_the_reference_setting():
    cfg = load(REPO / "recipes" / "evfsam_multitask.yaml")
    assert cfg.model.size == "evf-sam" and cfg.model.mode == "frozen_image_encoder"
    assert (cfg.strategy.name, cfg.strategy.zero_stage, cfg.trainer.precision) == ("deepspeed", 2, "bf16-mixed")
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.weight_decay) == (3e-4, [0.9, 0.95], 0.0)
    weights = {s.name: s.weight for s in cfg.data.train}
    referring = sum(w for n, w in weights.items() if n.startswith("ref"))
    assert (referring, weights["objects365"], weights["ade20k"], weights["partimagenet"],
            weights["humanparsing"], weights["pascal_part"]) == (16, 4, 4, 2, 2, 1)


@pytest.mark.parametrize("overrides,needle", [
    (["trainer.maxsteps=3"], "unknown key `trainer.maxsteps`"),
    (["modle.size=tiny"], "unknown key `modle`"),
    (["trainer.max_steps=many"], "trainer.max_steps"),
    (["trainer.devices=3"], "not divisible"),
    (["strategy.name=horovod"], "strategy.name='horovod' is not allowed"),
    (["model.mode=half"], "model.mode"),
    (["strategy.offload=true"], "strategy.offload=true needs strategy.name=deepspeed"),
    (["checkpoint.save_frozen=false", "model.mode=full"], "no frozen weights"),
    (["trainer.precision=64"], "trainer.precision"),
    (["checkpoint.resume=/nonexistent/x.ckpt"], "no such checkpoint"),
    (["model.size=auto"], "model.size=auto takes the size from model.pretrained"),
    (["model.lora.rank=-1"], "model.lora.rank"),
    (["checkpoint.early_stopping_patience=-2"], "early_stopping_patience"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs"),
    (["data.val=[{name: a, urls: [x]}, {name: a, urls: [y]}]"], "data.val: source names must differ"),
])
def test_bad_configs_fail_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load(REPO / "recipes" / "quickstart.yaml", overrides)
    assert needle in str(err.value)


def test_micro_batch_and_accumulation_derive_from_the_global_batch():
    cfg = load(REPO / "recipes" / "quickstart.yaml", ["trainer.global_batch_size=32", "trainer.micro_batch_size=4",
                                                       "trainer.devices=2"])
    assert cfg.accumulate_grad_batches == 4


def test_help_lists_every_key_with_its_meaning():
    text = help_text()
    for key in ("trainer.global_batch_size", "checkpoint.resume", "model.mode", "strategy.zero_stage"):
        assert key in text
    assert "#  " not in text.replace("# ", "#")  # every key has a help text


def test_cli_reports_config_errors_before_work(capsys):
    from evfsam_lightning.cli.train import main

    assert main([str(REPO / "recipes" / "quickstart.yaml"), "trainer.bogus=1"]) == 2
    assert "trainer.bogus" in capsys.readouterr().err


def test_pretrained_folder_gives_the_size_and_names_a_missing_file(tmp_path, tiny_tokenizer_dir):
    from evfsam_lightning.models.checkpoints import export_reference
    from evfsam_lightning.training.run import resolve_pretrained

    folder = export_reference(build_model("tiny"), tmp_path / "release", tokenizer_dir=tiny_tokenizer_dir)
    cfg = resolve_pretrained(load(REPO / "recipes" / "finetune_custom.yaml", [f"model.pretrained={folder}"]))
    assert model_config(dict(cfg.model.dims)) == model_config("tiny")
    (folder / "sentencepiece.bpe.model").unlink()
    with pytest.raises(ConfigError, match="missing sentencepiece.bpe.model"):
        resolve_pretrained(load(REPO / "recipes" / "finetune_custom.yaml", [f"model.pretrained={folder}"]))


def test_epochs_become_steps_from_the_shard_sizes(tmp_path):
    from evfsam_lightning.config import DataConfig, SourceConfig
    from evfsam_lightning.training.run import resolve_epochs

    (tmp_path / "sizes.json").write_text('{"shards": {"a-000000.tar": 70, "a-000001.tar": 30}}')
    for name in ("a-000000.tar", "a-000001.tar"):
        (tmp_path / name).write_bytes(b"")
    cfg = load(REPO / "recipes" / "finetune_custom.yaml")
    cfg = resolve_epochs(cfg, DataConfig(train=[SourceConfig("a", [str(tmp_path / "a-{000000..000001}.tar")])]))
    assert (cfg.trainer.max_steps, cfg.trainer.val_every_n_steps) == (125, 6)  # 100 images / 16 x 20, x 1


def test_sam_resize_auto_keeps_the_workers_resize_on_a_cpu_run():
    from evfsam_lightning.training.data_setup import resolve_sam_resize

    base = ["data.synthetic.dir=unused", "trainer.accelerator=cpu"]
    assert resolve_sam_resize(load(QUICKSTART, base)) == "worker"  # the quickstart's auto, on a CPU
    assert resolve_sam_resize(load(QUICKSTART, [*base, "data.sam_resize=device"])) == "device"
    with pytest.raises(ConfigError, match="data.sam_resize"):
        load(QUICKSTART, [*base, "data.sam_resize=gpu"])


@pytest.mark.slow
@pytest.mark.parametrize("max_steps, val_every, validated", [(3, 0, [3]), (4, 2, [2, 4])])
def test_validation_runs_at_the_steps_asked_not_at_the_ends_of_epochs(tmp_path, synthetic_dir, max_steps, val_every,
                                                                       validated):
    """2 steps an epoch (16 images of 8): `val_every_n_steps=0` validates once, at the last step (it
    validated at step 2, the end of the first epoch, and never at the end of the run), and N > 0 at
    every N-th step. Each validation leaves its best-checkpoint candidate, named by its step."""
    from evfsam_lightning.training.run import train
    from tests.conftest import one_torch_thread
    from tests.training.conftest import small_run

    cfg = load(QUICKSTART, [*small_run(synthetic_dir), "data.samples_per_epoch=16", f"trainer.max_steps={max_steps}",
                            f"trainer.val_every_n_steps={val_every}", "trainer.limit_val_batches=1",
                            f"checkpoint.keep_top_k={max_steps}", "checkpoint.every_n_steps=0", "logging.val_images=0",
                            "logging.tensorboard=false", "logging.progress_bar=false", f"root_dir={tmp_path}"])
    with one_torch_thread():
        train(cfg)
    best = sorted(p.name for p in (tmp_path / cfg.name / "checkpoints").glob("best-*.ckpt"))
    assert [int(name[len("best-step"):][:8]) for name in best] == validated, best
