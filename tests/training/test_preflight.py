"""Fail fast: every file a run needs is checked before the model is built, naming key and path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evfsam_lightning.config import ConfigError, load
from evfsam_lightning.data.tokenizer import build_tokenizer
from evfsam_lightning.training.preflight import preflight
from tests.conftest import REPO, TINY_SENTENCES
from tests.training.conftest import clean_env


def _shards(folder: Path, task: str = "referring", sizes: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "x-000000.tar").write_bytes(b"")
    if sizes:
        (folder / "sizes.json").write_text(json.dumps({"shards": {"x-000000.tar": 1}, "total": 1, "task": task}))
    return folder


def _cfg(tmp_path: Path, tokenizer: Path, *overrides: str):
    train = tmp_path / "train" if (tmp_path / "train").exists() else _shards(tmp_path / "train")
    return load(None, [
        "model.size=tiny", f"model.tokenizer={tokenizer}",
        f"data.train=[{{name: refs, urls: [{train}]}}]", *overrides])


@pytest.fixture(scope="module")
def no_semantic_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer without `[semantic]` as a token of its own (it splits into pieces)."""
    return build_tokenizer(TINY_SENTENCES * 5, tmp_path_factory.mktemp("plain_tokenizer"), vocab_size=64)


def test_a_complete_run_passes(tmp_path, tiny_tokenizer_dir):
    preflight(_cfg(tmp_path, tiny_tokenizer_dir))


@pytest.mark.parametrize("key,override,expected", [
    ("model.sam_checkpoint", "model.sam_checkpoint={tmp}/nope/sam_vit_h_4b8939.pth", "nope/sam_vit_h_4b8939.pth not found"),
    ("model.beit3_checkpoint", "model.beit3_checkpoint={tmp}/beit3_large.pth", "beit3_large.pth not found"),
    ("model.pretrained", "model.pretrained={tmp}", "missing config.json"),
    ("model.tokenizer", "model.tokenizer={tmp}/no_tokenizer", "no_tokenizer not found"),
    ("model.tokenizer", "model.tokenizer={tmp}/train", "train/sentencepiece.bpe.model not found"),
    ("data.val[0] (v)", "data.val=[{{name: v, urls: [{tmp}/val]}}]", "val not found"),
    ("data.val[0] (v)", "data.val=[{{name: v, urls: ['{tmp}/val-{{000..001}}.tar']}}]", "val-000.tar not found"),
    ("data.val[0] (v)", "data.val=[{{name: v, urls: ['{tmp}/val/*.tar']}}]", "matches no shard"),
])
def test_each_missing_path_is_named_with_its_key(tmp_path, tiny_tokenizer_dir, key, override, expected):
    cfg = _cfg(tmp_path, tiny_tokenizer_dir, override.format(tmp=tmp_path))
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    message = str(e.value)
    assert message.startswith(f"{key}: ") and expected in message, message
    assert "\n" not in message


def test_a_shard_folder_needs_its_tars_and_sizes_json(tmp_path, tiny_tokenizer_dir):
    _shards(tmp_path / "train", sizes=False)
    with pytest.raises(ConfigError, match=r"^data.train\[0\] \(refs\): .*train/sizes.json not found"):
        preflight(_cfg(tmp_path, tiny_tokenizer_dir))
    (tmp_path / "train" / "sizes.json").write_text(json.dumps({"x-000000.tar": 1}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^data.val\[0\] \(v\): .*empty holds no \*.tar shard"):
        preflight(_cfg(tmp_path, tiny_tokenizer_dir, f"data.val=[{{name: v, urls: [{tmp_path / 'empty'}]}}]"))


def test_every_missing_path_is_listed_after_the_first(tmp_path, tiny_tokenizer_dir):
    cfg = _cfg(tmp_path, tiny_tokenizer_dir, f"model.sam_checkpoint={tmp_path}/sam.pth",
               f"model.beit3_checkpoint={tmp_path}/beit3.pth")
    with pytest.raises(ConfigError, match=r"^model.sam_checkpoint: .*\(also missing: model.beit3_checkpoint\)$"):
        preflight(cfg)


def test_semantic_data_need_the_semantic_token(tmp_path, tiny_tokenizer_dir, no_semantic_tokenizer):
    _shards(tmp_path / "parts", task=["part", "referring"])
    semantic = f"data.val=[{{name: parts, urls: [{tmp_path / 'parts'}]}}]"
    # Referring data only: a tokenizer without [semantic] is fine.
    preflight(_cfg(tmp_path, no_semantic_tokenizer))
    with pytest.raises(ConfigError, match=r"^model.tokenizer: .* splits \[semantic\] into \d+ tokens.*'parts'"):
        preflight(_cfg(tmp_path, no_semantic_tokenizer, semantic))
    preflight(_cfg(tmp_path, tiny_tokenizer_dir, semantic))  # a single token inside the tiny vocabulary
    # The released vocabulary (64010 rows): [semantic] must be the id the published weights learnt.
    with pytest.raises(ConfigError, match=r"maps \[semantic\] to id \d+, the released weights learnt it as 64002"):
        preflight(_cfg(tmp_path, tiny_tokenizer_dir, semantic, "model.size=evf-sam"))


@pytest.mark.slow
def test_the_refcoco_recipe_in_an_empty_folder_exits_2_naming_the_first_missing_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "evfsam_lightning.cli.train", str(REPO / "recipes" / "evfsam_refcoco.yaml")],
                            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("evfsam-train: ") and "model.sam_checkpoint: checkpoints/sam_vit_h_4b8939.pth not found" \
        in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing was built or written
