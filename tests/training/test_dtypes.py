"""Issue 12, items 1-3: input dtypes owned by the model, `checkpoint.save_frozen=false` under every
strategy, non-finite losses under DeepSpeed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evfsam_lightning.config import ConfigError, load
from evfsam_lightning.models.builders import build_model
from tests.conftest import REPO
from tests.training.conftest import clean_env, run_training, small_run, synthetic_dir  # noqa: F401

QUICKSTART = REPO / "recipes" / "quickstart.yaml"


# -- item 1: one owner of input dtypes -----------------------------------------------------------
@pytest.mark.parametrize("size", ["tiny", "tiny-sam2"])
def test_the_model_casts_its_inputs_to_its_weights_dtype(size, tmp_path):
    """What DeepSpeed's bf16 engine (or bf16-true) holds: bf16 weights, while the pixels are made in
    float32 after Lightning's precision cast and cached features arrive in bf16 whatever the run."""
    from evfsam_lightning.models.evfsam import collate_inference

    torch.manual_seed(0)
    model = build_model(size).eval()
    image = torch.randint(0, 255, (40, 56, 3), dtype=torch.uint8).numpy()
    batch = collate_inference(model, image, ["x", "y"], _tokenizer(tmp_path / "tok"))
    assert batch["sam_pixel_values"].dtype == batch["beit_pixel_values"].dtype == torch.float32
    reference = model(batch).low_res_logits
    with torch.no_grad():
        bf16 = model.to(torch.bfloat16)(batch).low_res_logits  # float32 inputs, bf16 weights
        assert bf16.dtype == torch.bfloat16
        features = model.encode_images(batch["sam_pixel_values"])  # float32 pixels
        assert all(v.dtype == torch.bfloat16 for v in features.values())
        model.float()
        cached = model(batch, image_features=features).low_res_logits  # bf16 features, fp32 weights
    assert cached.dtype == torch.float32
    assert (bf16.float() - reference).abs().max() < 0.5 and (cached - reference).abs().max() < 0.5


def _tokenizer(folder: Path):
    from evfsam_lightning.data.tokenizer import build_tokenizer, load_tokenizer

    build_tokenizer(["the red circle", "a blue square", "x", "y"] * 10, folder, vocab_size=40)
    return load_tokenizer(folder)


# -- item 2: save_frozen=false ---------------------------------------------------------------------
def test_save_frozen_false_needs_a_source_for_the_frozen_weights():
    with pytest.raises(ConfigError, match="model.sam_checkpoint is not set"):
        load(QUICKSTART, ["model.mode=frozen_image_encoder", "checkpoint.save_frozen=false"])
    load(QUICKSTART, ["model.mode=frozen_image_encoder", "checkpoint.save_frozen=false", "model.pretrained=x"])


def test_a_checkpoint_lacking_a_trainable_weight_is_refused_naming_it():
    from evfsam_lightning.models.checkpoints import CheckpointError
    from evfsam_lightning.training.strategies import refuse_missing_trainable

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    refuse_missing_trainable(model, ["1.weight", "1.bias"], "c")  # frozen ones may be absent
    with pytest.raises(CheckpointError, match=r"checkpoint c lacks trainable weights: 1\.bias"):
        refuse_missing_trainable(model, ["0.weight", "0.bias", "1.weight"], "c")


STRATEGIES = {
    "ddp": ["strategy.name=ddp"],
    # the production recipes' setting (and the issue's "Input type (float) and bias type" repro)
    "deepspeed2-bf16": ["strategy.name=deepspeed", "strategy.zero_stage=2", "trainer.precision=bf16-mixed"],
    "deepspeed3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
    "fsdp": ["strategy.name=fsdp"],
}


def _saved_keys(ckpt: Path) -> set[str]:
    """The tensor keys a checkpoint holds on disk, as the strategy wrote them."""
    if ckpt.is_file():
        return set(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    if (ckpt / "latest").is_file():
        keys = set()
        for f in ckpt.rglob("*model_states.pt"):
            keys |= set(torch.load(f, map_location="cpu", weights_only=True)["module"])
        return keys
    from torch.distributed.checkpoint import FileSystemReader

    return {k[len("state_dict."):] for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
            if k.startswith("state_dict.")}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, synthetic_dir) -> Path:  # noqa: F811
    """A tiny seeded EVF-SAM in the official layout: the fp32 source of the frozen weights."""
    from evfsam_lightning.models.checkpoints import export_reference

    torch.manual_seed(7)
    return export_reference(build_model("tiny"), tmp_path_factory.mktemp("pre") / "evf",
                            tokenizer_dir=synthetic_dir / "tokenizer")


def _save_frozen_false_in_recipes() -> set[str]:
    from evfsam_lightning.config import load
    from tests.training.test_strategies import strategy_key

    out = set()
    for recipe in (REPO / "recipes").glob("*.yaml"):
        cfg = load(recipe)
        if not cfg.checkpoint.save_frozen and cfg.model.mode != "full":
            key = strategy_key(cfg)
            out.add(f"{key}-bf16" if key == "deepspeed2" and cfg.trainer.precision == "bf16-mixed" else key)
    return out


#: Those a recipe runs with save_frozen=false and frozen weights are checked the same way (no frozen key
#: on disk, fp32 frozen weights back from the pretrained files bit for bit) by the recipe matrix.
NOT_IN_RECIPES = [s for s in STRATEGIES if s not in _save_frozen_false_in_recipes()]


def test_every_strategy_runs_save_frozen_false_in_the_matrix_or_here():
    assert set(NOT_IN_RECIPES) | _save_frozen_false_in_recipes() >= set(STRATEGIES)
    assert {"ddp", "deepspeed2-bf16"} <= _save_frozen_false_in_recipes()  # finetune_custom, the DeepSpeed recipes


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", NOT_IN_RECIPES)
def test_save_frozen_false_under_every_strategy(strategy, pretrained, synthetic_dir, tmp_path):  # noqa: F811
    from evfsam_lightning.models.checkpoints import load_reference_folder
    from evfsam_lightning.training.callbacks import find_resume_checkpoint
    from evfsam_lightning.training.loading import load_for_inference

    run = small_run(synthetic_dir, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.global_batch_size=4",
                    "trainer.micro_batch_size=2", "model.mode=frozen_image_encoder",
                    f"model.pretrained={pretrained}", "checkpoint.save_frozen=false", "checkpoint.every_n_steps=2",
                    "logging.tensorboard=false", *STRATEGIES[strategy])
    run_training(tmp_path, *run, "trainer.max_steps=2")
    folder = tmp_path / "runs" / "quickstart" / "checkpoints"
    first = find_resume_checkpoint(folder)
    source, _ = load_reference_folder(pretrained)
    from evfsam_lightning.training.trainable import apply_trainable

    split = apply_trainable(source, "sam", "frozen_image_encoder")
    frozen = {f"model.{n}" for n in split["frozen"]}
    saved = _saved_keys(first)
    assert frozen and not frozen & saved, sorted(frozen & saved)[:5]
    assert {f"model.{n}" for n in split["trainable"]} <= saved

    result = run_training(tmp_path, *run, "trainer.max_steps=4")
    assert "resuming from" in result.stdout
    final = find_resume_checkpoint(folder)
    assert final != first and not frozen & _saved_keys(final)

    # Consolidation and loading take the frozen weights from the fp32 pretrained folder, bit for bit.
    model, _ = load_for_inference(final)
    reference, trained = source.state_dict(), model.state_dict()
    for name in split["frozen"]:
        assert trained[name].dtype == torch.float32 and torch.equal(trained[name], reference[name]), name
    assert any(not torch.equal(trained[n], reference[n]) for n in split["trainable"])


# -- item 3: non-finite losses under DeepSpeed -------------------------------------------------------
def _nonfinite_job(*args: str) -> dict:
    job = subprocess.run([sys.executable, "-m", "tests.training.deepspeed_nonfinite_job", *args], cwd=REPO,
                         env={**clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    line = [x for x in job.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "bf16-no-overflow-check"])
def test_a_nan_loss_under_deepspeed_leaves_weights_and_optimizer_bit_identical(precision, tmp_path):
    """The third of four steps has a NaN loss: the ZeRO-2 engine skips it (weights, fp32 master
    weights and Adam state bit-identical across that step) and `train/nonfinite_steps` counts it.
    The last case turns DeepSpeed's own bf16 check off in a raw JSON: it is forced back on."""
    args = [precision]
    if precision == "bf16-no-overflow-check":
        config = tmp_path / "ds.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                                      "bf16": {"enabled": True, "check_grad_overflow": False}}))
        args = ["bf16-mixed", f"strategy.deepspeed_config={config}"]
    result = _nonfinite_job(*args, "optim.grad_clip=0")
    assert result["error"] is None
    assert result["changed"] == [], result["changed"][:5]
    assert result["nonfinite_steps"] == 1 and result["logged"] == 1.0 and result["global_step"] == 4
