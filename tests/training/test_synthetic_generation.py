"""The quickstart's synthetic dataset is generated atomically (issue 17): a generation that fails
or is killed leaves no partial `data/synthetic`, and a partial one from before is replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from evfsam_lightning.config import ConfigError, load
from evfsam_lightning.data.stream import expand_urls
from evfsam_lightning.training.synthetic import ensure_synthetic
from tests.training.conftest import QUICKSTART, clean_env

SMALL = ["data.synthetic.train=12", "data.synthetic.val=4"]


def _cfg(folder, *extra):
    return load(QUICKSTART, [f"data.synthetic.dir={folder}", *SMALL, *extra])


def test_a_partial_dataset_is_replaced(tmp_path):
    root = tmp_path / "synthetic"
    (root / "train").mkdir(parents=True)
    (root / "train" / "synthetic-train-000000.tar").write_bytes(b"cut off")  # an interrupted generation
    ensure_synthetic(_cfg(root))
    assert (root / "READY.json").is_file() and (root / "tokenizer" / "sentencepiece.bpe.model").is_file()
    assert len(expand_urls(str(root / "train"))) >= 1
    assert not list(tmp_path.glob(".synthetic.tmp-*"))


def test_a_dataset_with_another_vocabulary_is_regenerated(tmp_path):
    import json

    from evfsam_lightning.data.sources.synthetic import VOCABULARY

    root = tmp_path / "synthetic"
    ensure_synthetic(_cfg(root))
    ready = json.loads((root / "READY.json").read_text())
    # as written before the negatives took every colour form: one template
    (root / "train" / "vocabulary.json").write_text(json.dumps({"template": "the {} shape", "names": ["red"]}))
    (root / "READY.json").write_text(json.dumps({k: v for k, v in ready.items() if k != "vocabulary"}))
    ensure_synthetic(_cfg(root))
    assert json.loads((root / "train" / "vocabulary.json").read_text()) == VOCABULARY
    assert json.loads((root / "READY.json").read_text()) == ready


def test_a_folder_with_other_files_is_not_deleted(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not a synthetic dataset"):
        ensure_synthetic(_cfg(root))
    assert (root / "thesis.tex").read_text() == "precious"


@pytest.mark.slow
def test_a_killed_generation_leaves_nothing_and_the_next_run_generates(tmp_path):
    root = tmp_path / "synthetic"
    code = ("import sys; from evfsam_lightning.config import load; from evfsam_lightning.training.synthetic import "
            f"ensure_synthetic; ensure_synthetic(load({str(QUICKSTART)!r}, [{f'data.synthetic.dir={root}'!r}, "
            "'data.synthetic.train=3000', 'data.synthetic.val=4']))")
    job = subprocess.Popen([sys.executable, "-c", code], env=clean_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob(".synthetic.tmp-*/train/*.tar*")) and time.monotonic() < deadline:
            assert job.poll() is None, "the generation ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not root.exists(), "a killed generation left a partial dataset in place"
    ensure_synthetic(_cfg(root))
    assert (root / "READY.json").is_file()
    assert not list(tmp_path.glob(".synthetic.tmp-*")), "the killed generation's temporary folder stayed"
