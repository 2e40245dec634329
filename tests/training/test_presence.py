"""The presence head (issue #14): a trained target / no-target decision, negatives from a source's
vocabulary, "no target" at inference, and the head's own file beside the official export."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from evfsam_lightning.data.examples import Vocabulary, add_negatives, pick_objects
from evfsam_lightning.data.mixing import sample_rng
from evfsam_lightning.data.sources.synthetic import VOCABULARY, make_sample
from evfsam_lightning.models import checkpoints as ck
from evfsam_lightning.models.builders import build_model
from evfsam_lightning.models.evfsam import NO_TARGET_LOGIT
from tests.conftest import FIXTURES
from tests.data.conftest import tokenizer_dir  # noqa: F401

SYNTHETIC_VOCABULARY = Vocabulary(tuple(VOCABULARY["names"]), VOCABULARY["template"])


def test_negatives_name_only_absent_categories_and_are_deterministic():
    sample = make_sample(0, "train", 3)
    present = {o.id.split()[0] for o in sample.objects}
    absent = SYNTHETIC_VOCABULARY.absent(sample)
    assert set(absent) == set(VOCABULARY["names"]) - present and absent

    def draw():
        rng = sample_rng(7, 0, 5, 1)
        picks = pick_objects(sample, rng, 2)
        return add_negatives(sample, picks, SYNTHETIC_VOCABULARY, 2, rng)

    (s1, p1), (s2, p2) = draw(), draw()
    assert [o.expressions for o in s1.objects] == [o.expressions for o in s2.objects]
    assert p1 == p2 and len(p1) == 4
    negatives = [s1.objects[i] for i, _ in p1[2:]]
    assert all(o.no_target and not o.mask.any() and o.mask.shape == (sample.height, sample.width) for o in negatives)
    for o in negatives:
        colour = o.expressions[0].split()[1]
        assert o.expressions[0] == f"the {colour} shape" and colour not in present
    # k = 0 leaves the sample and the rng untouched (the stream without negatives is unchanged)
    rng = sample_rng(7, 0, 5, 1)
    before = rng.bit_generator.state
    assert add_negatives(sample, [(0, 0)], SYNTHETIC_VOCABULARY, 0, rng) == (sample, [(0, 0)])
    assert rng.bit_generator.state == before


def test_semantic_vocabulary_matches_whole_words():
    from evfsam_lightning.data.schema import Sample, SampleObject

    mask = np.ones((4, 4), np.uint8)
    sample = Sample(key="k", source="s", task="semantic", image_bytes=b"", image_ext="png", height=4, width=4,
                    objects=[SampleObject(["[semantic] car"], mask, category="car")], image_file=None, meta={})
    vocab = Vocabulary(("car", "carpet", "person"), "[semantic] {}")
    assert vocab.absent(sample) == ["carpet", "person"]
    _, picks = add_negatives(sample, [(0, 0)], vocab, 5, np.random.default_rng(0))
    assert len(picks) == 3


def _batch_model():
    torch.manual_seed(0)
    return build_model("tiny", presence_head=True)


def test_head_is_optional_and_outside_the_reference_key_set():
    plain, with_head = build_model("tiny"), _batch_model()
    assert not any(k.startswith("presence_head") for k in plain.state_dict())
    assert set(ck.official_state(with_head)) == set(ck.official_state(plain))
    path = FIXTURES / "official_full_keys_large.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    official = {k["name"] for k in json.loads(path.read_text())["keys"]}
    assert set(ck.official_state(build_model("evf-sam", device="meta", presence_head=True))) == official


def test_threshold_round_trips_through_export_and_official_folder_stays_official(tmp_path):
    from safetensors import safe_open

    from evfsam_lightning.data.tokenizer import build_tokenizer

    tok = build_tokenizer(["the red circle", "the blue square"] * 10, tmp_path / "tok", vocab_size=40)
    model = _batch_model()
    model.presence_head.threshold.fill_(0.37)
    out = ck.export_reference(model, tmp_path / "export", tokenizer_dir=tok)
    with safe_open(str(out / ck.WEIGHTS_SAFETENSORS), framework="pt") as f:
        assert not any(k.startswith("presence_head") for k in f.keys())
    with safe_open(str(out / ck.PRESENCE_FILE), framework="pt") as f:
        assert float(f.metadata()["threshold"]) == pytest.approx(0.37)
    loaded, _ = ck.load_reference_folder(out)
    assert float(loaded.presence_head.threshold) == pytest.approx(0.37)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    # without the head's file the folder is a plain reference model
    (out / ck.PRESENCE_FILE).unlink()
    assert ck.load_reference_folder(out)[0].presence_head is None


def test_predict_says_no_target_below_the_threshold(tmp_path):
    from evfsam_lightning.data.tokenizer import build_tokenizer, load_tokenizer

    tok = load_tokenizer(build_tokenizer(["the red circle", "the blue square"] * 10, tmp_path / "tok",
                                         vocab_size=40))
    model = _batch_model().eval()
    image = np.full((40, 56, 3), 90, np.uint8)
    _, score = model.predict(image, "the red circle", tok, return_presence=True)
    assert 0 < score < 1
    model.presence_head.threshold.fill_(min(1.0, score + 0.01))
    logits, _ = model.predict(image, "the red circle", tok, return_presence=True)
    assert logits.shape == (40, 56) and bool((logits == NO_TARGET_LOGIT).all())
    model.presence_head.threshold.fill_(max(0.0, score - 0.01))
    logits, scores = model.predict(image, ["the red circle", "the blue square"], tok, return_presence=True)
    assert logits.shape == (2, 40, 56) and scores.shape == (2,)
    assert not bool((logits[0] == NO_TARGET_LOGIT).all())


def test_mask_loss_skips_no_target_objects_with_the_head():
    from evfsam_lightning.training.module import EvfSamModule

    cfg = {"model": {"size": "tiny", "presence_head": True}, "optim": {"presence_weight": 2.0}}
    module = EvfSamModule(cfg, val_sources=["s"])
    rng = np.random.default_rng(0)
    target = np.zeros((2, 40, 40), np.uint8)
    target[0, 5:20, 5:20] = 1  # object 1 is a no-target one: all zero
    batch = {
        "sam_pixel_values": torch.randn(1, 3, 128, 128),
        "beit_pixel_values": torch.randn(1, 3, module.model.beit3_image_size, module.model.beit3_image_size),
        "input_ids": torch.tensor(rng.integers(3, 30, size=(2, 5))), "attention_mask": torch.ones(2, 5, dtype=torch.bool),
        "image_index": torch.zeros(2, dtype=torch.long), "masks": [torch.from_numpy(target)],
    }
    out, logits, losses = module.forward_losses(batch, module.model.encode_images(batch["sam_pixel_values"]))
    from evfsam_lightning.training.losses import mask_loss

    expected = mask_loss([logits[0][:1]], [batch["masks"][0][:1]])
    torch.testing.assert_close(losses["bce"], expected["bce"])
    torch.testing.assert_close(losses["dice"], expected["dice"])
    presence = torch.nn.functional.binary_cross_entropy_with_logits(out.presence_logits, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(losses["presence"], 2.0 * presence)
    losses["loss"].backward()
    assert module.model.presence_head.mlp[0].weight.grad is not None


# -- acceptance: the same tiny model with and without the head, side by side -----------------------
STEPS = 300


def _val_split_with_negatives(folder, n: int = 32, seed: int = 0):
    """Synthetic validation images, each with 1-2 no-target expressions naming absent colours (about a
    third of all expressions), written as a real shard folder."""
    from evfsam_lightning.data.shards import ShardWriter

    writer = ShardWriter(folder, "synthetic_gres-val", 1000, format="synthetic", split="val")
    for i in range(n):
        sample = make_sample(seed, "val", i)
        sample, _ = add_negatives(sample, [], SYNTHETIC_VOCABULARY, 1 + i % 2, np.random.default_rng([seed, i]))
        writer.write(sample)
    writer.close()


def _evaluate(checkpoint, folder) -> dict:
    """gIoU / N-acc / T-acc (training.metrics.ReferringIoU) of every expression of the split, through
    `EvfSam.predict` (with a head: its threshold; without: "no target" = an empty mask)."""
    from evfsam_lightning.data.examples import decode
    from evfsam_lightning.data.skips import SkipLog
    from evfsam_lightning.data.stream import iter_shard
    from evfsam_lightning.training.loading import load_for_inference
    from evfsam_lightning.training.metrics import ReferringIoU

    model, tokenizer = load_for_inference(checkpoint)
    metric = ReferringIoU(["val"])
    for url in sorted(folder.glob("*.tar")):
        for raw in iter_shard(str(url), SkipLog(strict=True)):
            sample, image = decode(raw)
            logits = model.predict(image, [o.expressions[0] for o in sample.objects], tokenizer)
            target = torch.from_numpy(np.stack([o.mask for o in sample.objects]))
            metric.update(logits, target, torch.zeros(len(sample.objects), dtype=torch.long))
    return metric.compute()["all"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EVFSAM_PRESENCE_ACCEPTANCE") != "1",
                    reason="issue 14's side-by-side acceptance run (2 x 300 steps) has not yet been run to the end on "
                           "an unshared machine; EVFSAM_PRESENCE_ACCEPTANCE=1 runs it")
def test_presence_head_learns_no_target_where_empty_masks_do_not(tmp_path, synthetic_dir):
    import yaml

    from tests.training.conftest import QUICKSTART, run_training, small_run

    val = tmp_path / "val_gres"
    _val_split_with_negatives(val)
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["data"]["val"] = [{"name": "synthetic_gres", "urls": [str(val)]}]
    path = tmp_path / "gres.yaml"
    path.write_text(yaml.safe_dump(recipe))
    results = {}
    for head in (False, True):
        name = f"head_{str(head).lower()}"
        run_training(tmp_path, *small_run(synthetic_dir, f"model.presence_head={str(head).lower()}",
                                          "data.negatives_per_image=1", "data.max_expressions_per_image=2",
                                          f"trainer.max_steps={STEPS}", "optim.warmup_steps=30",
                                          "checkpoint.every_n_steps=0", f"name={name}", "logging.tensorboard=false"),
                     recipe=path, timeout=1800)
        results[head] = _evaluate(tmp_path / "runs" / name, val)
    for head, r in results.items():
        print(f"presence_head={head}: gIoU {r['giou']:.3f} cIoU {r['ciou']:.3f} N-acc {r['n_acc']:.3f} "
              f"T-acc {r['t_acc']:.3f} ({r['expressions']} expressions, {r['no_target']} no-target)")
    with_head, without = results[True], results[False]
    assert 0.25 <= with_head["no_target"] / with_head["expressions"] <= 0.45
    assert with_head["n_acc"] >= 0.9 and with_head["t_acc"] >= 0.9
    assert with_head["giou"] > without["giou"]


def test_resume_with_negatives_replays_the_uninterrupted_stream(tmp_path, tokenizer_dir):  # noqa: F811
    from evfsam_lightning.data.datamodule import EvfDataModule
    from evfsam_lightning.data.datamodule import SourceConfig as DataSource
    from tests.data.conftest import config, consume, write_source
    from tests.data.test_resume import _checkpoint_round_trip, _view

    write_source(tmp_path, "ade20k", 15, 3)
    (tmp_path / "ade20k" / "vocabulary.json").write_text(json.dumps(
        {"template": "[semantic] {}", "names": ["thing", "car", "tree", "sky"]}))

    def module():
        cfg = config(tokenizer_dir, tmp_path, num_workers=2, negatives_per_image=2, samples_per_epoch=12,
                     sources=[DataSource("ade20k", str(tmp_path / "ade20k"), 1.0)])
        return EvfDataModule(cfg, rank=1, world_size=2)

    total, step = 8, 3
    reference = _view(consume(module(), total))
    negatives = [e for _, expressions, _ in reference for e in expressions if e.startswith("[semantic] ")]
    assert negatives and set(negatives) <= {"[semantic] car", "[semantic] tree", "[semantic] sky"}
    first = module()
    assert _view(consume(first, step)) == reference[:step]
    resumed = module()
    resumed.load_state_dict(_checkpoint_round_trip(first.state_dict()))
    assert _view(consume(resumed, total - step)) == reference[step:]
