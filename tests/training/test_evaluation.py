"""The reference evaluation protocol (issue 13 items 5, 6): every sentence scored, GRES metrics for
no-target expressions, and `evfsam-eval --benchmark refcoco` on tiny refer-layout shards."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from evfsam_lightning.cli.evaluate import main as evaluate
from evfsam_lightning.data.schema import Sample, SampleObject, encode_sample
from evfsam_lightning.training.metrics import ReferringIoU
from tests.data.conftest import write_shard
from tests.training.conftest import clean_env


def _logits(*pixels: list[tuple[int, int]], size: int = 4) -> torch.Tensor:
    out = torch.full((len(pixels), size, size), -1.0)
    for i, on in enumerate(pixels):
        for y, x in on:
            out[i, y, x] = 1.0
    return out


def _targets(*pixels: list[tuple[int, int]], size: int = 4) -> torch.Tensor:
    out = torch.zeros(len(pixels), size, size, dtype=torch.uint8)
    for i, on in enumerate(pixels):
        for y, x in on:
            out[i, y, x] = 1
    return out


def _score(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    metric = ReferringIoU(["g"])
    metric.update(logits, targets, torch.zeros(len(targets), dtype=torch.long))
    return metric.compute()["g"]


def test_generalized_metrics_all_targets_found_and_no_target_left_empty():
    # target 1: I=2 U=3; target 2: I=1 U=1; no-target: nothing predicted (counts 1, adds nothing to cIoU)
    r = _score(_logits([(0, 0), (0, 1), (1, 1)], [(2, 2)], []), _targets([(0, 0), (0, 1)], [(2, 2)], []))
    assert r == {"giou": pytest.approx((2 / 3 + 1 + 1) / 3), "ciou": pytest.approx(3 / 4), "expressions": 3,
                 "no_target": 1, "n_acc": 1.0, "t_acc": 1.0}


def test_generalized_metrics_a_no_target_with_a_prediction_is_missed():
    # target: I=1 U=1; no-target with 3 predicted pixels: IoU 0, and U=3 enters cIoU's denominator
    r = _score(_logits([(1, 1)], [(0, 0), (0, 1), (3, 3)]), _targets([(1, 1)], []))
    assert r["giou"] == pytest.approx(0.5) and r["ciou"] == pytest.approx(1 / 4)
    assert (r["no_target"], r["n_acc"], r["t_acc"]) == (1, 0.0, 1.0)


def test_generalized_metrics_an_empty_prediction_on_a_target_is_a_false_no_target():
    # target predicted empty: IoU 0, U=2; other target I=1 U=2; two no-targets, one left empty, one not (U=1)
    r = _score(_logits([], [(0, 0), (0, 1)], [], [(3, 3)]),
               _targets([(2, 2), (2, 3)], [(0, 0)], [], []))
    assert r["giou"] == pytest.approx((0 + 0.5 + 1 + 0) / 4) and r["ciou"] == pytest.approx(1 / 5)
    assert (r["expressions"], r["no_target"], r["n_acc"], r["t_acc"]) == (4, 2, 0.5, 0.5)


def test_ignored_pixels_do_not_make_a_prediction_non_empty():
    target = _targets([])
    target[0, 0, 0] = 255
    r = _score(_logits([(0, 0)]), target)  # the only predicted pixel is ignored: an empty prediction
    assert (r["giou"], r["n_acc"], r["t_acc"] != r["t_acc"]) == (1.0, 1.0, True)  # t_acc NaN: no target


def test_splits_without_no_target_expressions_report_only_giou_and_ciou():
    assert set(_score(_logits([(0, 0)]), _targets([(0, 0)]))) == {"giou", "ciou", "expressions"}


# ---- end to end: evfsam-eval on a tiny model ----------------------------------------------------------

SENTENCES = ["the man on the left", "Left MAN ", "  a person", "the red car", "car", "blue sky",
             "the dog", "nothing here at all", "Zebra"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from evfsam_lightning.data.tokenizer import build_tokenizer
    from evfsam_lightning.models.builders import build_model
    from evfsam_lightning.models.checkpoints import export_reference

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(5)
    tok = build_tokenizer([s.lower() for s in SENTENCES] * 20, root / "tok", vocab_size=60)
    return export_reference(build_model("tiny"), root / "evf-sam", tokenizer_dir=tok)


def _sample(key: str, seed: int, sentences: list[list[str]], no_target: int | None = None) -> tuple[Sample, dict]:
    """An image whose object i carries sentences[i]; object `no_target` has an all-zero mask and the
    record flag (the gRefCOCO convention)."""
    rng = np.random.default_rng(seed)
    h, w = 40, 48
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    objects = []
    for i, exprs in enumerate(sentences):
        mask = np.zeros((h, w), np.uint8) if i == no_target else (rng.random((h, w)) < 0.4).astype(np.uint8)
        objects.append(SampleObject(exprs, mask, "thing", str(i), no_target=i == no_target))
    sample = Sample(key=key, source="refcoco_unc", task="referring", image_bytes=buf.getvalue(), image_ext="png",
                    objects=objects, height=h, width=w)
    members = encode_sample(sample)
    assert (b'"no_target": true' in members["json"]) == (no_target is not None)
    return sample, members


def _write_split(folder, samples: list[tuple[Sample, dict]]) -> None:
    folder.mkdir(parents=True)
    write_shard(folder / "refcoco_unc-000000.tar", [m for _, m in samples])
    (folder / "sizes.json").write_text(json.dumps({"refcoco_unc-000000.tar": len(samples)}))


def _split(seed: int, with_no_target: bool) -> list[tuple[Sample, dict]]:
    return [_sample(f"img{seed}a", seed, [SENTENCES[0:3], SENTENCES[3:5]]),
            _sample(f"img{seed}b", seed + 1, [SENTENCES[5:6], SENTENCES[6:7], SENTENCES[7:9]],
                    no_target=2 if with_no_target else None),
            _sample(f"img{seed}c", seed + 2, [SENTENCES[0:2]])]


def test_eval_scores_every_sentence_of_every_object(tmp_path, tiny_checkpoint):
    from evfsam_lightning.training.loading import load_for_inference

    samples = _split(1, with_no_target=True)
    _write_split(tmp_path / "val", samples)
    assert evaluate(["--checkpoint", str(tiny_checkpoint), "--data", f"val={tmp_path / 'val'}", "--accelerator",
                     "cpu", "--workers", "0", "--batch-size", "2", "--no-progress",
                     "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())["splits"]["val"]
    assert result["expressions"] == 3 + 2 + 1 + 1 + 2 + 2 == 11  # every sentence of every object

    # The same numbers by hand: each (image, sentence) predicted on its own, text strip().lower()-ed.
    model, tokenizer = load_for_inference(tiny_checkpoint)
    inter = union = iou = 0.0
    nt_empty = t_found = 0
    with torch.no_grad():
        for sample, _ in samples:
            image = sample.decode_image()
            for obj in sample.objects:
                for text in obj.expressions:
                    pred = (model.predict(image, text.strip().lower(), tokenizer) > 0).numpy()
                    gt = obj.mask == 1
                    i, u = float((pred & gt).sum()), float((pred | gt).sum())
                    inter, union, iou = inter + i, union + u, iou + (i / u if u else 1.0)
                    nt_empty += int(not gt.any() and not pred.any())
                    t_found += int(gt.any() and pred.any())
    assert result["giou"] == pytest.approx(iou / 11, abs=1e-6)
    assert result["ciou"] == pytest.approx(inter / union, abs=1e-6)
    assert result["no_target"] == 2  # both sentences of the no-target object
    assert result["n_acc"] == pytest.approx(nt_empty / 2) and result["t_acc"] == pytest.approx(t_found / 9)


def _benchmark_shards(root) -> None:
    """refcoco val and testB, refcocog test, in the folders `evfsam-shards refer --out
    <root>/<dataset>_<split_by>` writes; refcoco+ val under the plain dataset name."""
    for i, rel in enumerate(["refcoco_unc/val", "refcoco_unc/testB", "refcocog_umd/test", "refcoco+/val"]):
        _write_split(root / rel, _split(10 * i, with_no_target=False)[: 1 + i % 3])


def test_benchmark_refcoco_finds_the_splits_and_writes_the_table(tmp_path, tiny_checkpoint, capsys):
    _benchmark_shards(tmp_path / "shards")
    out = tmp_path / "results" / "refcoco.json"
    assert evaluate(["--checkpoint", str(tiny_checkpoint), "--benchmark", "refcoco", "--shards",
                     str(tmp_path / "shards"), "--accelerator", "cpu", "--workers", "0", "--no-progress",
                     "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "missing: refcoco_testA, refcoco+_testA, refcoco+_testB, refcocog_val" in captured.err
    r = json.loads(out.read_text())
    found = ["refcoco_val", "refcoco_testB", "refcoco+_val", "refcocog_test"]
    assert [n for n, s in r["splits"].items() if s is not None] == found
    assert r["missing"] == ["refcoco_testA", "refcoco+_testA", "refcoco+_testB", "refcocog_val"]
    assert r["splits"]["refcoco_val"]["expressions"] == 5 and r["splits"]["refcocog_test"]["expressions"] == 11
    assert r["splits"]["refcoco+_val"]["shards"] == str(tmp_path / "shards" / "refcoco+" / "val")
    assert r["published_ciou"]["refcoco_val"] == 82.4 and r["published_ciou"]["refcocog_test"] == 78.3
    assert r["mean"]["published_ciou"] == pytest.approx((82.4 + 80.2 + 76.5 + 78.3) / 4)
    assert r["mean"]["ciou"] == pytest.approx(np.mean([r["splits"][n]["ciou"] for n in found]))
    markdown = out.with_suffix(".md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| refcoco_val "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    s = r["splits"]["refcoco_val"]
    assert cells == ["refcoco_val", "5", f"{100 * s['giou']:.2f}", f"{100 * s['ciou']:.2f}", "82.4",
                     f"{100 * s['ciou'] - 82.4:+.2f}"]
    assert "| refcoco_testA | missing |" in markdown
    assert any(line.startswith("refcoco+_val") for line in captured.out.splitlines())  # the printed table


def test_benchmark_without_any_split_is_a_one_line_error(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "shards" / "refcoco_unc").mkdir(parents=True)
    assert evaluate(["--checkpoint", str(tiny_checkpoint), "--benchmark", "refcoco", "--shards",
                     str(tmp_path / "shards")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evfsam-eval: error: --benchmark refcoco: no split found") and "\n" not in err


@pytest.mark.slow
@pytest.mark.distributed
def test_generalized_metrics_are_the_same_on_one_and_two_ranks(tmp_path, tiny_checkpoint):
    _write_split(tmp_path / "val", _split(3, with_no_target=True) + _split(7, with_no_target=True))
    for devices in (1, 2):
        result = subprocess.run(
            [sys.executable, "-m", "evfsam_lightning.cli.evaluate", "--checkpoint", str(tiny_checkpoint),
             "--data", f"val={tmp_path / 'val'}", "--devices", str(devices), "--accelerator", "cpu",
             "--workers", "0", "--batch-size", "1", "--no-progress", "--out", str(tmp_path / f"r{devices}.json")],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    one, two = (json.loads((tmp_path / f"r{d}.json").read_text())["splits"]["val"] for d in (1, 2))
    assert one == two and one["expressions"] == 22 and one["no_target"] == 4


def test_validation_during_training_reports_the_generalized_metrics():
    import lightning as L

    from evfsam_lightning.training.module import EvfSamModule
    from tests.training.test_module import _batch, _Batches, _cfg

    grefs, refs = _batch(), _batch()
    grefs["masks"][0][1] = 0  # the second expression of the first image has no target
    module = EvfSamModule(_cfg("model.mode=frozen_image_encoder", "logging.val_images=0"),
                          val_sources=["grefs", "refs"])
    loaders = [torch.utils.data.DataLoader(_Batches([b]), batch_size=None, collate_fn=lambda b: b)
               for b in (grefs, refs)]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(module, dataloaders=loaders, verbose=False)
    logged = {k.split("/dataloader_idx")[0] for k in trainer.callback_metrics}
    assert {"val/giou", "val/ciou", "val/refs/giou", "val/grefs/ciou"} <= logged
    assert {"val/n_acc", "val/t_acc", "val/grefs/n_acc", "val/grefs/t_acc"} <= logged
    assert not {"val/refs/n_acc", "val/refs/t_acc"} & logged  # a split without no-target expressions


def test_shuffled_expressions_come_from_another_object_of_the_same_image():
    from evfsam_lightning.training.evaluation import shuffle_expressions_within_images

    ids = torch.arange(7).view(7, 1)  # expression p has the single token p
    batch = {"input_ids": ids, "attention_mask": torch.ones(7, 1, dtype=torch.bool),
             "offsets": torch.tensor([0, 5, 7]), "object_index": torch.tensor([0, 0, 0, 1, 1, 4, 4])}
    out = shuffle_expressions_within_images(batch)
    # image 0: object 0's three sentences take object 1's (cyclically), object 1's take object 0's;
    # image 1: one object with two sentences keeps them
    assert out["input_ids"].view(-1).tolist() == [3, 4, 3, 0, 1, 5, 6]


def test_converted_grefcoco_split_reports_the_generalized_metrics(tmp_path, tiny_checkpoint):
    from tests.data.test_real_layouts import make_grefcoco
    from tests.data.test_sources import run_cli

    make_grefcoco(tmp_path / "refer_seg")
    assert run_cli("grefcoco", "--root", tmp_path / "refer_seg", "--out", tmp_path / "g", "--split", "val",
                   "--workers", 1) == 0
    assert evaluate(["--checkpoint", str(tiny_checkpoint), "--data", f"gval={tmp_path / 'g' / 'val'}",
                     "--accelerator", "cpu", "--workers", "0", "--no-progress", "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())["splits"]["gval"]
    # val: "small person" (a target) and the no-target ref's "a horse", "horse on the left"
    assert (r["expressions"], r["no_target"]) == (3, 2) and {"n_acc", "t_acc"} <= set(r)


def test_metric_sums_do_not_depend_on_how_expressions_are_split_over_ranks():
    """IoUs 0.1, 0.2 and 0.3 summed as (0.1 + 0.2) + 0.3 and as 0.1 + (0.2 + 0.3) differ in the last
    bit in float64; the int64 states give one answer for any split (here: two "ranks" whose states
    are added, as the all-reduce does)."""
    def masks(k: int) -> tuple[torch.Tensor, torch.Tensor]:  # I = k pixels, U = 10 pixels
        logits = torch.full((1, 1, 10), -1.0)
        logits[..., :k] = 1.0
        target = torch.ones(1, 1, 10, dtype=torch.long)
        return logits, target

    one = ReferringIoU(["g"])
    for k in (1, 2, 3):
        one.update(*masks(k), torch.zeros(1, dtype=torch.long))
    first, second = ReferringIoU(["g"]), ReferringIoU(["g"])
    first.update(*masks(1), torch.zeros(1, dtype=torch.long))
    for k in (2, 3):
        second.update(*masks(k), torch.zeros(1, dtype=torch.long))
    for name in ("intersection", "union", "iou_sum", "count"):
        getattr(first, name).add_(getattr(second, name))
    assert first.compute() == one.compute()
    assert one.compute()["g"]["giou"] == pytest.approx(0.2, abs=1e-9)
