"""The presence head (issue #14): a trained target / no-target decision, negatives from a source's
vocabulary, "no target" at inference, and the head's own file beside the official export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evfsam_lightning.data.examples import Vocabulary, add_negatives, pick_objects
from evfsam_lightning.data.mixing import sample_rng
from evfsam_lightning.data.sources.synthetic import VOCABULARY, make_sample
from evfsam_lightning.models import checkpoints as ck
from evfsam_lightning.models.builders import build_model
from evfsam_lightning.models.evfsam import NO_TARGET_LOGIT
from tests.conftest import FIXTURES, one_torch_thread
from tests.data.conftest import tokenizer_dir  # noqa: F401

SYNTHETIC_VOCABULARY = Vocabulary.from_record(VOCABULARY)


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
        assert o.category not in present
        assert o.expressions[0] in {t.format(o.category) for t in VOCABULARY["templates"]}
    # k = 0 leaves the sample and the rng untouched (the stream without negatives is unchanged)
    rng = sample_rng(7, 0, 5, 1)
    before = rng.bit_generator.state
    assert add_negatives(sample, [(0, 0)], SYNTHETIC_VOCABULARY, 0, rng) == (sample, [(0, 0)])
    assert rng.bit_generator.state == before


def test_synthetic_negatives_are_phrased_like_its_positives():
    """A negative must not be told from a target by its form: the synthetic negatives take the
    positives' colour forms ("the {} circle", "the {} shape", "the {} one", ...) about as often as the
    positives do. With one form for every negative ("the {} shape") the presence head learnt to
    reject that form, targets included (BENCHMARKS.md, "Presence head vs empty masks")."""
    from collections import Counter

    positives, negatives = Counter(), Counter()
    for index in range(150):
        sample = make_sample(0, "train", index, image_size=64)
        # a form: the expression with its colour (always the second word) as {}
        positives.update(e.replace(f" {o.id.split()[0]} ", " {} ", 1) for o in sample.objects for e in o.expressions)
        with_negatives, _ = add_negatives(sample, [], SYNTHETIC_VOCABULARY, 2, sample_rng(0, 0, index, 0))
        negatives.update(o.expressions[0].replace(f" {o.category} ", " {} ", 1)
                         for o in with_negatives.objects if o.no_target)
    assert set(negatives) == set(positives) and len(positives) == 7  # 4 "{} <shape>", shape, one, object
    share = {f: (negatives[f] / negatives.total(), positives[f] / positives.total()) for f in positives}
    assert all(abs(neg - pos) < 0.06 for neg, pos in share.values()), share


def test_vocabulary_files_merge_and_errors_name_the_file(tmp_path):
    from evfsam_lightning.data.examples import read_vocabulary

    def folder(name: str, record) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "vocabulary.json").write_text(json.dumps(record))
        return str(tmp_path / name / "x-000000.tar")

    # "template" is a list of one "templates"; names merge in first-seen order
    a = folder("a", {"template": "[semantic] {}", "names": ["car", "sky"]})
    b = folder("b", {"templates": ["[semantic] {}"], "names": ["tree", "car"]})
    assert read_vocabulary("s", [a, b]) == Vocabulary(("car", "sky", "tree"), ("[semantic] {}",))
    c = folder("c", {"templates": ["the {} one", "the {} thing"], "names": ["red"]})
    assert read_vocabulary("s", [c]).templates == ("the {} one", "the {} thing")
    with pytest.raises(ValueError, match=r"source s: .*c/vocabulary.json has templates \['the \{\} one'"):
        read_vocabulary("s", [a, c])
    for name, record in {"str": {"templates": "the {} one", "names": ["red"]},
                         "none": {"templates": [], "names": ["red"]},
                         "named": {"templates": ["the {c} one"], "names": ["red"]},
                         "nameless": {"template": "the one", "names": ["red"]},
                         "both": {"template": "{}", "templates": ["{}"], "names": ["red"]},
                         "no_names": {"template": "{}"}, "list": ["red"]}.items():
        with pytest.raises(ValueError, match=rf"source s: .*{name}/vocabulary.json is not a vocabulary"):
            read_vocabulary("s", [folder(name, record)])


def test_semantic_vocabulary_matches_whole_words():
    from evfsam_lightning.data.schema import Sample, SampleObject

    mask = np.ones((4, 4), np.uint8)
    sample = Sample(key="k", source="s", task="semantic", image_bytes=b"", image_ext="png", height=4, width=4,
                    objects=[SampleObject(["[semantic] car"], mask, category="car")], image_file=None, meta={})
    vocab = Vocabulary(("car", "carpet", "person"), ("[semantic] {}",))
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


def test_validation_scores_the_heads_decision_not_the_empty_mask():
    """With a head, validation's N-acc / T-acc / gIoU follow the head's decision: a decoder that draws
    nothing everywhere under a head that accepts everything scores N-acc 0 and T-acc 1 (the
    empty-mask rule would say the opposite), and the same decoder under a head that rejects
    everything scores N-acc 1, T-acc 0, gIoU = the share of no-target expressions."""
    import lightning as L

    from evfsam_lightning.training.module import EvfSamModule
    from tests.training.test_module import _batch, _Batches, _cfg

    batch = _batch()
    batch["masks"][0][1] = 0  # 1 of the 4 expressions has no target
    module = EvfSamModule(_cfg("logging.val_images=0", "model.presence_head=true"), val_sources=["grefs"])
    for mlp in module.model.visual_model.mask_decoder.output_hypernetworks_mlps:
        torch.nn.init.zeros_(mlp.proj_out.weight)  # every mask logit exactly 0: nothing drawn
        torch.nn.init.zeros_(mlp.proj_out.bias)
    logged = {}
    for threshold in (0.0, 1.0):  # sigmoid >= 0: everything is a target; >= 1: (here) nothing is
        module.model.presence_head.threshold.fill_(threshold)
        loader = torch.utils.data.DataLoader(_Batches([batch]), batch_size=None, collate_fn=lambda b: b)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.validate(module, dataloaders=loader, verbose=False)
        logged[threshold] = {k: float(trainer.callback_metrics[f"val/grefs/{k}"]) for k in ("n_acc", "t_acc", "giou")}
    assert logged[0.0] == {"n_acc": 0.0, "t_acc": 1.0, "giou": 0.0}
    assert logged[1.0] == {"n_acc": 1.0, "t_acc": 0.0, "giou": 0.25}


# -- evfsam-eval with a head: the threshold sweep, and JSON without NaN ------------------------------
@pytest.fixture(scope="module")
def head_checkpoint(tmp_path_factory):
    """An exported tiny EVF-SAM with a (random) presence head, threshold 0.5."""
    from evfsam_lightning.data.tokenizer import build_tokenizer
    from tests.training.test_evaluation import SENTENCES

    root = tmp_path_factory.mktemp("tiny_head")
    tok = build_tokenizer([s.lower() for s in SENTENCES] * 20, root / "tok", vocab_size=60)
    torch.manual_seed(5)
    return ck.export_reference(build_model("tiny", presence_head=True), root / "evf-sam", tokenizer_dir=tok)


def _eval(checkpoint, out, *args: str) -> dict:
    from evfsam_lightning.cli.evaluate import main as evaluate

    assert evaluate(["--checkpoint", str(checkpoint), "--accelerator", "cpu", "--workers", "0", "--batch-size", "2",
                     "--no-progress", "--out", str(out), *args]) == 0
    text = out.read_text()
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON of evfsam-eval"))


def test_eval_sweeps_the_presence_threshold_in_one_pass(tmp_path, head_checkpoint, capsys):
    from evfsam_lightning.training.loading import load_for_inference
    from tests.training.test_evaluation import _split, _write_split

    samples = _split(1, with_no_target=True)
    _write_split(tmp_path / "val", samples)
    # By hand: each sentence's decoder mask (threshold 0: nothing rejected) and presence score.
    model, tokenizer = load_for_inference(head_checkpoint)
    model.presence_head.threshold.fill_(0.0)
    scored = []
    with torch.no_grad():
        for sample, _ in samples:
            image = sample.decode_image()
            for obj in sample.objects:
                for text in obj.expressions:
                    logits, score = model.predict(image, text.strip().lower(), tokenizer, return_presence=True)
                    scored.append((float(score), (logits > 0).numpy(), obj.mask == 1))
    ordered = sorted(s for s, _, _ in scored)
    middle = (ordered[4] + ordered[5]) / 2  # between two scores: 5 of the 11 sentences rejected

    def by_hand(t: float) -> dict:
        inter = union = iou = 0.0
        nt_hit = t_hit = 0
        for score, pred, gt in scored:
            rejected = score < t
            pred = pred & (not rejected)
            i, u = float((pred & gt).sum()), float((pred | gt).sum())
            inter, union = inter + i, union + u
            iou += float(rejected) if not gt.any() else i / u
            nt_hit += int(not gt.any() and rejected)
            t_hit += int(gt.any() and not rejected)
        return {"giou": iou / 11, "ciou": inter / union, "n_acc": nt_hit / 2, "t_acc": t_hit / 9}

    r = _eval(head_checkpoint, tmp_path / "r.json", "--data", f"val={tmp_path / 'val'}",
              "--presence-sweep", "0", repr(middle), "0.5", "1")
    rows = {row["threshold"]: row for row in r["presence_sweep"]["val"]}
    assert list(rows) == sorted([0.0, middle, 0.5, 1.0]) and r["presence_threshold"] == 0.5
    assert all((row["expressions"], row["no_target"]) == (11, 2) for row in rows.values())
    # 0: nothing is "no target"; 1: everything is (no score reaches 1), so only the no-target sentences score
    assert (rows[0.0]["n_acc"], rows[0.0]["t_acc"]) == (0.0, 1.0)
    assert (rows[1.0]["n_acc"], rows[1.0]["t_acc"], rows[1.0]["ciou"]) == (1.0, 0.0, 0.0)
    assert rows[1.0]["giou"] == pytest.approx(2 / 11)
    for t in (0.0, middle, 1.0):
        assert {k: rows[t][k] for k in ("giou", "ciou", "n_acc", "t_acc")} == pytest.approx(by_hand(t), abs=1e-6)
    # the row at the threshold in use is what the split's own line reports
    assert {k: rows[0.5][k] for k in r["splits"]["val"]} == pytest.approx(r["splits"]["val"])
    printed = capsys.readouterr().out
    assert "presence threshold sweep, val (11 expressions, 2 no-target" in printed
    assert any(line.split()[0] == "0.50*" for line in printed.splitlines() if line.strip())


def test_eval_json_has_null_where_a_number_is_undefined(tmp_path, head_checkpoint, capsys):
    from tests.training.test_evaluation import _sample, _write_split

    # a split whose only object has no target: T-acc is undefined
    _write_split(tmp_path / "nt", [_sample("only", 3, [["the dog", "zebra"]], no_target=0)])
    r = _eval(head_checkpoint, tmp_path / "r.json", "--data", f"nt={tmp_path / 'nt'}")
    assert r["splits"]["nt"]["no_target"] == 2 and r["splits"]["nt"]["t_acc"] is None
    assert all(row["t_acc"] is None for row in r["presence_sweep"]["nt"])
    assert len(r["presence_sweep"]["nt"]) == 11  # the default sweep 0, 0.1, ..., 1
    table = capsys.readouterr().out.splitlines()
    split_line = next(line for line in table if line.startswith("nt "))
    assert split_line.split()[4] == "n/a" and "nan" not in "\n".join(table).lower()


# -- acceptance: the same released model fine-tuned with and without the head, side by side ----------
#: Optimizer steps of each of the two fine-tunings (8 images a step, 2 expressions + 1 negative each).
#: At 250 steps the head was not yet decided on 2 seeds of 3 (BENCHMARKS.md, presence section 4).
STEPS = 400
#: Validation images (~4.5 expressions each, a third of them no-target): with 32 images one expression
#: moved gIoU by 0.007, as much as the margins measured; 128 give ~580 expressions.
VAL_IMAGES = 128


def _val_split_with_negatives(folder, n: int = VAL_IMAGES, seed: int = 0) -> tuple[int, int]:
    """Synthetic validation images, each object with one of its expressions (every one is scored) and
    1-2 no-target expressions naming absent colours (about a third of all expressions), written as a
    real shard folder; returns (expressions, no-target ones)."""
    import dataclasses

    from evfsam_lightning.data.shards import ShardWriter

    writer = ShardWriter(folder, "synthetic_gres-val", 1000, format="synthetic", split="val")
    expressions = no_target = 0
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        sample = make_sample(seed, "val", i)
        sample = dataclasses.replace(sample, objects=[
            dataclasses.replace(o, expressions=[o.expressions[rng.integers(len(o.expressions))]])
            for o in sample.objects])
        sample, _ = add_negatives(sample, [], SYNTHETIC_VOCABULARY, 1 + i % 2, rng)
        writer.write(sample)
        for o in sample.objects:
            expressions += len(o.expressions)
            no_target += len(o.expressions) * int(not o.mask.any())
    writer.close()
    return expressions, no_target


@pytest.mark.slow
def test_presence_head_learns_no_target_where_empty_masks_do_not(tmp_path, quickstart_run):
    """Issue 14's acceptance, the way recipes/evfsam_gres.yaml trains the head: from a released model
    (the README quickstart's, exported to the official layout), image encoder frozen, negatives from
    the source's vocabulary, fine-tuned for the same steps with and without the head, then scored by
    one validation pass (with the head: its decision; without: an empty predicted mask). Changed
    from the recipe: the data (the quickstart's synthetic shapes), size, length, lr 1e-3 and
    presence_weight 5 (a short run). From scratch the tiny model does not learn colour presence
    within a CI budget (BENCHMARKS.md); the released model already reads the colours. Measured on 7
    runs (5 seeds, 2 released models): N-acc and T-acc 0.99-1.00, gIoU 0.007-0.037 above the
    empty-mask run (BENCHMARKS.md, presence section 5); one expression weighs ~0.0017 here."""
    import time

    import yaml

    from evfsam_lightning.config import load
    from evfsam_lightning.training.run import train
    from tests.test_docs import write_released_checkpoint
    from tests.training.conftest import QUICKSTART

    quickstart = quickstart_run[0]
    release = write_released_checkpoint(tmp_path / "released", quickstart)
    val = tmp_path / "val_gres"
    expressions, no_target = _val_split_with_negatives(val)
    assert 0.25 <= no_target / expressions <= 0.45
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["data"]["val"] = [{"name": "synthetic_gres", "urls": [str(val)]}]
    path = tmp_path / "gres.yaml"
    path.write_text(yaml.safe_dump(recipe))
    results = {}
    with one_torch_thread():  # one thread is as fast here, and leaves a core to the rest
        for head in (False, True):
            wall, cpu = time.perf_counter(), time.process_time()
            cfg = load(path, [f"model.pretrained={release}", "model.size=auto", "model.mode=frozen_image_encoder",
                              f"model.presence_head={str(head).lower()}",
                              f"data.synthetic.dir={quickstart / 'data' / 'synthetic'}", "data.num_workers=0",
                              "data.negatives_per_image=1", "data.max_expressions_per_image=2",
                              f"trainer.max_steps={STEPS}", f"trainer.val_every_n_steps={STEPS}",
                              "optim.warmup_steps=10", "optim.lr=1e-3", "optim.presence_weight=5",
                              "checkpoint.every_n_steps=0", f"name=head_{str(head).lower()}",
                              f"root_dir={tmp_path / 'runs'}", "logging.tensorboard=false",
                              "logging.progress_bar=false", "logging.val_images=0"])
            metrics = train(cfg).callback_metrics
            results[head] = {k: float(metrics[f"val/{k}"]) for k in ("giou", "ciou", "n_acc", "t_acc")}
            results[head]["seconds"] = (time.perf_counter() - wall, time.process_time() - cpu)
    for head, r in results.items():
        print(f"presence_head={head}: gIoU {r['giou']:.3f} cIoU {r['ciou']:.3f} N-acc {r['n_acc']:.3f} "
              f"T-acc {r['t_acc']:.3f} ({expressions} expressions, {no_target} no-target; {STEPS} steps in "
              f"{r['seconds'][0]:.0f} s wall, {r['seconds'][1]:.0f} s CPU)")
    with_head, without = results[True], results[False]
    assert with_head["n_acc"] >= 0.9 and with_head["t_acc"] >= 0.9
    assert with_head["giou"] > without["giou"]


def test_resume_with_negatives_replays_the_uninterrupted_stream(tmp_path, tokenizer_dir):  # noqa: F811
    from evfsam_lightning.config import SourceConfig
    from evfsam_lightning.data.datamodule import EvfDataModule
    from tests.data.conftest import consume, data_settings, write_source
    from tests.data.test_resume import _checkpoint_round_trip, _view

    write_source(tmp_path, "ade20k", 15, 3)
    templates = ["[semantic] {}", "[semantic] the {}", "[semantic] a {} here"]
    (tmp_path / "ade20k" / "vocabulary.json").write_text(json.dumps(
        {"templates": templates, "names": ["thing", "car", "tree", "sky"]}))

    def module():
        pair = data_settings(tokenizer_dir, tmp_path, num_workers=2, negatives_per_image=2, samples_per_epoch=12,
                             train=[SourceConfig("ade20k", [str(tmp_path / "ade20k")], 1.0)])
        return EvfDataModule(*pair, rank=1, world_size=2)

    total, step = 8, 3
    reference = _view(consume(module(), total))
    phrased = {t.format(n): t for t in templates for n in ("car", "tree", "sky")}
    negatives = [e for _, expressions, _ in reference for e in expressions if e.startswith("[semantic] ")]
    assert negatives and set(negatives) <= set(phrased)
    assert len({phrased[e] for e in negatives}) > 1  # the template draw is part of what resume replays
    first = module()
    assert _view(consume(first, step)) == reference[:step]
    resumed = module()
    resumed.load_state_dict(_checkpoint_round_trip(first.state_dict()))
    assert _view(consume(resumed, total - step)) == reference[step:]
