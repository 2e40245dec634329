"""EVF-SAM2: parity with the reference fixture, the official key set, checkpoint round trips, and a
frozen SAM-2 under training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from evfsam_lightning.data import transforms
from evfsam_lightning.models.builders import build_model, model_config
from evfsam_lightning.models.checkpoints import (
    CheckpointError,
    export_reference,
    folder_model_config,
    from_reference,
    load_reference_folder,
    load_reference_weights,
    load_sam_checkpoint,
    to_reference,
)
from evfsam_lightning.models.parity_sam2 import model_config_from_manifest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "fixtures"
S2A = FIXTURES / "evfsam2_parity_a"
FULL_KEYS = FIXTURES / "official_full_keys_sam2_large.json"
VIDEO_PREFIXES = ("visual_model.memory_", "visual_model.obj_ptr_proj.", "visual_model.mask_downsample.",
                  "visual_model.maskmem_tpos_enc", "visual_model.no_mem_pos_enc", "visual_model.no_obj_ptr")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (it ships in ../shared/fixtures)")
    return path


def _run_parity(fixture: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "tools" / "check_parity.py"), str(fixture)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((_need(S2A) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def reference_weights() -> dict[str, torch.Tensor]:
    return load_file(str(_need(S2A) / "weights.safetensors"))


@pytest.fixture
def fixture_model(manifest):
    model = build_model(model_config_from_manifest(manifest))
    load_reference_weights(model, S2A / "weights.safetensors")
    return model


# -- parity -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_parity_tool_passes_on_s2a():
    result = _run_parity(_need(S2A))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "family sam2" in result.stdout and " 0 failed" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("key", ["visual_model.no_mem_embed", "visual_model.sam_mask_decoder.conv_s0.weight"])
def test_parity_tool_fails_on_a_perturbed_sam2_weight(tmp_path, reference_weights, key):
    fixture = tmp_path / "s2a"
    shutil.copytree(_need(S2A), fixture)
    weights = dict(reference_weights)
    weights[key] = weights[key] + 0.5
    (fixture / "weights.safetensors").chmod(0o644)
    save_file(weights, str(fixture / "weights.safetensors"))
    result = _run_parity(fixture)
    assert result.returncode != 0
    assert "FAIL" in result.stdout


# -- keys ---------------------------------------------------------------------------------------
def test_full_size_meta_model_exports_the_official_keys_and_shapes():
    expected = json.loads(_need(FULL_KEYS).read_text())
    model = build_model("evf-sam2", device="meta")
    exported = to_reference(model, model.state_dict())
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k["name"]: tuple(k["shape"]) for k in expected["keys"]}
    assert len(exported) == expected["num_tensors"] == 1875
    assert sum(v.numel() for v in exported.values()) == expected["num_params"] == 898_444_850


def test_reference_keys_round_trip(fixture_model, reference_weights):
    ours = from_reference(fixture_model, reference_weights)
    assert set(ours) == set(fixture_model.state_dict())
    back = to_reference(fixture_model, ours)
    assert set(back) == set(reference_weights)
    assert all(torch.equal(back[k], v) for k, v in reference_weights.items())
    for key in fixture_model.state_dict():  # key maps alone, for every key but the stacked point table
        if key != "visual_model.prompt_encoder.point_embed.weight":
            assert from_reference(fixture_model, to_reference(fixture_model, {key: 0})) == {key: 0}


def test_full_size_reference_keys_round_trip():
    model = build_model("evf-sam2", device="meta")
    state = model.state_dict()
    assert set(from_reference(model, to_reference(model, state))) == set(state)


# -- checkpoints ------------------------------------------------------------------------------------
def test_memory_tensors_survive_load_export_load(tmp_path, fixture_model, reference_weights):
    video = {k: v for k, v in reference_weights.items() if k.startswith(VIDEO_PREFIXES)}
    assert len(video) == 105
    # The memory modules are real modules now (the video tracker runs them), and never trained.
    from evfsam_lightning.training.trainable import apply_trainable

    memory = [n for n, _ in fixture_model.named_parameters() if n.startswith("visual_model.video_memory.")]
    assert len(memory) == 105
    for mode in ("frozen_image_encoder", "full"):
        sets = apply_trainable(fixture_model, "sam2", mode)
        assert not any(n.startswith("visual_model.video_memory.") for n in sets["trainable"])
        with pytest.raises(ValueError, match="never used"):
            apply_trainable(fixture_model, "sam2", mode, unfreeze=["visual_model.video_memory."])

    out = export_reference(fixture_model, tmp_path / "export")
    exported = load_file(str(out / "model.safetensors"))
    assert set(exported) == set(reference_weights)
    assert all(torch.equal(exported[k], v) for k, v in video.items())

    reloaded, _ = load_reference_folder(out, with_tokenizer=False)
    again = to_reference(reloaded, reloaded.state_dict())
    assert all(torch.equal(again[k], v) for k, v in reference_weights.items())


def test_mixed_dtype_reference_file_is_cast_per_tensor(tmp_path, manifest, reference_weights):
    mixed = {k: (v.to(torch.bfloat16) if k.startswith("mm_extractor.") or k.startswith(VIDEO_PREFIXES) else v)
             for k, v in reference_weights.items()}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    model = build_model(model_config_from_manifest(manifest))
    load_reference_weights(model, tmp_path / "mixed.safetensors")
    state = to_reference(model, model.state_dict())
    assert all(v.dtype == torch.float32 for v in state.values())
    assert all(torch.equal(state[k], v.float()) for k, v in mixed.items())


def test_official_evf_sam2_folder_config_is_recognised(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["EvfSam2Model"], "sam_scale": "large", "mm_extractor_scale": "large"}))
    assert folder_model_config(tmp_path) == model_config("evf-sam2")


def test_sam2_own_checkpoint_loads_into_the_sam_part(tmp_path, manifest, reference_weights):
    sam2 = {k[len("visual_model."):]: v for k, v in reference_weights.items() if k.startswith("visual_model.")}
    torch.save({"model": sam2}, tmp_path / "sam2_hiera_tiny_test.pt")
    model = build_model(model_config_from_manifest(manifest))
    beit3_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("visual_model.")}
    report = load_sam_checkpoint(model, tmp_path / "sam2_hiera_tiny_test.pt")
    assert report.loaded == len(sam2) - 3  # four point_embeddings rows become one table
    state = to_reference(model, model.state_dict())
    assert all(torch.equal(state["visual_model." + k], v) for k, v in sam2.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in beit3_before.items())


def test_sam1_checkpoint_into_sam2_model_is_refused(tmp_path, manifest):
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "sam_vit_b.pth")
    model = build_model(model_config_from_manifest(manifest))
    with pytest.raises(CheckpointError, match="family is 'sam2' but the file holds a sam checkpoint"):
        load_sam_checkpoint(model, tmp_path / "sam_vit_b.pth")


# -- behaviour ------------------------------------------------------------------------------------
def _tiny_batch(model, n_images: int = 2, per_image: int = 2, seed: int = 0) -> tuple[dict, list[torch.Tensor]]:
    rng = np.random.default_rng(seed)
    vm = model.visual_model
    sizes = [(40, 56), (72, 48)][:n_images]  # landscape and portrait
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    n = n_images * per_image
    batch = {
        "sam_pixel_values": torch.stack([vm.preprocess(im)[0] for im in images]),
        "beit_pixel_values": torch.stack([transforms.beit3_preprocess(im, model.beit3_image_size) for im in images]),
        "input_ids": torch.as_tensor(rng.integers(3, 500, (n, 5))),
        "attention_mask": torch.ones(n, 5, dtype=torch.bool),
        "image_index": torch.arange(n_images).repeat_interleave(per_image),
        "resize_hw": torch.tensor([[vm.image_size] * 2] * n_images),
        "original_hw": torch.tensor(sizes),
    }
    targets = [torch.as_tensor(rng.integers(0, 2, (per_image, h, w), dtype=np.uint8)) for h, w in sizes]
    return batch, targets


def test_decode_keeps_the_multimask_output_of_highest_iou():
    torch.manual_seed(0)
    model = build_model("tiny-sam2").eval()
    batch, _ = _tiny_batch(model)
    vm = model.visual_model
    with torch.no_grad():
        feats = model.encode_images(batch["sam_pixel_values"])
        prompt = model.prompt_embeddings(batch["beit_pixel_values"].index_select(0, batch["image_index"]),
                                         batch["input_ids"])
        masks, iou = vm.decode(feats, batch["image_index"], prompt, multimask_output=True)
        best_mask, best_iou = vm.decode(feats, batch["image_index"], prompt)
        out = model(batch)
    best = iou.argmax(1)
    assert masks.shape == (4, 3, 64, 64) and best_mask.shape == (4, 1, 64, 64) and best_iou.shape == (4, 1)
    assert torch.equal(best_mask[:, 0], masks[torch.arange(4), best]) and torch.equal(best_iou[:, 0], iou.max(1).values)
    assert torch.equal(out.low_res_logits, best_mask)
    assert [tuple(lg.shape) for lg in out.logits] == [(2, 40, 56), (2, 72, 48)]


def test_frozen_sam2_is_untouched_by_a_training_step():
    from evfsam_lightning.training.losses import mask_loss

    torch.manual_seed(0)
    model = build_model("tiny-sam2").train()
    model.visual_model.requires_grad_(False)
    sam_before = {k: v.clone() for k, v in model.visual_model.state_dict().items()}
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == sum(1 for n, _ in model.named_parameters() if n.startswith(("mm_extractor.", "text_hidden_fcs.")))
    trained_before = [p.detach().clone() for p in trained]
    optimizer = torch.optim.AdamW(trained, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    batch, targets = _tiny_batch(model)

    loss = mask_loss(model(batch).logits, targets)["loss"]
    loss.backward()
    optimizer.step()

    assert all(p.grad is None for p in model.visual_model.parameters())
    after = model.visual_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in sam_before.items())
    assert any(not torch.equal(p, b) for p, b in zip(trained, trained_before, strict=True))
    assert trained[-1].grad is not None and trained[-1].grad.abs().sum() > 0  # the projector learns


def test_sam2_resize_follows_torch_uint8_kernel_when_downsampling():
    """The reference resizes the uint8 tensor with F.interpolate (no antialias). Pillow agrees when
    both sides are upsampled (fixture S2A) but antialiases when downsampling."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(small).resize((64, 64), Image.BILINEAR))
    assert np.array_equal(transforms.sam2_resize(small, 64).permute(1, 2, 0).numpy(), pillow)

    large = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    ours = transforms.sam2_resize(large, 64)
    plain = F.interpolate(torch.from_numpy(large).permute(2, 0, 1)[None].float(), (64, 64), mode="bilinear",
                          align_corners=False)[0]
    assert (ours.float() - plain).abs().max() <= 1  # bilinear without antialias, up to uint8 rounding
    pillow = np.asarray(Image.fromarray(large).resize((64, 64), Image.BILINEAR))
    assert not np.array_equal(ours.permute(1, 2, 0).numpy(), pillow)
