"""LoRA on BEiT-3's attention: what trains, what checkpoints hold, and the export merged into plain
weights that predicts what the LoRA model predicts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from evfsam_lightning.models.checkpoints import CheckpointError, export_reference, load_reference_folder
from evfsam_lightning.models.lora import LoraLinear, add_lora, merge_lora
from evfsam_lightning.training.trainable import apply_trainable
from tests.training.conftest import clean_env, run_training, small_run


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (96, 112, 3), dtype=np.uint8)


def test_lora_targets_both_branches_and_starts_as_the_base_model(tiny_model, tiny_tokenizer_dir):
    from evfsam_lightning.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    tiny_model.eval()
    before = tiny_model.predict(_image(), "the red circle", tokenizer)
    names = add_lora(tiny_model, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    depth = tiny_model.config.beit3.depth
    assert len(names) == depth * 2 * 2  # layers x {q, v} x branches {A, B}
    assert all(n.endswith((".A", ".B")) for n in names)
    torch.testing.assert_close(tiny_model.predict(_image(), "the red circle", tokenizer), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not BEiT-3 attention projections"):
        add_lora(tiny_model, rank=4, alpha=8, targets=["fc1"])


def test_only_lora_projector_and_decoder_train(tiny_model):
    add_lora(tiny_model, rank=4, alpha=8)
    split = apply_trainable(tiny_model, "sam", "frozen_image_encoder", lora=True)
    beit3 = [n for n in split["trainable"] if n.startswith("mm_extractor.")]
    assert beit3 and all(n.endswith((".lora_a", ".lora_b")) for n in beit3)
    assert any(n.startswith("text_hidden_fcs.") for n in split["trainable"])
    assert any(n.startswith("visual_model.mask_decoder.") for n in split["trainable"])
    assert "mm_extractor.beit3.encoder.layers.0.self_attn.q_proj.A.weight" in split["frozen"]
    assert not any(n.startswith("visual_model.vision_encoder.") for n in split["trainable"])


def test_merge_gives_a_plain_model_with_the_same_function(tiny_model, tiny_tokenizer_dir, tmp_path):
    from evfsam_lightning.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    add_lora(tiny_model, rank=4, alpha=8)
    torch.manual_seed(1)
    for m in tiny_model.modules():
        if isinstance(m, LoraLinear):
            torch.nn.init.normal_(m.lora_b, std=0.05)  # a trained update
    tiny_model.eval()
    with pytest.raises(CheckpointError, match="unmerged LoRA"):
        export_reference(tiny_model, tmp_path / "bad")
    expected = tiny_model.predict(_image(), "the blue square on the left", tokenizer)
    assert merge_lora(tiny_model) == tiny_model.config.beit3.depth * 4 * 2
    assert not any(isinstance(m, LoraLinear) for m in tiny_model.modules())
    folder = export_reference(tiny_model, tmp_path / "merged", tokenizer_dir=tiny_tokenizer_dir)
    plain, _ = load_reference_folder(folder)
    torch.testing.assert_close(plain.eval().predict(_image(), "the blue square on the left", tokenizer), expected,
                               atol=1e-5, rtol=0)


@pytest.mark.slow
def test_lora_fine_tune_exports_merged_weights_that_predict_the_same(synthetic_dir, tmp_path):
    """A real LoRA run (frozen image encoder): its checkpoint holds the trained LoRA tensors;
    evfsam-export merges them; the exported folder loads into the plain model and predicts the
    same logits as the LoRA model within 1e-5."""
    from evfsam_lightning.data.tokenizer import load_tokenizer
    from evfsam_lightning.training.loading import load_for_inference

    run_training(tmp_path, *small_run(synthetic_dir, "trainer.max_steps=4", "model.mode=frozen_image_encoder",
                                      "model.lora.rank=4", "model.lora.alpha=8", "optim.warmup_steps=0",
                                      "optim.lr=1e-2", "name=lora"))
    run_dir = tmp_path / "runs" / "lora"
    ckpt = torch.load(next((run_dir / "checkpoints").glob("step-*.ckpt")), weights_only=True)
    lora_b = {k: v for k, v in ckpt["state_dict"].items() if k.endswith(".lora_b")}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: it trained
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "evfsam_lightning.cli.export", "--checkpoint", str(run_dir), "--out",
                    str(out)], cwd=tmp_path, env=clean_env(), check=True, capture_output=True, timeout=300)
    plain, _ = load_reference_folder(out)
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    lora_model, _ = load_for_inference(run_dir)
    assert any(isinstance(m, LoraLinear) for m in lora_model.modules())
    tokenizer = load_tokenizer(synthetic_dir / "tokenizer")
    for text in ("the red circle", "the blue one"):
        torch.testing.assert_close(plain.eval().predict(_image(), text, tokenizer),
                                   lora_model.predict(_image(), text, tokenizer), atol=1e-5, rtol=0)
