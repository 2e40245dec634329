"""Every distributed strategy end to end on 2 CPU ranks (gloo): train with complete checkpoints,
resume with the same command and more steps, consolidate, load without the strategy, export.

The commands run as subprocesses (Lightning's launcher re-executes its command line), each with its
own MASTER_PORT and without the rank variables of any earlier run. A run resumed at step 6 must
reproduce an uninterrupted run of the same strategy bit for bit (each strategy against itself:
their reductions add in different orders, so strategies differ from each other, but a resume must
change nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.training.conftest import finish_process, free_port, start_process

RECIPE = REPO / "recipes" / "quickstart.yaml"
COMMON = [
    "name=run", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4", "trainer.val_every_n_steps=3", "trainer.log_every_n_steps=3",
    "checkpoint.every_n_steps=3", "data.synthetic.train=64", "data.synthetic.val=16", "data.num_workers=0",
    "optim.schedule=constant", "optim.warmup_steps=0", "logging.progress_bar=false", "logging.tensorboard=false",
]
STRATEGIES = {
    "ddp": ["strategy.name=ddp"],
    "deepspeed2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "deepspeed3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
    "fsdp": ["strategy.name=fsdp"],
}
#: What every rank's part of a checkpoint looks like on disk.
LAYOUT = {
    "ddp": [],  # a single file
    "deepspeed2": ["latest", "checkpoint/mp_rank_00_model_states.pt",
                   "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                   "checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    "deepspeed3": ["latest", "checkpoint/zero_pp_rank_0_mp_rank_00_model_states.pt",
                   "checkpoint/zero_pp_rank_1_mp_rank_00_model_states.pt",
                   "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                   "checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    "fsdp": [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"],
}
FIRST, LAST = 6, 9  # step 6 is mid-epoch (8 batches per rank and epoch), step 9 in the second epoch


def _env() -> dict[str, str]:
    drop = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
            "MASTER_PORT", "PL_TRAINER_GPUS", "PL_GLOBAL_SEED")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
    return env


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return start_process([sys.executable, "-m", *args], cwd, _env())


def _finish(job: subprocess.Popen, timeout: int = 300) -> str:
    t0 = time.perf_counter()
    stdout = finish_process(job, timeout).stdout
    args = job.args[2:]
    print(f"{time.perf_counter() - t0:5.1f} s  {' '.join(args[:2])} {' '.join(a for a in args if 'strategy' in a)}")
    return stdout


def _run(args: list[str], cwd: Path, timeout: int = 300) -> str:
    return _finish(_start(args, cwd), timeout)


def _start_training(root: Path, strategy: str, steps: int, synthetic: Path) -> subprocess.Popen:
    return _start(["evfsam_lightning.cli.train", str(RECIPE), f"root_dir={root}", f"data.synthetic.dir={synthetic}",
                   f"trainer.max_steps={steps}", *COMMON, *STRATEGIES[strategy]], cwd=root.parent)


def _train(root: Path, strategy: str, steps: int, synthetic: Path) -> str:
    return _finish(_start_training(root, strategy, steps, synthetic))


def _model_weights(state_dict: dict) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in state_dict.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """The synthetic dataset and tokenizer, generated once for every run of this file."""
    from evfsam_lightning.config import load
    from evfsam_lightning.training.synthetic import ensure_synthetic

    folder = tmp_path_factory.mktemp("synthetic") / "data"
    ensure_synthetic(load(RECIPE, [*COMMON, f"data.synthetic.dir={folder}"]))
    return folder


def _final_weights(run_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The weights of `step-LAST` of a run, consolidated when sharded."""
    from evfsam_lightning.training.loading import consolidate, is_sharded

    ckpt = run_dir / "checkpoints" / f"step-{LAST:08d}.ckpt"
    if is_sharded(ckpt):
        ckpt = consolidate(ckpt, tmp / "uninterrupted.ckpt")
    return _model_weights(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])


def _checkpoints(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.name.endswith(".ckpt")}


def _assert_complete(folder: Path, strategy: str, step: int) -> Path:
    """`step-<step>.ckpt` is complete, has this strategy's layout and is what resume would pick."""
    from evfsam_lightning.training.callbacks import find_resume_checkpoint, is_complete, marker_of

    ckpt = folder / f"step-{step:08d}.ckpt"
    assert is_complete(ckpt), sorted(p.name for p in folder.iterdir())
    assert json.loads(marker_of(ckpt).read_text())["step"] == step
    for name, path in _checkpoints(folder).items():
        assert is_complete(path), f"{name} has no marker"
        assert path.is_file() == (strategy == "ddp")
        # DeepSpeed's bf16 optimizer names its optimizer-state files bf16_zero_pp_rank_*
        missing = [f for f in LAYOUT[strategy]
                   if not (path / f).is_file() and not (path / f.replace('/zero_pp', '/bf16_zero_pp')).is_file()]
        assert not missing, f"{name} lacks {missing}: {sorted(str(p.relative_to(path)) for p in path.rglob('*'))}"
    pointer = json.loads((folder / "last.json").read_text())
    assert pointer["step"] == step and is_complete(folder / pointer["checkpoint"])
    found = find_resume_checkpoint(folder)
    assert found is not None and json.loads(marker_of(found).read_text())["step"] == step
    return ckpt


def strategy_key(cfg) -> str:
    """A run config's strategy as named in STRATEGIES / LAYOUT (2 CPU ranks: "auto" is DDP)."""
    if cfg.strategy.name == "deepspeed":
        return f"deepspeed{cfg.strategy.zero_stage}"
    return "ddp" if cfg.strategy.name == "auto" else cfg.strategy.name


def _in_recipes() -> set[str]:
    from evfsam_lightning.config import load

    return {strategy_key(load(recipe)) for recipe in (REPO / "recipes").glob("*.yaml")}


#: A strategy that some recipe uses goes through the same checks (resume by the same command,
#: bit-identical to an uninterrupted run, layout of every part, export from the sharded checkpoint)
#: in tests/training/test_recipe_matrix.py with that recipe's settings; this file runs the others,
#: so that every strategy is tested end to end exactly once.
NOT_IN_RECIPES = [s for s in STRATEGIES if s not in _in_recipes()]


def test_every_strategy_is_run_end_to_end_by_the_matrix_or_here():
    assert set(NOT_IN_RECIPES) | _in_recipes() >= set(STRATEGIES)
    assert _in_recipes() <= set(STRATEGIES), f"a recipe uses a strategy this file does not know: {_in_recipes()}"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", NOT_IN_RECIPES)
def test_train_resume_consolidate_export(strategy, synthetic, tmp_path):
    from evfsam_lightning.training.loading import is_sharded, load_for_inference

    started = time.perf_counter()
    root = tmp_path / "runs"
    folder = root / "run" / "checkpoints"

    # The same strategy without interruption, beside the interrupted runs (own folder and port).
    (tmp_path / "uninterrupted").mkdir()
    uninterrupted_job = _start_training(tmp_path / "uninterrupted" / "runs", strategy, LAST, synthetic)
    out = _train(root, strategy, FIRST, synthetic)
    assert "starting from scratch" in out
    _assert_complete(folder, strategy, FIRST)

    # The same command with more steps resumes from the newest complete checkpoint.
    out = _train(root, strategy, LAST, synthetic)
    assert "resuming from" in out and f"{FIRST:08d}" in out.split("resuming from", 1)[1].splitlines()[0]
    final = _assert_complete(folder, strategy, LAST)
    assert is_sharded(final) == {"ddp": None, "fsdp": "fsdp"}.get(strategy, "deepspeed")

    # One file loadable without the strategy (the DDP checkpoint already is one).
    full = final
    if strategy != "ddp":
        full = tmp_path / "full.ckpt"
        _run(["evfsam_lightning.cli.export", "--checkpoint", str(final), "--consolidate-only", "--out", str(full)],
             cwd=tmp_path)
    ckpt = torch.load(full, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == LAST
    assert ckpt["hyper_parameters"]["config"]["strategy"]["name"] == STRATEGIES[strategy][0].split("=")[1]
    assert ckpt["tokenizer_files"] and "rng" in ckpt
    if strategy != "ddp":  # consolidated: weights only
        assert not [k for k in ckpt if k.startswith("optimizer")]
    weights = _model_weights(ckpt["state_dict"])
    # The same strategy without interruption: bit for bit.
    _finish(uninterrupted_job)
    uninterrupted = _final_weights(tmp_path / "uninterrupted" / "runs" / "run", tmp_path)
    assert weights.keys() == uninterrupted.keys()
    differ = [k for k in weights if not torch.equal(weights[k], uninterrupted[k])]
    assert not differ, f"{strategy}: {len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"

    model, tokenizer = load_for_inference(full)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k[len("model."):]], v) for k, v in weights.items())
    assert tokenizer("the red circle")["input_ids"]

    # Export straight from the checkpoint as training wrote it (sharded ones are consolidated on the way).
    exported = tmp_path / "exported"
    _run(["evfsam_lightning.cli.export", "--checkpoint", str(final), "--out", str(exported)], cwd=tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in exported.iterdir()}
    again, _ = load_for_inference(exported)
    assert all(torch.equal(t, loaded[k]) for k, t in again.state_dict().items())
    print(f"{strategy}: {time.perf_counter() - started:.0f} s")

