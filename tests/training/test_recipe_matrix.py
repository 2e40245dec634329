"""Every recipe in recipes/ as users run it, on 2 CPU ranks: train, preempt by SIGUSR1 in the middle
of an accumulation window, resume with the same command, finish; the final weights equal those of an
uninterrupted run with the same settings bit for bit. Then consolidate, export, evaluate and predict.

Each recipe keeps its own precision, strategy, ZeRO stage, offload, mode, `save_frozen`, accumulation
ratio (global / (micro x ranks)), LoRA and embedding-cache settings, and its relative paths: the run
happens in a folder laid out as the recipe expects (`checkpoints/...` pretrained files in their
released formats, written from a seeded tiny model; `data/shards/<source>/{train,val}` holding the
synthetic shards under every source name, weights unchanged). Changed: model dims (tiny), data,
device (CPU, 2 ranks), length (4 steps at micro-batch 1), loader workers (0 on 2 cores), logging.
New recipes join by being in recipes/.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evfsam_lightning.config import load
from evfsam_lightning.training.signals import EXIT_PREEMPTED
from tests.conftest import REPO
from tests.training.conftest import clean_env, finish_process, start_process, synthetic_dir  # noqa: F401
from tests.training.test_strategies import _assert_complete, strategy_key

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
STEPS, RANKS, MICRO = 4, 2, 1


def _tiny_size(size: str) -> str:
    return "tiny-sam2" if "sam2" in size else "tiny"


def _write_pretrained(folder: Path, cfg, tokenizer: Path) -> None:
    """The recipe's pretrained files in their released formats, from one seeded tiny model."""
    from evfsam_lightning.models.builders import build_model
    from evfsam_lightning.models.checkpoints import export_reference, to_reference

    m = cfg.model
    torch.manual_seed(11)
    model = build_model(_tiny_size(m.size))
    for p in model.parameters():  # not the init: a file whose values a resume could not guess
        p.data.add_(torch.randn_like(p) * 0.01)
    state = to_reference(model, model.state_dict())
    if m.pretrained:
        export_reference(model, folder / m.pretrained, tokenizer_dir=tokenizer)
    if m.sam_checkpoint:
        sam = {k[len("visual_model."):]: v for k, v in state.items() if k.startswith("visual_model.")}
        path = folder / m.sam_checkpoint
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": sam} if model.visual_model.family == "sam2" else sam, path)
    if m.beit3_checkpoint:
        path = folder / m.beit3_checkpoint
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": {k[len("mm_extractor."):]: v for k, v in state.items()
                              if k.startswith("mm_extractor.")}}, path)
    if m.tokenizer:
        target = folder / m.tokenizer
        target.mkdir(parents=True, exist_ok=True)
        for f in tokenizer.iterdir():
            (target / f.name).write_bytes(f.read_bytes())


def _layout(folder: Path, cfg, synthetic: Path) -> None:
    """Every shard folder the recipe names, holding the synthetic shards (train or val)."""
    for sources, split in ((cfg.data.train, "train"), (cfg.data.val, "val")):
        for src in sources:
            for url in src.urls:
                path = folder / url
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.symlink_to(synthetic / split, target_is_directory=True)


def _overrides(cfg, synthetic: Path) -> list[str]:
    accumulate = cfg.accumulate_grad_batches
    out = ["trainer.accelerator=cpu", f"trainer.devices={RANKS}", "trainer.num_nodes=1",
           f"trainer.micro_batch_size={MICRO}", f"trainer.global_batch_size={MICRO * RANKS * accumulate}",
           f"trainer.max_steps={STEPS}", "trainer.max_epochs=0", "trainer.val_every_n_epochs=0",
           "trainer.val_every_n_steps=0", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
           "data.num_workers=0", "data.samples_per_epoch=0", "data.val_batch_size=2",
           "checkpoint.every_n_steps=100", "logging.tensorboard=false", "logging.progress_bar=false",
           "logging.val_images=0"]
    if cfg.model.size not in ("auto", "custom"):
        out.append(f"model.size={_tiny_size(cfg.model.size)}")
    if cfg.data.synthetic is not None:
        out += [f"data.synthetic.dir={synthetic}", "data.synthetic.train=96", "data.synthetic.val=16"]
    return out


def _start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return start_process([sys.executable, "-m", *args], cwd, {**clean_env(), "OMP_NUM_THREADS": "1", **(env or {})})


def _run(args: list[str], cwd: Path, env: dict | None = None, ok=(0,), timeout: int = 600):
    return finish_process(_start(args, cwd, env), timeout, ok)


def _final_weights(run_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from evfsam_lightning.training.loading import consolidate, is_sharded

    ckpt = run_dir / "checkpoints" / f"step-{STEPS:08d}.ckpt"
    if is_sharded(ckpt):
        ckpt = consolidate(ckpt, tmp / f"{run_dir.name}.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == STEPS
    return {k: v for k, v in state["state_dict"].items() if k.startswith("model.")}


def _frozen_weights(cfg) -> dict[str, torch.Tensor]:
    """The frozen weights of the recipe's model as its fp32 pretrained files hold them."""
    from evfsam_lightning.models.from_config import build_configured_model
    from evfsam_lightning.training.trainable import apply_trainable

    model = build_configured_model(cfg)
    m = cfg.model
    frozen = apply_trainable(model, model.config.family, m.mode, m.freeze, m.unfreeze, lora=m.lora.rank > 0)["frozen"]
    state = model.state_dict()
    return {name: state[name] for name in frozen}


def _serve(args: list[str], world: Path) -> None:
    """A CLI's `main` in this process (same code as the console script, without another ~9 s interpreter
    start): the run's export, evaluation and prediction."""
    import importlib

    module, *argv = args
    with contextlib.chdir(world):
        assert importlib.import_module(module).main(argv) == 0, " ".join(args)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_trains_preempts_resumes_and_serves(recipe, synthetic_dir, tmp_path):  # noqa: F811
    cfg = load(recipe)
    world = tmp_path / "world"
    world.mkdir()
    _write_pretrained(world, cfg, synthetic_dir / "tokenizer")
    _layout(world, cfg, synthetic_dir)
    base = [str(recipe), *_overrides(cfg, synthetic_dir)]
    # What runs is the recipe's own setting, not a simplification of it.
    tiny = load(recipe, base[1:])
    for key in ("precision",):
        assert getattr(tiny.trainer, key) == getattr(cfg.trainer, key)
    assert (tiny.strategy, tiny.model.mode, tiny.model.lora, tiny.checkpoint.save_frozen, tiny.data.embedding_cache,
            tiny.accumulate_grad_batches) == (cfg.strategy, cfg.model.mode, cfg.model.lora, cfg.checkpoint.save_frozen,
                                              cfg.data.embedding_cache, cfg.accumulate_grad_batches)
    accumulate = cfg.accumulate_grad_batches
    if cfg.data.embedding_cache:
        _run(["evfsam_lightning.cli.cache", *base, "--out", cfg.data.embedding_cache, "--device", "cpu"], world)

    # Uninterrupted reference, and beside it (its own folder and port; the two overlap their
    # interpreter starts) the same command preempted mid-window, then run again.
    reference_job = _start(["tests.training.preempt_job", *base, "root_dir=reference"], world)
    # Mid-window of step 3 (micro-batches 2A..3A-1, the signal after one of them, not the last);
    # with no accumulation (A=1, quickstart) a window has one micro-batch: the signal comes after
    # step 2 and the save at the end of step 3.
    try:
        at = 2 * accumulate + accumulate // 2 - 1 if accumulate > 1 else 1
        first = _run(["tests.training.preempt_job", *base, "root_dir=runs"], world,
                     env={"EVFSAM_TEST_PREEMPT_AT": str(at)}, ok=(EXIT_PREEMPTED,))
        assert "preempted: saved" in first.stdout, first.stdout[-2000:]
        second = _run(["tests.training.preempt_job", *base, "root_dir=runs"], world)
        finish_process(reference_job, timeout=600)
    finally:
        if reference_job.poll() is None:  # a failed assertion above
            reference_job.kill()
    assert "resuming from" in second.stdout
    run_dir = world / "runs" / cfg.name
    reference = _final_weights(world / "reference" / cfg.name, tmp_path)
    resumed = _final_weights(run_dir, tmp_path)
    assert reference.keys() == resumed.keys()
    differ = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"

    final = run_dir / "checkpoints" / f"step-{STEPS:08d}.ckpt"
    _assert_complete(final.parent, strategy_key(cfg), STEPS)  # the strategy's own layout, every part marked
    if not cfg.checkpoint.save_frozen:
        from evfsam_lightning.training.loading import load_for_inference
        from tests.training.test_dtypes import _saved_keys

        with contextlib.chdir(world):  # the recipe's relative paths
            frozen = _frozen_weights(tiny)
            loaded = load_for_inference(final)[0].state_dict()
        # As the strategy wrote it: no frozen weight on disk; loading takes them from the fp32
        # pretrained files bit for bit, never from a lower-precision copy.
        assert frozen and not {f"model.{n}" for n in frozen} & _saved_keys(final)
        for name, weight in frozen.items():
            assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], weight), name

    # Consolidate, export, evaluate and predict from the result.
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(image).save(world / "image.png")
    _serve(["evfsam_lightning.cli.export", "--checkpoint", str(final), "--out", "exported"], world)
    _serve(["evfsam_lightning.cli.evaluate", "--checkpoint", "exported", "--data", f"val={synthetic_dir / 'val'}",
            "--accelerator", "cpu", "--workers", "0", "--out", "eval.json"], world)
    _serve(["evfsam_lightning.cli.predict", "--checkpoint", "exported", "--image", "image.png", "--text",
            "the red circle", "--out", "mask.png", "--device", "cpu"], world)
    assert (world / "mask.png").is_file() and (world / "eval.json").is_file()
