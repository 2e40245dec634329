"""The LightningModule in single-process runs: trainable sets, non-finite losses, metrics."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from evfsam_lightning.config import load
from evfsam_lightning.training.metrics import ReferringIoU
from evfsam_lightning.training.module import EvfSamModule, NonFiniteLossError
from evfsam_lightning.training.trainable import apply_trainable
from tests.conftest import REPO


def _cfg(*overrides):
    from omegaconf import OmegaConf

    cfg = load(REPO / "recipes" / "quickstart.yaml", ["data.synthetic.dir=unused", *overrides])
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _batch(n_images=2, per_image=2, size=128, nan=False):
    g = torch.Generator().manual_seed(0)
    n = n_images * per_image
    pixels = torch.randn(n_images, 3, size, size, generator=g)
    if nan:
        pixels[0, 0, 0, 0] = float("nan")
    return {
        "sam_pixel_values": pixels, "beit_pixel_values": torch.randn(n_images, 3, 128, 128, generator=g),
        "input_ids": torch.randint(3, 60, (n, 6), generator=g), "attention_mask": torch.ones(n, 6, dtype=torch.bool),
        "image_index": torch.arange(n_images).repeat_interleave(per_image),
        "offsets": torch.arange(0, n + 1, per_image), "resize_hw": torch.tensor([[size, size]] * n_images),
        "original_hw": torch.tensor([[size, size]] * n_images),
        "masks": [torch.randint(0, 2, (per_image, size, size), generator=g, dtype=torch.uint8)
                  for _ in range(n_images)],
        "sources": ["synthetic"] * n_images, "expressions": ["x"] * n,
    }


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _fit(module, batches, **kwargs):
    loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kwargs)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_frozen_image_encoder_is_bit_identical_after_training():
    module = EvfSamModule(_cfg("model.mode=frozen_image_encoder"))
    frozen = {k: v.clone() for k, v in module.model.visual_model.vision_encoder.state_dict().items()}
    trained_before = module.model.visual_model.mask_decoder.mask_tokens.weight.clone()
    _fit(module, [_batch() for _ in range(3)])
    assert not module.model.visual_model.vision_encoder.training  # kept in eval mode
    for k, v in module.model.visual_model.vision_encoder.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not torch.equal(module.model.visual_model.mask_decoder.mask_tokens.weight, trained_before)


def test_reference_trainable_set():
    module = EvfSamModule(_cfg("model.mode=frozen_image_encoder"))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("mm_extractor.beit3.encoder") for n in trainable)
    assert "visual_model.prompt_encoder.no_mask_embed.weight" in trainable
    assert any(n.startswith("visual_model.mask_decoder.transformer") for n in trainable)
    assert not any(n.startswith("visual_model.vision_encoder") for n in trainable)
    assert "mm_extractor.beit3.vision_embed.mask_token" not in trainable


def test_freeze_lists_are_checked():
    module = EvfSamModule(_cfg())
    with pytest.raises(ValueError, match="matches no parameter"):
        apply_trainable(module.model, "sam", "full", freeze=["mm_extractor.beit4."])
    with pytest.raises(ValueError, match="never used"):
        apply_trainable(module.model, "sam", "frozen_image_encoder", unfreeze=["visual_model.prompt_encoder.point_embed."])
    apply_trainable(module.model, "sam", "full", freeze=["mm_extractor."])
    assert not any(p.requires_grad for n, p in module.model.named_parameters() if n.startswith("mm_extractor."))


class _Snapshot(L.Callback):
    """Copies weights and optimizer state right before the batch at `index`."""

    def __init__(self, index: int):
        self.index = index
        self.weights = self.optimizer = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.index:
            self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.optimizer = {k: {n: t.clone() for n, t in s.items()} for k, s in trainer.optimizers[0].state.items()}


def test_a_non_finite_loss_skips_the_step_and_leaves_weights_and_optimizer_alone():
    module = EvfSamModule(_cfg("optim.max_nonfinite_steps=5", "optim.warmup_steps=0"))
    snapshot = _Snapshot(2)
    trainer = _fit(module, [_batch(), _batch(), _batch(nan=True)], callbacks=[snapshot])
    assert module.nonfinite_steps == 1
    for k, v in module.state_dict().items():
        assert torch.equal(v, snapshot.weights[k]), k
    for k, s in trainer.optimizers[0].state.items():
        for n, t in s.items():
            assert torch.equal(t, snapshot.optimizer[k][n]), (k, n)


def test_too_many_consecutive_non_finite_losses_stop_the_run():
    module = EvfSamModule(_cfg("optim.max_nonfinite_steps=2"))
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite losses"):
        _fit(module, [_batch(nan=True) for _ in range(3)])


def test_giou_and_ciou_by_hand():
    metric = ReferringIoU(["a", "b"])
    logits = torch.full((3, 2, 2), -1.0)
    logits[0, 0, 0] = logits[0, 0, 1] = 1  # predicts 2 px
    target = torch.zeros(3, 2, 2, dtype=torch.uint8)
    target[0, 0, 0] = 1  # I=1 U=2
    target[1, 1, 1] = 1  # I=0 U=1
    target[2, 1, 1] = 255  # empty union -> counts 1.0
    metric.update(logits, target, torch.tensor([0, 0, 1]))
    r = metric.compute()
    assert r["a"] == {"giou": pytest.approx(0.25), "ciou": pytest.approx(1 / 3), "expressions": 2}
    assert r["b"]["giou"] == 1.0 and r["all"]["expressions"] == 3
    assert r["all"]["giou"] == pytest.approx(0.5)
