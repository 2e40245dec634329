"""The embedding cache: built by evfsam-cache-embeddings, read by training instead of the SAM
image encoder, and refused where it would not hold the features the run would compute."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from evfsam_lightning.cli.cache import main as cache_main
from evfsam_lightning.config import ConfigError, load
from evfsam_lightning.data.datamodule import EvfDataModule
from evfsam_lightning.data.embedding_cache import MANIFEST, EmbeddingCacheError
from evfsam_lightning.models.builders import model_config
from evfsam_lightning.training.data_setup import data_for_run
from evfsam_lightning.training.module import EvfSamModule
from tests.training.conftest import QUICKSTART, small_run


def _overrides(synthetic_dir, *extra):
    return [o for o in small_run(synthetic_dir, "model.mode=frozen_image_encoder", *extra)]


@pytest.fixture(scope="module")
def cache_dir(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    assert cache_main([str(QUICKSTART), "--out", str(out), "--batch-size", "16", *_overrides(synthetic_dir)]) == 0
    return out


def _first_batch(cfg) -> dict:
    dm = EvfDataModule(*data_for_run(cfg, model_config(cfg.model.size)), rank=0, world_size=1)
    batch = next(iter(dm.train_dataloader()))
    return dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)


def _module(cfg):
    torch.manual_seed(cfg.seed)  # the initialisation the cache was built from (no pretrained weights here)
    module = EvfSamModule(OmegaConf.to_container(OmegaConf.structured(cfg)))
    module.setup("fit")  # checks the cache against the model
    return module


def test_manifest_records_every_training_sample(cache_dir):
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    assert manifest["features"] == ["image_embeddings"] and manifest["dtype"] == "bfloat16"
    assert sum(manifest["sources"]["synthetic"]["samples"]) == 96
    assert manifest["preprocessing"]["sam_variant"] == "sam" and len(manifest["encoder_fingerprint"]) == 64


def test_loss_with_cached_features_equals_the_live_one(synthetic_dir, cache_dir):
    live_cfg = load(QUICKSTART, _overrides(synthetic_dir))
    cached_cfg = load(QUICKSTART, _overrides(synthetic_dir, f"data.embedding_cache={cache_dir}"))
    live, cached = _first_batch(live_cfg), _first_batch(cached_cfg)
    assert live["keys"] == cached["keys"] and live["expressions"] == cached["expressions"]
    assert "sam_pixel_values" not in cached and cached["image_features"]["image_embeddings"].dtype == torch.bfloat16
    module = _module(cached_cfg).eval()
    with torch.no_grad():
        live_features = module.image_features(live)
        cached_features = module.image_features(cached)
        # bf16 as stored: the model casts them to its decoder's dtype (`EvfSam.decoder_inputs`).
        assert cached_features["image_embeddings"].dtype == torch.bfloat16
        torch.testing.assert_close(cached_features["image_embeddings"].float(), live_features["image_embeddings"],
                                   rtol=2 ** -8, atol=1e-5)  # bf16 rounding of the stored features
        live_loss = module.forward_losses(live, live_features)[2]["loss"]
        cached_loss = module.forward_losses(cached, cached_features)[2]["loss"]
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-2, atol=1e-4)


def test_training_runs_on_the_cache(synthetic_dir, cache_dir, tmp_path, monkeypatch):
    from evfsam_lightning.training.run import train

    cfg = load(QUICKSTART, _overrides(synthetic_dir, f"data.embedding_cache={cache_dir}", f"root_dir={tmp_path}",
                                      "trainer.max_steps=2", "checkpoint.every_n_steps=2", "logging.tensorboard=false",
                                      "logging.progress_bar=false"))
    from evfsam_lightning.models.evfsam import EvfSam

    encode, calls = EvfSam.encode_images, []

    def encode_images(self, pixels):  # training steps read the cache; the validation at the end
        calls.append(self.training)   # encodes its (uncached) images live, in eval mode
        assert not self.training, "the image encoder ran in a training step"
        return encode(self, pixels)

    monkeypatch.setattr(EvfSam, "encode_images", encode_images)
    trainer = train(cfg)
    assert trainer.global_step == 2 and calls and not any(calls)


def test_config_refuses_the_cache_unless_the_encoder_is_frozen(tmp_path):
    with pytest.raises(ConfigError, match="model.mode='full' trains it"):
        load(QUICKSTART, ["data.synthetic.dir=unused", f"data.embedding_cache={tmp_path}", "model.mode=full"])
    with pytest.raises(ConfigError, match="model.unfreeze entry 'visual_model.'"):
        load(QUICKSTART, ["data.synthetic.dir=unused", f"data.embedding_cache={tmp_path}",
                          "model.mode=frozen_image_encoder", "model.unfreeze=[visual_model.]"])


def test_other_encoder_weights_are_refused_naming_the_fingerprint(synthetic_dir, cache_dir):
    cfg = load(QUICKSTART, _overrides(synthetic_dir, f"data.embedding_cache={cache_dir}", "seed=1"))
    with pytest.raises(EmbeddingCacheError, match="image-encoder fingerprint"):
        _module(cfg)


def test_other_preprocessing_is_refused_naming_it(synthetic_dir, cache_dir, tmp_path):
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    manifest["preprocessing"]["sam_image_size"] = 1024
    other = tmp_path / "cache"
    other.mkdir()
    (other / MANIFEST).write_text(json.dumps(manifest))
    cfg = load(QUICKSTART, _overrides(synthetic_dir, f"data.embedding_cache={other}"))
    with pytest.raises(EmbeddingCacheError, match=r"preprocessing.sam_image_size: cache 1024, run 128"):
        _first_batch(cfg)


def test_rewritten_shards_are_refused_naming_the_shard(synthetic_dir, cache_dir, tmp_path):
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    sizes = manifest["sources"]["synthetic"]["bytes"]
    assert len(sizes) == len(manifest["sources"]["synthetic"]["urls"]) and all(n > 0 for n in sizes)
    manifest["sources"]["synthetic"]["bytes"][0] += 1  # as if a new conversion had rewritten shard 0
    other = tmp_path / "cache"
    other.mkdir()
    (other / MANIFEST).write_text(json.dumps(manifest))
    cfg = load(QUICKSTART, _overrides(synthetic_dir, f"data.embedding_cache={other}"))
    first = manifest["sources"]["synthetic"]["urls"][0]
    with pytest.raises(EmbeddingCacheError, match=f"shard {first} of 'synthetic' changed since the cache"):
        _first_batch(cfg)


def test_sam2_cache_holds_every_image_feature_and_gives_the_live_loss(synthetic_dir, tmp_path):
    overrides = _overrides(synthetic_dir, "model.size=tiny-sam2")
    assert cache_main([str(QUICKSTART), "--out", str(tmp_path), *overrides]) == 0
    assert json.loads((tmp_path / MANIFEST).read_text())["features"] == [
        "image_embeddings", "high_res_feat_s0", "high_res_feat_s1"]
    cfg = load(QUICKSTART, [*overrides, f"data.embedding_cache={tmp_path}"])
    live, cached = _first_batch(load(QUICKSTART, overrides)), _first_batch(cfg)
    module = _module(cfg).eval()
    with torch.no_grad():
        live_features, cached_features = module.image_features(live), module.image_features(cached)
        for name, value in live_features.items():
            assert cached_features[name].dtype == torch.bfloat16  # cast by the model (EvfSam.decoder_inputs)
            torch.testing.assert_close(cached_features[name].float(), value, rtol=2 ** -8, atol=1e-5)
        losses = [module.forward_losses(b, f)[2]["loss"] for b, f in ((live, live_features), (cached, cached_features))]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-4)


def test_data_inspect_shows_the_images_even_before_the_cache_exists(synthetic_dir, tmp_path, capsys):
    """`evfsam-data inspect` on a recipe that trains from a cache reads the images (the doc runs
    it before `evfsam-cache-embeddings`)."""
    from evfsam_lightning.cli.data import main as data_main

    grid = tmp_path / "grid.png"
    assert data_main(["inspect", str(QUICKSTART), *_overrides(synthetic_dir, f"data.embedding_cache={tmp_path / 'none'}"),
                      "--samples", "4", "--grid", str(grid)]) == 0
    assert grid.is_file() and "synthetic" in capsys.readouterr().out
