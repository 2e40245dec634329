"""tools/bench_train.py: its FLOP count follows the training modes, and a short A/B run reports."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "tools" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flops(bench, mode: str, **extra) -> int:
    args = bench.argparse.Namespace(size="tiny", mode=mode, activation_checkpointing=False, compile=False, precision="32",
                                    micro_batch=2, expressions_per_image=2, text_length=8, original_hw=None,
                                    steps=1, warmup=0, seed=0, **extra)
    cfg = bench.run_config(args)
    return bench.count_flops(args, cfg, bench.make_batches(args, "cpu", n=1)[0])


def test_flop_count_follows_the_trainable_set(bench):
    frozen, full, cached = (_flops(bench, m) for m in ("frozen", "full", "cached"))
    # full mode adds the encoder's backward (about twice its forward); the cache removes its forward
    assert cached < frozen < full
    encoder_forward = frozen - cached
    assert full - frozen == pytest.approx(2 * encoder_forward, rel=0.05)


def test_short_run_reports_throughput_mfu_memory_and_overhead(bench, tmp_path):
    out = tmp_path / "result.json"
    bench.main(["--micro-batch", "2", "--steps", "2", "--warmup", "1", "--repeats", "1", "--compare-plain",
                "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["samples_per_s"] > 0 and 0 < result["mfu"] and result["peak_memory_gib"] > 0
    assert len(result["step_s"][0]["cpu"]) == 2 and "lightning_overhead" in result
