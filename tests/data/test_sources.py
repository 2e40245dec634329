"""Every converter, end to end: a tiny dataset in the real on-disk layout and schema -> the public
CLI -> shards read back and checked against the source files, decoded independently here."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from evfsam_lightning.cli.shards import main
from evfsam_lightning.data.convert import convert
from evfsam_lightning.data.schema import SampleError
from evfsam_lightning.data.shards import load_sizes, read_shard_samples
from evfsam_lightning.data.sources import ade20k, refer, synthetic
from evfsam_lightning.data.sources.common import UnsafePickleError, load_pickle

H, W = 24, 32


# ---------------------------------------------------------------- helpers building raw datasets
def write_image(path: Path, seed: int, h: int = H, w: int = W, fmt: str = "JPEG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path.read_bytes()


def write_png(path: Path, array: np.ndarray, mode: str = "L", palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")  # label values become palette indices, as in LIP releases
        im.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)])
    im.save(path)


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def decode_segmentation(seg, h=H, w=W) -> np.ndarray:
    """Independent of the converters: pycocotools used directly."""
    if isinstance(seg, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w)))
    if isinstance(seg["counts"], list):
        return mask_utils.decode(mask_utils.frPyObjects(seg, h, w))
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})


def box(y0, y1, x0, x1, h=H, w=W) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


POLY = [[2.0, 2.0, 14.0, 2.0, 14.0, 12.0, 2.0, 12.0]]


def read_split(out: Path, split: str) -> dict:
    sizes = load_sizes(out / split)
    samples = [s for name in sizes["shards"] for s in read_shard_samples(out / split / name)]
    assert len(samples) == sizes["total"]
    return {s.key: s for s in samples}


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def run_cli(*args) -> int:
    return main([*map(str, args), "--no-progress"])


def no_tmp(out: Path) -> bool:
    return not any(p.name.endswith(".tmp") for p in out.rglob("*"))


# ---------------------------------------------------------------- refer
def make_refer(root: Path) -> dict:
    img_dir = root / "images" / "mscoco" / "images" / "train2014"
    names = {i: f"COCO_train2014_{i:012d}.jpg" for i in (1, 2, 3)}
    files = {i: write_image(img_dir / names[i], i) for i in (1, 2)}  # image 3 is missing on disk
    segs = {
        10: POLY,
        11: rle(box(5, 20, 16, 30)),
        12: uncompressed_rle(box(0, 10, 0, 10)),
        13: rle(np.zeros((H, W), np.uint8)),  # empty mask
        14: POLY,
    }
    instances = {
        "images": [{"id": i, "file_name": names[i], "height": H, "width": W} for i in (1, 2, 3)],
        "annotations": [{"id": a, "image_id": 2 if a == 12 else (3 if a == 14 else 1), "category_id": 1,
                         "segmentation": s, "area": 1.0, "bbox": [0, 0, 1, 1], "iscrowd": 0}
                        for a, s in segs.items()],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }

    def ref(ref_id, ann_id, image_id, split, sents):
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1, "split": split,
                "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "sentences": [{"sent": s, "sent_id": ref_id * 10 + k, "tokens": s.split(), "raw": s.upper()}
                              for k, s in enumerate(sents)],
                "sent_ids": [ref_id * 10 + k for k in range(len(sents))]}

    refs = [
        ref(101, 10, 1, "train", ["man on the left", "left guy"]),
        ref(102, 11, 1, "train", ["woman right"]),
        ref(103, 12, 2, "val", ["small box"]),
        ref(104, 10, 1, "val", ["man left", ""]),   # same image, other split; one empty sentence
        ref(105, 14, 3, "train", ["ghost"]),         # image file missing
        ref(106, 999, 1, "train", ["nothing"]),      # annotation missing
        ref(107, 13, 1, "train", ["empty"]),         # empty mask
        ref(108, 11, 2, "testA", []),                # no sentence
        {"ref_id": 109, "image_id": 1, "split": "train"},  # malformed entry
    ]
    (root / "refcoco").mkdir(parents=True)
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    return {"files": files, "segs": segs, "refs": refs}


def test_refer(tmp_path):
    raw = make_refer(tmp_path / "refer")
    out = tmp_path / "out"
    assert run_cli("refer", "--root", tmp_path / "refer", "--out", out, "--workers", 1) == 0
    train, val = read_split(out, "train"), read_split(out, "val")
    assert list(train) == ["refcoco_unc-train-1"] and list(val) == ["refcoco_unc-val-1", "refcoco_unc-val-2"]
    s = train["refcoco_unc-train-1"]
    assert s.source == "refcoco_unc" and s.task == "referring" and s.meta["split"] == "train"
    assert s.image_bytes == raw["files"][1] and s.image_ext == "jpg" and (s.height, s.width) == (H, W)
    assert s.image_file == "COCO_train2014_000000000001.jpg"
    assert [o.expressions for o in s.objects] == [["man on the left", "left guy"], ["woman right"]]
    assert [o.id for o in s.objects] == ["ref 101 / ann 10", "ref 102 / ann 11"]
    np.testing.assert_array_equal(s.objects[0].mask, decode_segmentation(raw["segs"][10]))
    np.testing.assert_array_equal(s.objects[1].mask, decode_segmentation(raw["segs"][11]))
    assert val["refcoco_unc-val-1"].objects[0].expressions == ["man left"]
    np.testing.assert_array_equal(val["refcoco_unc-val-2"].objects[0].mask, box(0, 10, 0, 10))
    assert val["refcoco_unc-val-2"].image_bytes == raw["files"][2]
    assert load_sizes(out / "testA")["total"] == 0  # its only ref had no sentence

    skipped = report(out)["skipped"]
    counts = {k: v["count"] for k, v in skipped.items()}
    assert counts == {"missing_image": 1, "missing_annotation": 1, "empty_mask": 1, "no_expression": 1,
                      "empty_expression": 1, "no_object": 1, "bad_annotation": 1}
    assert skipped["missing_annotation"]["examples"] == ["ref 106"]
    assert "COCO_train2014_000000000003.jpg" in skipped["missing_image"]["first_message"]
    assert report(out)["written"] == {"samples": 3, "objects": 4, "expressions": 5}
    assert no_tmp(out)


def test_refer_split_selection_and_strict(tmp_path, capsys):
    make_refer(tmp_path / "refer")
    out = tmp_path / "out"
    assert run_cli("refer", "--root", tmp_path / "refer", "--out", out, "--split", "val", "--workers", 1) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "val"]
    assert run_cli("refer", "--root", tmp_path / "refer", "--out", tmp_path / "o2", "--split", "nope") == 2
    assert "no refs in split(s) ['nope']" in capsys.readouterr().err

    plan = refer.plan(tmp_path / "refer", splits=["train"])
    with pytest.raises(SampleError, match="refs\\(unc\\).p: ref 109 \\(entry 8\\)"):
        convert(plan, tmp_path / "strict", strict=True, progress=False)
    plan.skipped = [s for s in plan.skipped if s.reason != "bad_annotation"]
    with pytest.raises(SampleError, match="ref 106 ann_id 999"):
        convert(plan, tmp_path / "strict", strict=True, progress=False)
    plan.skipped = []  # the first error left is found while building, in a worker
    with pytest.raises(SampleError, match="instances.json: annotation 13 \\(ref 107\\): mask is empty"):
        convert(plan, tmp_path / "strict", strict=True, progress=False, workers=2)
    plan = refer.plan(tmp_path / "refer", splits=["val"])
    plan.skipped = []
    with pytest.raises(SampleError, match="ref 104 sentence 1 has no text"):
        convert(plan, tmp_path / "strict2", strict=True, progress=False)
    assert not list((tmp_path / "strict2").rglob("*.*"))  # no shard, temp file, sizes.json or report
    assert run_cli("refer", "--root", tmp_path / "refer", "--out", tmp_path / "strict2", "--split", "val") == 0
    assert run_cli("refer", "--root", tmp_path / "refer", "--out", tmp_path / "o3", "--strict") == 2
    assert "refs(unc).p: ref 109" in capsys.readouterr().err


def test_conversion_is_deterministic_across_runs_and_workers(tmp_path):
    make_refer(tmp_path / "refer")
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        assert run_cli("refer", "--root", tmp_path / "refer", "--out", tmp_path / name, "--workers", workers,
                       "--shard-size", 1) == 0
    tars = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert len(tars) == 3
    for rel in tars:
        data = (tmp_path / "a" / rel).read_bytes()
        assert data == (tmp_path / "b" / rel).read_bytes() == (tmp_path / "c" / rel).read_bytes()
    assert (tmp_path / "a" / "report.json").read_bytes() == (tmp_path / "c" / "report.json").read_bytes()


def test_restricted_unpickler_rejects_code(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    make_refer(tmp_path / "refer")
    path = tmp_path / "refer" / "refcoco" / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "evil": Evil()}], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*(posix|os)\.system"):
        load_pickle(path)
    assert run_cli("refer", "--root", tmp_path / "refer", "--out", tmp_path / "out") == 2
    assert "refs(unc).p" in capsys.readouterr().err
    assert not (tmp_path / "owned").exists()
    plain = tmp_path / "plain.p"
    plain.write_bytes(pickle.dumps([{"a": (1, 2.5, "x", b"y", {3})}], protocol=2))
    assert load_pickle(plain) == [{"a": (1, 2.5, "x", b"y", {3})}]


# ---------------------------------------------------------------- COCO family
def make_coco(root: Path, ann_rel: str, img_rel: str, categories: list[dict], anns: list[dict],
              n_images: int = 3, missing: tuple[int, ...] = ()) -> dict:
    files = {}
    images = []
    for i in range(1, n_images + 1):
        name = f"{i:08d}.jpg"
        images.append({"id": i, "file_name": name, "height": H, "width": W})
        if i not in missing:
            files[i] = write_image(root / img_rel / name, 100 + i)
    for k, a in enumerate(anns):
        a.setdefault("id", 1000 + k)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", 1.0)
        a.setdefault("bbox", [0, 0, 1, 1])
    (root / ann_rel).parent.mkdir(parents=True, exist_ok=True)
    (root / ann_rel).write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return files


def test_coco_instances(tmp_path):
    cats = [{"id": 1, "name": "person"}, {"id": 7, "name": "traffic light"}]
    anns = [
        {"image_id": 1, "category_id": 1, "segmentation": POLY},
        {"image_id": 1, "category_id": 1, "segmentation": rle(box(14, 22, 20, 30))},
        {"image_id": 1, "category_id": 7, "segmentation": uncompressed_rle(box(0, 3, 0, 3)), "iscrowd": 1},
        {"image_id": 2, "category_id": 7, "segmentation": uncompressed_rle(box(1, 4, 25, 31))},
        {"image_id": 2, "category_id": 1, "segmentation": [[1.0, 2.0, 3.0, 4.0]]},  # bad polygon
        {"image_id": 3, "category_id": 1, "segmentation": POLY},  # image file missing
        {"image_id": 2, "category_id": 1, "segmentation": [[5.0, 5.0, 6.0, 6.0], *POLY]},  # degenerate piece
        {"image_id": 2, "category_id": 1, "segmentation": []},  # covers nothing
    ]
    root = tmp_path / "coco"
    files = make_coco(root, "annotations/instances_val2017.json", "val2017", cats, anns, n_images=4, missing=(3,))
    out = tmp_path / "out"
    assert run_cli("coco", "--root", root, "--out", out, "--split", "val2017", "--workers", 1) == 0
    got = read_split(out, "val2017")
    assert list(got) == ["coco-val2017-1", "coco-val2017-2"]
    s1 = got["coco-val2017-1"]
    assert s1.task == "instance" and s1.image_bytes == files[1]
    assert [(o.expressions, o.id) for o in s1.objects] == [(["person"], "ann 1000"), (["person"], "ann 1001")]
    np.testing.assert_array_equal(s1.objects[0].mask, decode_segmentation(POLY))
    np.testing.assert_array_equal(s1.objects[1].mask, box(14, 22, 20, 30))
    s2 = got["coco-val2017-2"]
    assert [o.expressions for o in s2.objects] == [["traffic light"], ["person"]]
    np.testing.assert_array_equal(s2.objects[0].mask, box(1, 4, 25, 31))
    np.testing.assert_array_equal(s2.objects[1].mask, decode_segmentation(POLY))
    counts = {k: v["count"] for k, v in report(out)["skipped"].items()}
    assert counts == {"crowd": 1, "bad_annotation": 1, "missing_image": 1, "no_object": 1, "empty_mask": 1}
    assert report(out)["skipped"]["bad_annotation"]["examples"] == ["ann 1004"]
    assert "instances_val2017.json: annotation 1004" in report(out)["skipped"]["bad_annotation"]["first_message"]


def test_objects365(tmp_path):
    cats = [{"id": 1, "name": "Person"}, {"id": 2, "name": "Other Shoes"}]
    anns = [
        {"image_id": 1, "category_id": 2, "segmentation": rle(box(2, 9, 3, 11))},
        {"image_id": 1, "category_id": 1, "segmentation": rle(box(10, 24, 0, 32))},
        {"image_id": 2, "category_id": 1, "segmentation": rle(np.zeros((H, W), np.uint8))},  # empty mask
        {"image_id": 2, "category_id": 1, "segmentation": {"size": [H + 1, W], "counts": "abc"}},  # wrong size
    ]
    root = tmp_path / "o365"
    files = make_coco(root, "annotations/train.json", "images/train", cats, anns, n_images=2)
    out = tmp_path / "out"
    # An older layout through the override flags (tests/data/test_real_layouts.py has the default one).
    assert run_cli("objects365", "--root", root, "--out", out, "--workers", 1, "--ann", "annotations/{split}.json",
                   "--images", "images/{split}") == 0
    got = read_split(out, "train")
    assert list(got) == ["objects365-train-1"]
    s = got["objects365-train-1"]
    assert s.source == "objects365" and s.task == "instance" and s.image_bytes == files[1]
    assert [o.expressions for o in s.objects] == [["Other Shoes"], ["Person"]]
    np.testing.assert_array_equal(s.objects[0].mask, box(2, 9, 3, 11))
    counts = {k: v["count"] for k, v in report(out)["skipped"].items()}
    assert counts == {"empty_mask": 1, "bad_annotation": 1, "no_object": 1}


def test_partimagenet_merges_parts(tmp_path):
    cats = [{"id": 0, "name": "Quadruped Head"}, {"id": 1, "name": "Quadruped Body"}]
    anns = [
        {"image_id": 1, "category_id": 0, "segmentation": rle(box(0, 10, 0, 10))},
        {"image_id": 1, "category_id": 0, "segmentation": POLY},  # overlaps the first: union, not sum
        {"image_id": 1, "category_id": 1, "segmentation": rle(box(15, 20, 5, 25)), "iscrowd": 1},
    ]
    root = tmp_path / "pin"
    files = make_coco(root, "annotations/val.json", "images/val", cats, anns, n_images=1)
    out = tmp_path / "out"
    assert run_cli("partimagenet", "--root", root, "--out", out, "--split", "val", "--workers", 1,
                   "--ann", "annotations/{split}.json", "--images", "images/{split}") == 0
    s = read_split(out, "val")["partimagenet-val-1"]
    assert s.task == "part" and s.image_bytes == files[1]
    assert [o.expressions for o in s.objects] == [["[semantic] quadruped head"], ["[semantic] quadruped body"]]
    head = np.clip(box(0, 10, 0, 10) + decode_segmentation(POLY), 0, 1)
    np.testing.assert_array_equal(s.objects[0].mask, head)
    assert s.objects[0].mask.max() == 1
    np.testing.assert_array_equal(s.objects[1].mask, box(15, 20, 5, 25))
    assert report(out)["skipped"] == {}


def test_pascal_part_names_and_merge(tmp_path):
    cats = [{"id": 1, "name": "aeroplane:body"}, {"id": 2, "name": "cow:lf_leg"}, {"id": 3, "name": "person:lear"}]
    anns = [
        {"image_id": 1, "category_id": 1, "segmentation": POLY},
        {"image_id": 1, "category_id": 2, "segmentation": rle(box(15, 20, 5, 9))},
        {"image_id": 1, "category_id": 2, "segmentation": rle(box(15, 22, 20, 24))},
        {"image_id": 2, "category_id": 3, "segmentation": rle(box(1, 3, 1, 3))},
        {"image_id": 2, "category_id": 3, "segmentation": "garbage"},  # one piece bad: counted, the rest kept
    ]
    root = tmp_path / "pp"
    make_coco(root, "annotations/train.json", "images/train", cats, anns, n_images=2)
    out = tmp_path / "out"
    assert run_cli("pascal_part", "--root", root, "--out", out, "--workers", 1, "--ann", "annotations/{split}.json",
                   "--images", "images/{split}") == 0
    got = read_split(out, "train")
    s = got["pascal_part-train-1"]
    assert s.task == "part"
    # ':' becomes a space, the rest is kept as written (the reference's rule)
    assert [o.expressions for o in s.objects] == [["[semantic] aeroplane body"], ["[semantic] cow lf_leg"]]
    np.testing.assert_array_equal(s.objects[1].mask, box(15, 20, 5, 9) | box(15, 22, 20, 24))
    # As the reference (which skips annotations it cannot decode), the part keeps its good piece.
    assert [o.expressions for o in got["pascal_part-train-2"].objects] == [["[semantic] person lear"]]
    np.testing.assert_array_equal(got["pascal_part-train-2"].objects[0].mask, box(1, 3, 1, 3))
    counts = {k: v["count"] for k, v in report(out)["skipped"].items()}
    assert counts == {"bad_annotation": 1}


# ---------------------------------------------------------------- label maps
def test_ade20k(tmp_path):
    base = tmp_path / "ade" / "ADEChallengeData2016"
    labels = np.zeros((H, W), np.uint8)
    labels[:8] = 1
    labels[8:16, :10] = 3
    labels[20:, 20:] = 150
    files = {"t1": write_image(base / "images/training/ADE_train_00000001.jpg", 1)}
    write_png(base / "annotations/training/ADE_train_00000001.png", labels)
    write_image(base / "images/training/ADE_train_00000002.jpg", 2)  # no label map
    write_image(base / "images/training/ADE_train_00000003.jpg", 3)
    write_png(base / "annotations/training/ADE_train_00000003.png", np.zeros((H, W)))  # only "other"
    write_image(base / "images/training/ADE_train_00000004.jpg", 4)
    write_png(base / "annotations/training/ADE_train_00000004.png", np.full((H, W), 200))  # not a class
    files["v1"] = write_image(base / "images/validation/ADE_val_00000001.jpg", 5)
    write_png(base / "annotations/validation/ADE_val_00000001.png", np.full((H, W), 13))
    out = tmp_path / "out"
    assert run_cli("ade20k", "--root", tmp_path / "ade", "--out", out, "--workers", 1) == 0
    train, val = read_split(out, "train"), read_split(out, "val")
    s = train["ade20k-train-ADE_train_00000001"]
    assert s.task == "semantic" and s.image_bytes == files["t1"]
    assert [o.expressions for o in s.objects] == [["[semantic] wall"], ["[semantic] sky"], ["[semantic] flag"]]
    for o, v in zip(s.objects, (1, 3, 150), strict=True):
        np.testing.assert_array_equal(o.mask, (labels == v).astype(np.uint8))
    assert [o.expressions for o in val["ade20k-val-ADE_val_00000001"].objects] == [["[semantic] person"]]
    counts = {k: v["count"] for k, v in report(out)["skipped"].items()}
    assert counts == {"missing_label_map": 1, "no_object": 1, "bad_label_map": 1}
    assert len(ade20k.ADE20K_CLASSES) == 150 == len(set(ade20k.ADE20K_CLASSES))
    # the source's vocabulary (for no-target negatives, docs/no_target.md): every class seen, both splits
    for split in ("train", "val"):
        assert json.loads((out / split / "vocabulary.json").read_text()) == {
            "template": "[semantic] {}", "names": ["flag", "person", "sky", "wall"]}


def test_humanparsing(tmp_path):
    root = tmp_path / "hp"
    labels = np.zeros((H, W), np.uint8)
    labels[:4] = 1        # hat
    labels[4:8] = 4       # upper clothes
    labels[20:, :5] = 9   # right shoe (named from the viewer's side, as the reference)
    labels[20:, 27:] = 10  # left shoe
    labels[10, 10] = 255  # void
    files = {"a": write_image(root / "images/a.jpg", 1)}
    write_png(root / "masks/a.png", labels, palette=True)
    write_image(root / "images/b.jpg", 2, h=H + 2)
    write_png(root / "masks/b.png", labels)  # size mismatch
    write_png(root / "masks/c.png", labels)  # no image
    out = tmp_path / "out"
    assert run_cli("humanparsing", "--root", root, "--out", out, "--workers", 1, "--images", "images",
                   "--masks", "masks") == 0
    s = read_split(out, "train")["humanparsing-train-a"]
    assert s.task == "semantic" and s.image_bytes == files["a"]
    assert [o.expressions[0] for o in s.objects] == [
        "[semantic] background", "[semantic] hat", "[semantic] upper clothes", "[semantic] right shoe",
        "[semantic] left shoe"]
    for o, v in zip(s.objects, (0, 1, 4, 9, 10), strict=True):
        np.testing.assert_array_equal(o.mask, (labels == v).astype(np.uint8))
    counts = {k: v["count"] for k, v in report(out)["skipped"].items()}
    assert counts == {"size_mismatch": 1, "missing_image": 1}


# ---------------------------------------------------------------- jsonl
def test_jsonl(tmp_path):
    root = tmp_path / "custom"
    files = {"a": write_image(root / "imgs/a.jpg", 1), "b": write_image(root / "imgs/b.png", 2, fmt="PNG")}
    write_png(root / "masks/a_dog.png", box(0, 10, 0, 10) * 255)
    lines = [
        {"image": "imgs/a.jpg", "expressions": ["the dog", " the brown dog "], "mask": "masks/a_dog.png",
         "id": "dog"},
        {"image": "imgs/a.jpg", "expression": "the cat", "mask": {"polygon": POLY[0]}, "category": "cat"},
        {"image": "imgs/b.png", "expression": "the car", "mask": {"rle": rle(box(5, 9, 5, 9))}, "split": "val"},
        {"image": "imgs/a.jpg", "expressions": [], "mask": {"polygon": POLY}},
        {"image": "imgs/a.jpg", "expression": "ghost", "mask": "masks/missing.png"},
        {"image": "imgs/missing.jpg", "expression": "nothing", "mask": {"polygon": POLY}},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n\n{not json\n"
    (root / "data.jsonl").write_text(text)
    out = tmp_path / "out"
    assert run_cli("jsonl", "--ann", root / "data.jsonl", "--out", out, "--workers", 1) == 0
    train, val = read_split(out, "train"), read_split(out, "val")
    (s,) = train.values()
    assert s.task == "referring" and s.source == "data" and s.image_bytes == files["a"]
    assert [(o.expressions, o.id, o.category) for o in s.objects] == [
        (["the dog", "the brown dog"], "dog", None), (["the cat"], "line 2", "cat")]
    np.testing.assert_array_equal(s.objects[0].mask, box(0, 10, 0, 10))
    np.testing.assert_array_equal(s.objects[1].mask, decode_segmentation(POLY))
    (v,) = val.values()
    assert v.image_ext == "png" and v.image_bytes == files["b"]
    np.testing.assert_array_equal(v.objects[0].mask, box(5, 9, 5, 9))
    skipped = report(out)["skipped"]
    assert {k: e["count"] for k, e in skipped.items()} == {
        "no_expression": 1, "missing_mask": 1, "missing_image": 1, "bad_annotation": 1}
    assert skipped["bad_annotation"]["examples"] == ["line 8"]
    assert "data.jsonl:5" in skipped["missing_mask"]["first_message"]


# ---------------------------------------------------------------- synthetic
def test_synthetic_is_fast_deterministic_and_well_formed(tmp_path):
    a = synthetic.generate_synthetic(tmp_path / "a", 60, 10, seed=3, shard_size=25)
    assert run_cli("synthetic", "--out", tmp_path / "b", "--train", 60, "--val", 10, "--seed", 3,
                   "--shard-size", 25, "--workers", 2) == 0
    assert a["written"]["samples"] == 70 and a["skipped"] == {}
    for p in sorted((tmp_path / "a").rglob("*.tar")):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()
    train = read_split(tmp_path / "a", "train")
    assert len(train) == 60 and len(read_split(tmp_path / "a", "val")) == 10
    colours = set(synthetic.COLOURS)
    for s in train.values():
        assert s.task == "referring" and s.image_ext == "png" and (s.height, s.width) == (128, 128)
        assert 2 <= len(s.objects) <= 4
        image = s.decode_image()
        names = [o.id.split()[0] for o in s.objects]
        assert len(set(names)) == len(names) and set(names) <= colours  # distinct colours per image
        union = np.zeros((128, 128), np.int32)
        for o, colour in zip(s.objects, names, strict=True):
            assert 2 <= len(o.expressions) <= 4 and all(colour in e for e in o.expressions)
            assert o.mask.any() and set(np.unique(o.mask)) <= {0, 1}
            mean = image[o.mask == 1].mean(axis=0)
            assert np.abs(mean - synthetic.COLOURS[colour]).max() < 6  # the mask covers that colour
            union += o.mask
        assert union.max() == 1  # shapes do not overlap


def test_synthetic_full_grammar_adds_shape_and_position(tmp_path):
    exprs = [e for i in range(40) for o in synthetic.make_sample(0, "train", i, grammar="full").objects
             for e in o.expressions]
    assert any("left" in e or "right" in e or "top" in e or "bottom" in e for e in exprs)
    assert any(e in {f"the {s}" for s in synthetic.SHAPES} for e in exprs)
    colour_only = [e for i in range(40) for o in synthetic.make_sample(0, "train", i).objects for e in o.expressions]
    assert not any(w in e for e in colour_only for w in ("left", "right", "top", "bottom"))
