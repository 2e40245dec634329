"""Hugging Face Hub ids (`org/name[@revision]`) wherever a checkpoint folder is accepted, resolved by
huggingface_hub's own cache logic from a cache laid out by hand (no network: HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evfsam_lightning.hub import parse_hub_id, resolve
from evfsam_lightning.models.builders import build_model
from evfsam_lightning.models.checkpoints import export_reference

REPO = Path(__file__).resolve().parents[1]
MAIN_REV = "a" * 40
OTHER_REV = "b" * 40


def _hub_cache(root: Path, tokenizer_dir: Path) -> Path:
    """HF_HOME with `models--org--evf-tiny`: two snapshots of differently initialised exports,
    `refs/main` pointing at the first (the layout huggingface_hub writes)."""
    repo = root / "hub" / "models--org--evf-tiny"
    for seed, rev in ((0, MAIN_REV), (1, OTHER_REV)):
        torch.manual_seed(seed)
        export_reference(build_model("tiny"), repo / "snapshots" / rev, tokenizer_dir=tokenizer_dir)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN_REV)
    return root


def _predict(cwd: Path, hf_home: Path, checkpoint: str, out: str) -> subprocess.CompletedProcess:
    image = cwd / "image.png"
    if not image.is_file():
        from PIL import Image

        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "evfsam_lightning.cli.predict", "--checkpoint", checkpoint,
                           "--image", str(image), "--text", "the red circle", "--out", f"{out}.png",
                           "--logits", f"{out}.npy"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_parse_hub_id():
    assert parse_hub_id("YxZhang/evf-sam") == ("YxZhang/evf-sam", None)
    assert parse_hub_id("YxZhang/evf-sam2@main") == ("YxZhang/evf-sam2", "main")
    assert parse_hub_id(f"org/name@{OTHER_REV}") == ("org/name", OTHER_REV)
    for not_an_id in ("/abs/folder", "runs/x/checkpoints/step-00000010.ckpt", "one", "a/b/c", "./a/b"):
        assert parse_hub_id(not_an_id) is None, not_an_id


@pytest.mark.slow
def test_predict_resolves_hub_ids_offline(tmp_path, tiny_tokenizer_dir):
    hf_home = _hub_cache(tmp_path / "hf", tiny_tokenizer_dir)
    work = tmp_path / "work"
    work.mkdir()
    main = _predict(work, hf_home, "org/evf-tiny", "main")
    assert main.returncode == 0, main.stderr[-3000:]
    other = _predict(work, hf_home, f"org/evf-tiny@{OTHER_REV}", "other")
    assert other.returncode == 0, other.stderr[-3000:]
    main_logits, other_logits = np.load(work / "main.npy"), np.load(work / "other.npy")
    # Each id served its own snapshot: the logits are those of that snapshot loaded by path.
    from PIL import Image

    from evfsam_lightning.training.loading import load_for_inference

    image = np.asarray(Image.open(work / "image.png").convert("RGB"))
    for logits, rev in ((main_logits, MAIN_REV), (other_logits, OTHER_REV)):
        model, tokenizer = load_for_inference(hf_home / "hub" / "models--org--evf-tiny" / "snapshots" / rev)
        np.testing.assert_allclose(logits, model.predict(image, "the red circle", tokenizer).float().numpy(),
                                   atol=1e-5)
    assert not np.allclose(main_logits, other_logits)

    missing = _predict(work, hf_home, "org/not-cached", "x")
    assert missing.returncode == 2, missing.stderr[-3000:]
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "org/not-cached" in lines[0] and "HF_HUB_OFFLINE" in lines[0], missing.stderr
    assert "Traceback" not in missing.stderr


def test_local_folder_of_the_same_name_wins(tmp_path, monkeypatch, tiny_tokenizer_dir):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    export_reference(build_model("tiny"), tmp_path / "org" / "evf-tiny", tokenizer_dir=tiny_tokenizer_dir)
    assert resolve("org/evf-tiny") == Path("org/evf-tiny")  # never looked up on the Hub


@pytest.mark.slow
def test_model_pretrained_takes_a_hub_id(tmp_path, tiny_tokenizer_dir):
    hf_home = _hub_cache(tmp_path / "hf", tiny_tokenizer_dir)
    code = ("from evfsam_lightning.config import load; from evfsam_lightning.training.run import resolve_pretrained; "
            f"m = resolve_pretrained(load({str(REPO / 'recipes' / 'quickstart.yaml')!r}, "
            "['model.pretrained=org/evf-tiny', 'model.size=auto'])).model; print(m.pretrained); print(m.size)")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pretrained, size = result.stdout.split()[-2:]
    assert Path(pretrained) == hf_home / "hub" / "models--org--evf-tiny" / "snapshots" / MAIN_REV
    assert size == "custom"


def test_model_card_carries_the_hub_metadata_and_the_runs_evaluations(tmp_path):
    """The card of an export from a run: license, library_name, pipeline_tag, base_model (the Hub id
    behind model.pretrained's cache folder), datasets, and model-index from the run's evfsam-eval
    JSON files (not the text-blind control) and the best checkpoint's validation cIoU; it loads back
    with huggingface_hub's ModelCard and metadata_load."""
    import json

    from huggingface_hub import ModelCard, metadata_load

    from evfsam_lightning.config import load, to_yaml
    from evfsam_lightning.hub import model_card

    run = tmp_path / "runs" / "mine"
    (run / "checkpoints").mkdir(parents=True)
    snapshot = tmp_path / "hf" / "hub" / "models--YxZhang--evf-sam" / "snapshots" / MAIN_REV
    cfg = load(REPO / "recipes" / "quickstart.yaml", [f"model.pretrained={snapshot}", "name=mine"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    ckpt = run / "checkpoints" / "best-step00000500-ciou0.8123.ckpt"
    ckpt.write_bytes(b"")
    (run / "eval").mkdir()
    result = {"checkpoint": str(ckpt), "shuffled_expressions": False, "all": {"giou": 0.8, "ciou": 0.81},
              "splits": {"refcoco_val": {"giou": 0.7512, "ciou": 0.7344, "expressions": 10}}}
    (run / "eval" / "refcoco.json").write_text(json.dumps(result))
    control = {**result, "shuffled_expressions": True, "splits": {"blind": {"giou": 0.1, "ciou": 0.1}}}
    (run / "eval" / "shuffled.json").write_text(json.dumps(control))

    after = {**result, "splits": {"mine_val": {"giou": 0.5, "ciou": 0.25, "expressions": 3}}}
    (tmp_path / "after.json").write_text(json.dumps(after))  # outside the run: given with --results
    path = tmp_path / "README.md"
    model_card(ckpt, "evf-sam-mine", results=[tmp_path / "after.json"]).save(str(path))
    meta = metadata_load(path)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "evfsam-lightning"
    assert meta["pipeline_tag"] == "image-segmentation" and meta["base_model"] == "YxZhang/evf-sam"
    assert meta["datasets"] == ["synthetic"]
    card = ModelCard.load(path)
    found = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert found == {("refcoco_val", "giou"): 75.12, ("refcoco_val", "ciou"): 73.44, ("synthetic", "ciou"): 81.23,
                     ("mine_val", "giou"): 50.0, ("mine_val", "ciou"): 25.0}
    assert all(r.task_type == "image-segmentation" for r in card.data.eval_results)
    assert "| refcoco_val | gIoU | 75.12 |" in card.text

    bare = model_card(tmp_path / "nowhere.ckpt", "plain")  # outside a run: metadata, no model-index
    assert bare.data.eval_results is None and bare.data.base_model is None
    assert bare.data.pipeline_tag == "image-segmentation"


def test_push_to_hub_dry_run_lists_and_a_failed_upload_is_one_line(tmp_path):
    from evfsam_lightning.config import ConfigError
    from evfsam_lightning.hub import push_folder

    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert push_folder(folder, "me/evf", dry_run=True) == ["README.md (28 bytes)", "config.json (2 bytes)"]
    with pytest.raises(ConfigError, match="expected a Hub repository id"):
        push_folder(folder, "not a repo", dry_run=True)
    from evfsam_lightning.cli.export import main as export

    # refused before the checkpoint is even looked at
    assert export(["--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "x"),
                   "--push-to-hub", "me/x@v1"]) == 2
    code = ("from evfsam_lightning.config import ConfigError\nfrom evfsam_lightning.hub import push_folder\n"
            f"try:\n    push_folder({str(folder)!r}, 'me/evf')\nexcept ConfigError as e:\n    print(e)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("--push-to-hub me/evf: "), out.stdout + out.stderr[-2000:]
    assert "the export in" in out.stdout and len(out.stdout.strip().splitlines()) == 1
