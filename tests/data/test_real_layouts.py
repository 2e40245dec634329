"""Issue 13: every converter reads the layout EVF-SAM's loaders read with `--root` alone, every COCO
segmentation form, the reference's label semantics, and gRefCOCO (multi-target, overlapping and
no-target refs) through conversion, the stream and the loss. The raw datasets are built here in the
real on-disk layouts (protocol-2 refs pickles, grefs JSON, COCO instances with categories)."""

from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from evfsam_lightning.data.datamodule import EvfDataModule
from evfsam_lightning.data.sources.common import decode_coco_segmentation
from evfsam_lightning.data.tokenizer import build_tokenizer
from evfsam_lightning.training.losses import mask_loss
from tests.data.conftest import consume, data_settings
from tests.data.test_sources import (
    POLY,
    H,
    W,
    box,
    decode_segmentation,
    read_split,
    report,
    rle,
    run_cli,
    uncompressed_rle,
    write_image,
    write_png,
)


def skip_counts(out: Path) -> dict[str, int]:
    return {k: v["count"] for k, v in report(out)["skipped"].items()}


# ---------------------------------------------------------------- one decoder, every COCO form
def test_decoder_reads_every_coco_segmentation_form():
    a, b = box(0, 10, 0, 10), box(5, 20, 8, 30)
    union = a | b
    np.testing.assert_array_equal(decode_coco_segmentation(POLY, H, W), decode_segmentation(POLY))
    np.testing.assert_array_equal(decode_coco_segmentation(rle(a), H, W), a)              # bare, compressed
    np.testing.assert_array_equal(decode_coco_segmentation(uncompressed_rle(b), H, W), b)  # bare, uncompressed
    np.testing.assert_array_equal(decode_coco_segmentation([rle(a)], H, W), a)            # Objects365: [RLE]
    np.testing.assert_array_equal(decode_coco_segmentation([rle(a), uncompressed_rle(b)], H, W), union)
    bytes_counts = {"size": [H, W], "counts": rle(a)["counts"].encode()}
    np.testing.assert_array_equal(decode_coco_segmentation([bytes_counts], H, W), a)
    assert decode_coco_segmentation([], H, W).sum() == 0
    assert decode_coco_segmentation([rle(a), rle(b)], H, W).max() == 1  # OR-ed, not summed
    with pytest.raises(ValueError, match="RLE size"):
        decode_coco_segmentation([rle(a), rle(np.zeros((H + 1, W), np.uint8))], H, W)
    with pytest.raises(ValueError, match="mixes"):
        decode_coco_segmentation([rle(a), POLY[0]], H, W)
    with pytest.raises(ValueError, match="neither polygons nor RLE"):
        decode_coco_segmentation("garbage", H, W)


# ---------------------------------------------------------------- RefCLEF: list-of-RLE annotations
def write_refs(path: Path, refs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(refs, f, protocol=2)


def sentences(ref_id: int, texts: list[str]) -> list[dict]:
    return [{"sent": t, "raw": t.capitalize() + " ", "tokens": t.split(), "sent_id": ref_id * 10 + k}
            for k, t in enumerate(texts)]


def test_refclef_list_of_rle_from_root_alone(tmp_path):
    base = tmp_path / "data"
    root = base / "refer_seg"  # EVF-SAM's loaders are given the folder above refer_seg
    names = {1: "25/images/25008.jpg", 2: "40/images/40011.jpg"}  # saiapr_tc-12 keeps images in subfolders
    files = {i: write_image(root / "images" / "saiapr_tc-12" / n, i) for i, n in names.items()}
    a, b, c = box(0, 10, 0, 10), box(12, 20, 2, 9), box(3, 23, 15, 31)
    instances = {
        "images": [{"id": i, "file_name": n, "height": H, "width": W} for i, n in names.items()],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 3, "segmentation": [rle(a), rle(b)], "area": 1, "iscrowd": 0,
             "bbox": [0, 0, 1, 1]},
            {"id": 8, "image_id": 1, "category_id": 4, "segmentation": [uncompressed_rle(c)], "area": 1,
             "iscrowd": 0, "bbox": [0, 0, 1, 1]},
            {"id": 9, "image_id": 2, "category_id": 3, "segmentation": [rle(c)], "area": 1, "iscrowd": 0,
             "bbox": [0, 0, 1, 1]},
        ],
        "categories": [{"id": 3, "name": "man", "supercategory": "man"}, {"id": 4, "name": "sky", "supercategory": ""}],
    }
    (root / "refclef").mkdir(parents=True)
    (root / "refclef" / "instances.json").write_text(json.dumps(instances))
    refs = [{"ref_id": 2, "ann_id": 8, "image_id": 1, "category_id": 4, "split": "train", "file_name": names[1],
             "sentences": sentences(2, ["sky", "blue sky top right"]), "sent_ids": [20, 21]},
            {"ref_id": 1, "ann_id": 7, "image_id": 1, "category_id": 3, "split": "train", "file_name": names[1],
             "sentences": sentences(1, ["guy left"]), "sent_ids": [10]},
            {"ref_id": 3, "ann_id": 9, "image_id": 2, "category_id": 3, "split": "test", "file_name": names[2],
             "sentences": sentences(3, ["man"]), "sent_ids": [30]}]
    write_refs(root / "refclef" / "refs(unc).p", refs)
    for given in (root, base):
        out = tmp_path / f"out_{given.name}"
        assert run_cli("refer", "--root", given, "--dataset", "refclef", "--out", out, "--workers", 1) == 0
        assert skip_counts(out) == {}
        s = read_split(out, "train")["refclef_unc-train-1"]
        assert s.image_bytes == files[1] and s.image_file == names[1]
        assert [(o.expressions, o.id) for o in s.objects] == [
            (["guy left"], "ref 1 / ann 7"), (["sky", "blue sky top right"], "ref 2 / ann 8")]
        np.testing.assert_array_equal(s.objects[0].mask, a | b)
        np.testing.assert_array_equal(s.objects[1].mask, c)
        t = read_split(out, "test")["refclef_unc-test-2"]
        assert t.image_bytes == files[2] and t.objects[0].expressions == ["man"]
        np.testing.assert_array_equal(t.objects[0].mask, c)


# ---------------------------------------------------------------- gRefCOCO
def make_grefcoco(root: Path) -> dict:
    img_dir = root / "images" / "mscoco" / "images" / "train2014"
    ids = (1, 2, 3, 4)
    names = {i: f"COCO_train2014_{i:012d}.jpg" for i in ids}
    files = {i: write_image(img_dir / names[i], 50 + i) for i in ids}
    segs = {10: POLY, 11: [rle(box(8, 20, 10, 25))], 12: uncompressed_rle(box(0, 5, 20, 32)),
            13: rle(box(2, 6, 2, 6)), 14: POLY}
    image_of = {10: 1, 11: 1, 12: 1, 13: 2, 14: 3}
    cat_of = {10: 1, 11: 1, 12: 2, 13: 1, 14: 2}
    instances = {
        "images": [{"id": i, "file_name": names[i], "height": H, "width": W} for i in ids],
        "annotations": [{"id": a, "image_id": image_of[a], "category_id": cat_of[a], "segmentation": s,
                         "area": 1.0, "bbox": [0, 0, 1, 1], "iscrowd": 0} for a, s in segs.items()],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 2, "name": "dog", "supercategory": "animal"}],
    }

    def ref(ref_id, ann_ids, image_id, split, texts):
        no_target = ann_ids == [-1]
        return {"ref_id": ref_id, "ann_id": ann_ids, "image_id": image_id, "split": split,
                "category_id": [] if no_target else [cat_of.get(a, 1) for a in ann_ids], "no_target": no_target,
                "file_name": names[image_id], "sentences": sentences(ref_id, texts),
                "sent_ids": [ref_id * 10 + k for k in range(len(texts))]}

    refs = [
        ref(1, [10, 11], 1, "train", ["two people", "both persons"]),   # multi-target
        ref(2, [11, 12], 1, "train", ["right person and the dog"]),     # overlaps ref 1 (shares ann 11)
        ref(3, [-1], 1, "train", ["the cat"]),                           # no target
        ref(4, [12], 1, "train", []),                                    # no sentence: counted, skipped
        ref(5, [13], 2, "val", ["small person"]),
        ref(6, [-1], 2, "val", ["a horse", "horse on the left"]),
        ref(7, [14], 3, "testA", ["dog"]),
        ref(8, [-1], 4, "testB", ["the giraffe"]),
        {**ref(9, [10], 1, "train", ["broken"]), "ann_id": [-1, 10]},  # -1 beside real ids: malformed
        ref(10, [10, 99], 1, "train", ["half missing"]),                 # one id not in instances.json
    ]
    (root / "grefcoco").mkdir(parents=True)
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    (root / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    return {"files": files, "segs": segs}


def no_target_flags(tar: Path) -> dict[str, list]:
    """The raw `no_target` fields of every object record in a shard, read with tarfile alone."""
    out = {}
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            if m.name.endswith(".json"):
                rec = json.loads(tf.extractfile(m).read())
                out[rec["key"]] = [o.get("no_target") for o in rec["objects"]]
    return out


def test_grefcoco_multi_target_overlap_and_no_target(tmp_path, capsys):
    assert run_cli("grefcoco", "--root", tmp_path / "refer_seg", "--out", tmp_path / "none") == 2
    assert "grefcoco/grefs(unc).json: refs file not found" in capsys.readouterr().err
    raw = make_grefcoco(tmp_path / "refer_seg")
    out = tmp_path / "out"
    assert run_cli("grefcoco", "--root", tmp_path / "refer_seg", "--out", out, "--workers", 1) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "testA", "testB", "train", "val"]
    train = read_split(out, "train")
    (s,) = train.values()
    assert s.source == "grefcoco_unc" and s.task == "referring" and s.image_bytes == raw["files"][1]
    seg = {a: decode_segmentation(v[0] if isinstance(v, list) and isinstance(v[0], dict) else v)
           for a, v in raw["segs"].items()}
    assert [(o.expressions, o.id, o.no_target) for o in s.objects] == [
        (["two people", "both persons"], "ref 1 / ann 10, 11", False),
        (["right person and the dog"], "ref 2 / ann 11, 12", False),
        (["the cat"], "ref 3 / no target", True)]
    np.testing.assert_array_equal(s.objects[0].mask, seg[10] | seg[11])
    np.testing.assert_array_equal(s.objects[1].mask, seg[11] | seg[12])
    assert s.objects[2].mask.shape == (H, W) and not s.objects[2].mask.any()
    assert s.objects[0].category == "person" and s.objects[1].category == "person, dog"

    v = read_split(out, "val")["grefcoco_unc-val-2"]
    assert [(o.expressions, o.no_target) for o in v.objects] == [
        (["small person"], False), (["a horse", "horse on the left"], True)]
    np.testing.assert_array_equal(v.objects[0].mask, box(2, 6, 2, 6))
    assert read_split(out, "testA")["grefcoco_unc-testA-3"].objects[0].expressions == ["dog"]
    (b,) = read_split(out, "testB").values()
    assert b.image_bytes == raw["files"][4] and b.objects[0].no_target and not b.objects[0].mask.any()

    # The record field is exactly `"no_target": true`, and absent on target objects.
    flags = no_target_flags(next((out / "train").glob("*.tar")))
    assert flags == {"grefcoco_unc-train-1": [None, None, True]}
    assert skip_counts(out) == {"no_expression": 1, "bad_annotation": 1, "missing_annotation": 1}
    assert report(out)["skipped"]["missing_annotation"]["examples"] == ["ref 10"]
    assert report(out)["written"] == {"samples": 4, "objects": 7, "expressions": 9}


def test_grefcoco_no_target_objects_reach_the_batch_and_the_loss(tmp_path):
    make_grefcoco(tmp_path / "refer_seg")
    out = tmp_path / "out"
    assert run_cli("grefcoco", "--root", tmp_path / "refer_seg", "--out", out, "--split", "train", "val",
                   "--workers", 1) == 0
    texts = ["two people", "both persons", "right person and the dog", "the cat", "small person", "a horse",
             "horse on the left"]
    tok = str(build_tokenizer(texts * 20, tmp_path / "tok", vocab_size=64))
    from evfsam_lightning.config import SourceConfig

    pair = data_settings(tok, tmp_path, train=[SourceConfig("grefcoco", [str(out / "train")], 1.0),
                                               SourceConfig("grefcoco_val", [str(out / "val")], 1.0)],
                         batch_size=2, max_expressions_per_image=3, samples_per_epoch=8)
    seen_empty = 0
    for batch in consume(EvfDataModule(*pair), 4):
        masks = batch["masks"]
        seen_empty += sum(int((m == 0).all()) for group in masks for m in group)
        logits = [torch.randn(m.shape, requires_grad=True) for m in masks]
        loss = mask_loss(logits, masks)
        assert torch.isfinite(loss["loss"]) and torch.isfinite(loss["dice"]) and torch.isfinite(loss["bce"])
        loss["loss"].backward()
        assert all(torch.isfinite(lg.grad).all() for lg in logits)
    assert seen_empty > 0  # no-target objects are trained on as empty-mask targets, not skipped


def test_mask_loss_of_an_all_zero_target_is_finite_and_pulls_logits_down():
    target = torch.zeros(1, H, W, dtype=torch.uint8)
    for value in (-20.0, 0.0, 20.0):
        out = mask_loss([torch.full((1, H, W), value)], [target])
        assert all(torch.isfinite(v) for v in out.values())
    low = mask_loss([torch.full((1, H, W), -5.0)], [target])["loss"]
    high = mask_loss([torch.full((1, H, W), 5.0)], [target])["loss"]
    assert low < high


# ---------------------------------------------------------------- COCO family, EVF-SAM's layouts
def write_coco(path: Path, images: list[dict], anns: list[dict], categories: list[dict]) -> None:
    for k, a in enumerate(anns):
        a.setdefault("id", 500 + k)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", 1.0)
        a.setdefault("bbox", [0, 0, 1, 1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))


def test_objects365_real_layout_list_of_rle_and_crowd(tmp_path, capsys):
    base = tmp_path / "data"
    o365 = base / "Object365" / "raw" / "Objects365_v1" / "2019-08-02"
    names = {1: "obj365_train_000000000011.jpg", 2: "obj365_train_000000000012.jpg"}
    files = {i: write_image(o365 / "train" / n, 20 + i) for i, n in names.items()}
    images = [{"id": i, "file_name": n, "height": H, "width": W} for i, n in names.items()]
    anns = [{"image_id": 1, "category_id": 2, "segmentation": [rle(box(2, 9, 3, 11))]},
            {"image_id": 1, "category_id": 1, "segmentation": [rle(box(10, 24, 0, 32))], "iscrowd": 1},
            {"image_id": 2, "category_id": 1, "segmentation": [uncompressed_rle(box(0, 4, 0, 4))]}]
    write_coco(o365 / "o365_res_instances.json", images, anns,
               [{"id": 1, "name": "Person"}, {"id": 2, "name": "Other Shoes"}])
    for given in (base, o365):  # the folder EVF-SAM is given, or the dataset folder itself
        out = tmp_path / f"out_{given.name}"
        assert run_cli("objects365", "--root", given, "--out", out, "--workers", 1) == 0
        got = read_split(out, "train")
        assert list(got) == ["objects365-train-1", "objects365-train-2"]
        s = got["objects365-train-1"]
        assert s.task == "instance" and s.image_bytes == files[1] and s.image_file == names[1]
        assert [o.expressions for o in s.objects] == [["Other Shoes"], ["Person"]]  # crowd kept, as the reference
        np.testing.assert_array_equal(s.objects[0].mask, box(2, 9, 3, 11))
        np.testing.assert_array_equal(s.objects[1].mask, box(10, 24, 0, 32))
        np.testing.assert_array_equal(got["objects365-train-2"].objects[0].mask, box(0, 4, 0, 4))
        assert skip_counts(out) == {}
    # EVF-SAM's file holds one split: asking for two without an --ann that names {split} is an error.
    assert run_cli("objects365", "--root", base, "--out", tmp_path / "two", "--split", "train", "val") == 2
    assert "o365_res_instances.json is one file but 2 splits" in capsys.readouterr().err


def test_partimagenet_real_layout(tmp_path):
    base = tmp_path / "data"
    pin = base / "PartImageNet"
    files = {1: write_image(pin / "images" / "train" / "n01440764_1.JPEG", 31)}
    anns = [{"image_id": 1, "category_id": 9, "segmentation": POLY},
            {"image_id": 1, "category_id": 9, "segmentation": [[20.0, 15.0, 30.0, 15.0, 30.0, 22.0]]},
            {"image_id": 1, "category_id": 10, "segmentation": []},               # unavailable: covers nothing
            {"image_id": 1, "category_id": 10, "segmentation": rle(box(14, 24, 0, 8))}]
    write_coco(pin / "annotations" / "train" / "train.json",
               [{"id": 1, "file_name": "n01440764_1.JPEG", "height": H, "width": W}], anns,
               [{"id": 9, "name": "Fish Head", "supercategory": "Fish"},
                {"id": 10, "name": "Fish Body", "supercategory": "Fish"}])
    for given in (base, pin):
        out = tmp_path / f"out_{given.name}"
        assert run_cli("partimagenet", "--root", given, "--out", out, "--workers", 1) == 0
        s = read_split(out, "train")["partimagenet-train-1"]
        assert s.task == "part" and s.image_bytes == files[1]
        assert [o.expressions for o in s.objects] == [["[semantic] fish head"], ["[semantic] fish body"]]
        head = decode_segmentation(POLY) | decode_segmentation([[20.0, 15.0, 30.0, 15.0, 30.0, 22.0]])
        np.testing.assert_array_equal(s.objects[0].mask, head)
        np.testing.assert_array_equal(s.objects[1].mask, box(14, 24, 0, 8))


def test_pascal_part_real_layout_and_names(tmp_path):
    base = tmp_path / "data"
    pp = base / "vlpart" / "pascal_part"
    files = {1: write_image(pp / "VOCdevkit" / "VOC2010" / "JPEGImages" / "2008_000002.jpg", 41)}
    anns = [{"image_id": 1, "category_id": 19, "segmentation": rle(box(15, 20, 5, 9))},
            {"image_id": 1, "category_id": 19, "segmentation": [rle(box(15, 22, 20, 24))]},
            {"image_id": 1, "category_id": 83, "segmentation": POLY, "iscrowd": 1}]
    write_coco(pp / "train.json", [{"id": 1, "file_name": "2008_000002.jpg", "height": H, "width": W}], anns,
               [{"id": 19, "name": "bus:license plate", "abbr": "bus:liplate"},
                {"id": 83, "name": "potted plant:plant"}])
    for given in (pp, base):
        out = tmp_path / f"out_{given.name}"
        assert run_cli("pascal_part", "--root", given, "--out", out, "--workers", 1) == 0
        s = read_split(out, "train")["pascal_part-train-1"]
        assert s.image_bytes == files[1]
        assert [o.expressions for o in s.objects] == [["[semantic] bus license plate"],
                                                      ["[semantic] potted plant plant"]]
        np.testing.assert_array_equal(s.objects[0].mask, box(15, 20, 5, 9) | box(15, 22, 20, 24))
        np.testing.assert_array_equal(s.objects[1].mask, decode_segmentation(POLY))


# ---------------------------------------------------------------- HumanParsing, the reference's labels
def test_humanparsing_real_layout_background_and_viewer_sides(tmp_path):
    base = tmp_path / "data"
    hp = base / "humanparsing"
    labels = np.zeros((H, W), np.uint8)  # 0: background, trained as an object
    labels[20:, :5] = 9     # right shoe (viewer's naming)
    labels[20:, 27:] = 10   # left shoe
    labels[12:20, :4] = 12  # right leg
    labels[12:20, 28:] = 13  # left leg
    labels[4:12, :3] = 14   # right arm
    labels[4:12, 29:] = 15  # left arm
    labels[0, 0] = 255      # void: no object
    files = {"a": write_image(hp / "JPEGImages" / "0001_a.jpg", 61)}
    write_png(hp / "SegmentationClassAug" / "0001_a.png", labels)
    for given in (base, hp):
        out = tmp_path / f"out_{given.name}"
        assert run_cli("humanparsing", "--root", given, "--out", out, "--workers", 1) == 0
        s = read_split(out, "train")["humanparsing-train-0001_a"]
        assert s.image_bytes == files["a"]
        expected = {0: "background", 9: "right shoe", 10: "left shoe", 12: "right leg", 13: "left leg",
                    14: "right arm", 15: "left arm"}
        assert [o.expressions for o in s.objects] == [[f"[semantic] {n}"] for n in expected.values()]
        for o, v in zip(s.objects, expected, strict=True):
            np.testing.assert_array_equal(o.mask, (labels == v).astype(np.uint8))
        assert skip_counts(out) == {}


# ---------------------------------------------------------------- JSONL point lists
def test_jsonl_point_list_polygons(tmp_path):
    root = tmp_path / "custom"
    files = {"a": write_image(root / "a.jpg", 71)}
    square = [[2.0, 2.0], [14.0, 2.0], [14.0, 12.0], [2.0, 12.0]]
    tri = [[20, 15], [30, 15], [30, 22]]
    lines = [{"image": "a.jpg", "expression": "points", "mask": {"polygon": square}},
             {"image": "a.jpg", "expression": "two pieces", "mask": {"polygon": [square, tri]}},
             {"image": "a.jpg", "expression": "flat", "mask": {"polygon": [v for p in square for v in p]}},
             {"image": "a.jpg", "expression": "rle list", "mask": {"rle": [rle(box(0, 3, 0, 3)), rle(box(5, 8, 5, 8))]}}]
    (root / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert run_cli("jsonl", "--ann", root / "data.jsonl", "--out", out, "--workers", 1) == 0
    (s,) = read_split(out, "train").values()
    assert s.image_bytes == files["a"] and [o.expressions for o in s.objects] == [
        ["points"], ["two pieces"], ["flat"], ["rle list"]]
    np.testing.assert_array_equal(s.objects[0].mask, decode_segmentation(POLY))
    np.testing.assert_array_equal(s.objects[2].mask, decode_segmentation(POLY))
    np.testing.assert_array_equal(s.objects[1].mask,
                                  decode_segmentation(POLY) | decode_segmentation([[20, 15, 30, 15, 30, 22]]))
    np.testing.assert_array_equal(s.objects[3].mask, box(0, 3, 0, 3) | box(5, 8, 5, 8))
    assert skip_counts(out) == {}


def test_grefcoco_reads_the_pickle_first_as_g_refer_does(tmp_path):
    make_grefcoco(tmp_path / "refer_seg")
    folder = tmp_path / "refer_seg" / "grefcoco"
    refs = [r for r in json.loads((folder / "grefs(unc).json").read_text()) if r["split"] == "testB"]
    write_refs(folder / "grefs(unc).p", refs)
    out = tmp_path / "out"
    assert run_cli("grefcoco", "--root", tmp_path / "refer_seg", "--out", out, "--workers", 1) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "testB"]
    (s,) = read_split(out, "testB").values()
    assert s.objects[0].no_target and s.objects[0].expressions == ["the giraffe"]
