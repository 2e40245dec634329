"""Preprocessing and tokenizer beyond the fixture: orientation, padding side, special tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evfsam_lightning.data import transforms
from evfsam_lightning.data.tokenizer import load_tokenizer, tokenize


def test_sam_resize_rounds_half_up():
    assert transforms.sam_resize_hw(448, 500) == (918, 1024)
    assert transforms.sam_resize_hw(500, 448) == (1024, 918)
    assert transforms.sam_resize_hw(100, 100, 128) == (128, 128)


@pytest.mark.parametrize("shape", [(30, 50, 3), (50, 30, 3)])
def test_sam_preprocess_pads_right_and_bottom_with_zeros(shape):
    image = np.full(shape, 200, dtype=np.uint8)
    x, (h, w) = transforms.sam_preprocess(image, 64)
    assert x.shape == (3, 64, 64) and max(h, w) == 64
    assert torch.all(x[:, h:, :] == 0) and torch.all(x[:, :, w:] == 0)
    expected = (200 - torch.tensor(transforms.SAM_PIXEL_MEAN)) / torch.tensor(transforms.SAM_PIXEL_STD)
    assert torch.allclose(x[:, 0, 0], expected)


def test_postprocess_returns_original_size():
    low = torch.randn(3, 1, 16, 16)
    out = transforms.postprocess_masks(low, (40, 64), (30, 48), image_size=64)
    assert out.shape == (3, 1, 30, 48)


def test_rejects_non_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        transforms.beit3_preprocess(np.zeros((4, 4, 3), dtype=np.float32))


def test_tokenizer_layout_and_semantic_token(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    ids, mask = tokenize(tok, ["the red circle", "[semantic] wall"])
    assert ids[:, 0].tolist() == [0, 0]
    assert (ids == 2).sum() == 2  # one </s> per row
    assert mask.dtype == torch.bool and torch.equal(mask, ids != 1)
    semantic = tok.convert_tokens_to_ids("[semantic]")
    assert ids[1, 1].item() == semantic


def test_tokenizer_folder_without_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="sentencepiece.bpe.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("variant", ["sam", "sam2"])
def test_uint8_worker_output_finished_on_the_device_is_bit_identical(variant):
    """The workers' uint8 canvases, normalised in one batch after transfer, equal the reference
    per-image preprocessing bit for bit (padding included), for images of mixed sizes."""
    from evfsam_lightning.data.collate import finish_batch

    rng = np.random.default_rng(0)
    shapes = [(480, 640), (640, 480), (37, 200), (1024, 1024), (333, 333), (1, 700)]
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in shapes]
    reference = transforms.sam_preprocess if variant == "sam" else transforms.sam2_preprocess
    expected = [reference(image, 1024) for image in images]
    canvases = [transforms.sam_input_uint8(image, variant, 1024) for image in images]
    assert all(c.dtype == torch.uint8 and c.shape == (1024, 1024, 3) for c, _ in canvases)
    batch = finish_batch({"sam_pixels_uint8": torch.stack([c for c, _ in canvases]),
                          "resize_hw": torch.tensor([hw for _, hw in canvases])})
    assert "sam_pixels_uint8" not in batch
    for got, (want, hw), (_, got_hw) in zip(batch["sam_pixel_values"], expected, canvases, strict=True):
        assert got_hw == hw
        # bit equality (view as int32, so that -0.0 and 0.0 or two NaN payloads would differ)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
