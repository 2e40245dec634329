"""evfsam-eval, evfsam-predict and evfsam-export on a checkpoint of a real (short) training run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from evfsam_lightning.training.callbacks import find_resume_checkpoint
from tests.training.conftest import clean_env, run_training, small_run, synthetic_dir  # noqa: F401


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dir):  # noqa: F811
    cwd = tmp_path_factory.mktemp("trained")
    run_training(cwd, *small_run(synthetic_dir, "trainer.max_steps=6", "checkpoint.every_n_steps=6",
                                 "model.mode=frozen_image_encoder", "checkpoint.save_frozen=true"))
    return cwd, find_resume_checkpoint(cwd / "runs" / "quickstart" / "checkpoints"), synthetic_dir


def _cli(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", f"evfsam_lightning.cli.{module}", *args], cwd=cwd,
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_eval_gives_the_same_numbers_on_one_and_two_ranks(trained):
    cwd, ckpt, data = trained
    for devices in (1, 2):
        _cli("evaluate", "--checkpoint", str(ckpt), "--data", f"val={data / 'val'}", "--devices", str(devices),
             "--accelerator", "cpu", "--workers", "0", "--out", f"r{devices}.json", cwd=cwd)
    one, two = (json.loads((cwd / f"r{d}.json").read_text()) for d in (1, 2))
    # Bit-equal, every number: the metric states are int64 sums (README: the same numbers on any
    # number of ranks). With float sums gIoU differed in the last bit between 1 and 2 ranks.
    assert one["splits"]["val"] == two["splits"]["val"]
    assert one["splits"]["val"]["expressions"] > 16  # every object of every image, across both ranks


@pytest.mark.slow
def test_shuffled_expressions_change_the_result(trained):
    cwd, ckpt, data = trained
    _cli("evaluate", "--checkpoint", str(ckpt), "--data", f"val={data / 'val'}", "--workers", "0",
         "--accelerator", "cpu", "--shuffle-expressions", "--out", "shuffled.json", cwd=cwd)
    assert json.loads((cwd / "shuffled.json").read_text())["shuffled_expressions"] is True


@pytest.mark.slow
def test_predict_from_export_equals_predict_from_training_checkpoint(trained):
    cwd, ckpt, _ = trained
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(image).save(cwd / "image.png")
    _cli("export", "--checkpoint", str(ckpt), "--out", "exported", cwd=cwd)
    assert (cwd / "exported" / "model.safetensors").is_file()
    for name, source in (("from_ckpt", str(ckpt)), ("from_export", "exported")):
        _cli("predict", "--checkpoint", source, "--image", "image.png", "--text", "the red circle",
             "--out", f"{name}.png", "--logits", f"{name}.npy", cwd=cwd)
    a, b = np.load(cwd / "from_ckpt.npy"), np.load(cwd / "from_export.npy")
    assert a.shape == (90, 120) and np.array_equal(a, b)


@pytest.mark.slow
def test_frozen_weights_left_out_of_checkpoints_come_back_on_resume(tmp_path, synthetic_dir):  # noqa: F811
    pretrained = tmp_path / "pretrained"
    from evfsam_lightning.data.tokenizer import build_tokenizer
    from evfsam_lightning.models.builders import build_model
    from evfsam_lightning.models.checkpoints import export_reference

    torch.manual_seed(3)
    tok = build_tokenizer(["the red circle", "a blue square"] * 20, tmp_path / "tok", vocab_size=40)
    export_reference(build_model("tiny"), pretrained, tokenizer_dir=tok)
    base = small_run(synthetic_dir, "model.mode=frozen_image_encoder", f"model.pretrained={pretrained}",
                     "checkpoint.save_frozen=false", "checkpoint.every_n_steps=3")
    run_training(tmp_path, *base, "trainer.max_steps=3")
    ckpt = find_resume_checkpoint(tmp_path / "runs" / "quickstart" / "checkpoints")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not any(k.startswith("model.visual_model.vision_encoder.") for k in state["state_dict"])
    assert any(k.startswith("model.mm_extractor.") for k in state["state_dict"])
    result = run_training(tmp_path, *base, "trainer.max_steps=6")
    assert "resuming from" in result.stdout
    final = torch.load(find_resume_checkpoint(tmp_path / "runs" / "quickstart" / "checkpoints"),
                       map_location="cpu", weights_only=True)
    assert final["global_step"] == 6


@pytest.mark.slow
def test_export_writes_a_model_card_and_lists_what_push_to_hub_would_send(trained):
    """evfsam-export of a run directory: README.md with the Hub metadata and the run's evaluation
    (an evfsam-eval --out file in the run) as model-index; --push-to-hub --dry-run sends nothing
    (offline) and lists every file."""
    from huggingface_hub import ModelCard, metadata_load

    cwd, ckpt, _ = trained
    run_dir = cwd / "runs" / "quickstart"
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "val.json").write_text(json.dumps({
        "checkpoint": str(ckpt), "shuffled_expressions": False, "all": {"giou": 0.5, "ciou": 0.25},
        "splits": {"synthetic_val": {"giou": 0.5, "ciou": 0.25, "expressions": 40}}}))
    env = {**clean_env(), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "evfsam_lightning.cli.export", "--checkpoint", str(run_dir),
                             "--out", "carded", "--push-to-hub", "me/evf-tiny", "--private", "--dry-run"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    listed = result.stdout.split("would upload to https://huggingface.co/me/evf-tiny (private):")[1]
    for name in ("README.md", "config.json", "model.safetensors", "sentencepiece.bpe.model", "tokenizer_config.json"):
        assert f"  {name} (" in listed, result.stdout
    assert "evfsam-predict --checkpoint me/evf-tiny " in (cwd / "carded" / "README.md").read_text()
    meta = metadata_load(cwd / "carded" / "README.md")
    assert meta["pipeline_tag"] == "image-segmentation" and meta["library_name"] == "evfsam-lightning"
    results = {(r.dataset_name, r.metric_type): r.metric_value
               for r in ModelCard.load(cwd / "carded" / "README.md").data.eval_results}
    assert results[("synthetic_val", "giou")] == 50.0 and results[("synthetic_val", "ciou")] == 25.0
