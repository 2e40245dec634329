"""Behaviour of the model beyond the fixture: padding, batching, checkpointing, prediction."""

from __future__ import annotations

import numpy as np
import torch

from evfsam_lightning.data.tokenizer import load_tokenizer, tokenize
from evfsam_lightning.models.beit3 import Beit3, Beit3Config
from evfsam_lightning.models.evfsam import collate_inference


def test_padded_expression_equals_unpadded():
    torch.manual_seed(0)
    beit3 = Beit3(Beit3Config(embed_dim=32, depth=2, num_heads=2, ffn_dim=64, vocab_size=100, image_size=32)).eval()
    pixels = torch.randn(1, 3, 32, 32)
    short = torch.tensor([[0, 5, 2]])
    padded = torch.tensor([[0, 5, 2, 1, 1]])
    a = beit3(pixels, short)[:, :1]
    b = beit3(pixels, padded, padded != 1)[:, :1]
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, beit3(pixels, padded)[:, :1], atol=1e-5)  # the mask matters


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = Beit3Config(embed_dim=32, depth=2, num_heads=2, ffn_dim=64, vocab_size=100, image_size=32)
    plain = Beit3(cfg)
    ckpt = Beit3(cfg, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    pixels, ids = torch.randn(2, 3, 32, 32), torch.tensor([[0, 7, 2], [0, 9, 2]])
    for m in (plain, ckpt):
        m(pixels, ids).square().mean().backward()
    for (k, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if k == "vision_embed.mask_token":  # unused by EVF-SAM
            assert a.grad is None and b.grad is None
            continue
        assert torch.allclose(a.grad, b.grad, atol=1e-6), k


def test_batched_forward_equals_one_image_at_a_time(tiny_model, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), rng.integers(0, 255, (70, 30, 3), dtype=np.uint8)]
    texts = [["the red circle", "the blue square on the left"], ["a green triangle"]]
    model = tiny_model.eval()
    singles = [collate_inference(model, im, tx, tok) for im, tx in zip(images, texts, strict=True)]
    ids, mask = tokenize(tok, [t for tx in texts for t in tx])
    batch = {
        "sam_pixel_values": torch.cat([s["sam_pixel_values"] for s in singles]),
        "beit_pixel_values": torch.cat([s["beit_pixel_values"] for s in singles]),
        "input_ids": ids, "attention_mask": mask, "image_index": torch.tensor([0, 0, 1]),
        "resize_hw": torch.cat([s["resize_hw"] for s in singles]),
        "original_hw": torch.cat([s["original_hw"] for s in singles]),
    }
    with torch.no_grad():
        together = model(batch).logits
        apart = [model(s).logits[0] for s in singles]
    assert [t.shape for t in together] == [(2, 40, 60), (1, 70, 30)]
    for a, b in zip(together, apart, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_predict_returns_a_mask_at_original_size(tiny_model, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    image = np.zeros((50, 80, 3), dtype=np.uint8)
    logits = tiny_model.predict(image, "the red circle", tok)
    assert logits.shape == (50, 80)
    assert tiny_model.predict(image, ["a", "b c"], tok).shape == (2, 50, 80)
