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
