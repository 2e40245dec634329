"""EVF-SAM2 trains with all of SAM-2 frozen."""

from __future__ import annotations

import torch

from evfsam_lightning.config import load
from tests.conftest import REPO
from tests.training.test_module import _Batches, _cfg


def _batch(n_images=2, per_image=2, size=256):
    g = torch.Generator().manual_seed(1)
    n = n_images * per_image
    return {
        "sam_pixel_values": torch.randn(n_images, 3, size, size, generator=g),
        "beit_pixel_values": torch.randn(n_images, 3, 128, 128, generator=g),
        "input_ids": torch.randint(3, 60, (n, 6), generator=g), "attention_mask": torch.ones(n, 6, dtype=torch.bool),
        "image_index": torch.arange(n_images).repeat_interleave(per_image),
        "offsets": torch.arange(0, n + 1, per_image), "resize_hw": torch.tensor([[size, size]] * n_images),
        "original_hw": torch.tensor([[96, 80]] * n_images),
        "masks": [torch.randint(0, 2, (per_image, 96, 80), generator=g, dtype=torch.uint8) for _ in range(n_images)],
        "sources": ["synthetic"] * n_images, "expressions": ["x"] * n,
    }


def test_tiny_evfsam2_trains_with_sam2_bit_identical():
    import lightning as L

    from evfsam_lightning.training.module import EvfSamModule

    module = EvfSamModule(_cfg("model.size=tiny-sam2", "model.mode=frozen_image_encoder"))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("mm_extractor.", "text_hidden_fcs.")) for n in trainable)
    sam2_before = {k: v.clone() for k, v in module.model.visual_model.state_dict().items()}
    beit_before = module.model.text_hidden_fcs[0][0].weight.clone()
    loader = torch.utils.data.DataLoader(_Batches([_batch() for _ in range(3)]), batch_size=None,
                                         collate_fn=lambda b: b)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    for k, v in module.model.visual_model.state_dict().items():
        assert torch.equal(v, sam2_before[k]), k
    assert not torch.equal(module.model.text_hidden_fcs[0][0].weight, beit_before)


def test_evfsam2_recipe_defaults_to_the_evfsam2_trainable_set():
    cfg = load(REPO / "recipes" / "evfsam2_multitask.yaml")
    assert cfg.model.size == "evf-sam2" and cfg.model.mode == "frozen_image_encoder"
