"""The parity tool against the reference fixture: it passes, and it fails when the model is wrong."""

from __future__ import annotations

import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import REPO, fixture_dir

TOOL = REPO / "tools" / "check_parity.py"


def _run(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), str(path)], capture_output=True, text=True, timeout=300)


def test_parity_fixture_a_passes():
    result = _run(fixture_dir("evfsam_parity_a"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout
    for name in ("image_embeddings", "beit3_feature", "low_res_masks_all", "iou_predictions_all", "mask_logits",
                 "pred_mask", "loss", "grad.text_hidden_fcs.0.0.weight"):
        assert any(line.startswith(name + " ") and line.rstrip().endswith("pass")
                   for line in result.stdout.splitlines()), name


def _perturbed_copy(tmp_path, key: str):
    src = fixture_dir("evfsam_parity_a")
    dst = tmp_path / "fixture"
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "weights.safetensors"))
    weights[key] = weights[key] + 0.05 * torch.randn_like(weights[key])
    save_file(weights, str(dst / "weights.safetensors"))
    return dst


def test_parity_fails_on_a_wrong_decoder_weight(tmp_path):
    result = _run(_perturbed_copy(tmp_path, "visual_model.mask_decoder.output_hypernetworks_mlps.2.layers.1.weight"))
    assert result.returncode == 1
    failed = [line.split()[0] for line in result.stdout.splitlines() if line.rstrip().endswith("FAIL")]
    assert "low_res_masks_all" in failed and "low_res_masks" not in failed  # only mask token 2 changed


def test_parity_fails_on_a_swapped_multiway_branch(tmp_path):
    src = fixture_dir("evfsam_parity_a")
    dst = tmp_path / "fixture"
    shutil.copytree(src, dst)
    w = load_file(str(dst / "weights.safetensors"))
    a, b = "mm_extractor.beit3.encoder.layers.0.ffn.A.fc1.weight", "mm_extractor.beit3.encoder.layers.0.ffn.B.fc1.weight"
    w[a], w[b] = w[b].clone(), w[a].clone()
    save_file(w, str(dst / "weights.safetensors"))
    result = _run(dst)
    assert result.returncode == 1 and "beit3_feature" in result.stdout
