"""tools/bench_data.py runs end to end (tiny sizes; the figures themselves go to BENCHMARKS.md)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.training.conftest import clean_env


# `device` only: the tool passes --sam-resize through to the DataModule (data.sam_resize), whose two
# places are compared batch for batch in tests/data/test_pillow_resize.py; one run shows the tool works.
@pytest.mark.parametrize("resize", ["device"])
def test_bench_data_compares_the_stream_with_the_per_file_reader(tmp_path, resize):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_data.py"), "--images", "12", "--batches", "3",
         "--batch-size", "2", "--workers", "0", "--image-size", "128", "--repeats", "1", "--finish", "cpu",
         "--sam-resize", resize, "--work", str(tmp_path / "work")],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stream resize: {resize}" in result.stdout
    assert re.search(r"stream / files per round: [0-9.]+ \(median [0-9.]+\)", result.stdout), result.stdout
