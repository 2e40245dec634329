"""Resume on another number of ranks: refused naming `checkpoint.reset_data_position`, and with it
the run keeps weights, optimizer, scheduler and step and finishes (2 ranks -> 1 and 1 -> 2, the
accumulation changing with the layout). Rank 0 chooses the checkpoint every rank resumes from."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evfsam_lightning.training.callbacks import find_resume_checkpoint
from tests.training.conftest import clean_env, run_training, small_run, synthetic_dir, train_command  # noqa: F401

RESUMING_WARNING = "dataloader is not resumable"


def _layout(ranks: int) -> tuple[str, ...]:
    # global batch 4 = micro 2 x ranks x accumulation: 2 ranks accumulate 1, 1 rank accumulates 2
    return (f"trainer.devices={ranks}", "trainer.micro_batch_size=2", "data.num_workers=0")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_world_size_needs_the_option_and_keeps_the_training_state(
        tmp_path, synthetic_dir, before, after):  # noqa: F811
    common = small_run(synthetic_dir, "trainer.global_batch_size=4", "checkpoint.every_n_steps=2",
                       "checkpoint.keep_top_k=0", "logging.tensorboard=false", "optim.warmup_steps=2")
    first = run_training(tmp_path, *common, *_layout(before), "trainer.max_steps=3", timeout=900)
    assert RESUMING_WARNING not in first.stderr
    ckpt_dir = tmp_path / "runs" / "quickstart" / "checkpoints"
    saved = find_resume_checkpoint(ckpt_dir)
    assert saved.name == "step-00000003.ckpt"

    refused = subprocess.run(train_command(*common, *_layout(after), "trainer.max_steps=6"), cwd=tmp_path,
                             env=clean_env(), capture_output=True, text=True, timeout=900)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-3000:]
    assert f"world_size: saved {before}, now {after}" in refused.stderr
    assert "checkpoint.reset_data_position=true" in refused.stderr

    resumed = run_training(tmp_path, *common, *_layout(after), "trainer.max_steps=6",
                           "checkpoint.reset_data_position=true", timeout=900)
    assert f"resuming from {saved.relative_to(tmp_path)}" in resumed.stdout
    assert "checkpoint.reset_data_position: the data layout changed" in resumed.stdout
    assert RESUMING_WARNING not in resumed.stderr  # our data module restored (here: reset) the position
    final = torch.load(find_resume_checkpoint(ckpt_dir), map_location="cpu", weights_only=True)
    assert final["global_step"] == 6
    assert final["lr_schedulers"][0]["last_epoch"] == 6  # the schedule continued from step 3
    steps = {int(s["step"]) for s in final["optimizer_states"][0]["state"].values()}
    assert steps == {6}  # AdamW's moments continued from step 3 (a fresh optimizer would count 3)
    assert final["EvfDataModule"]["stream"]["world_size"] == after


_CHOOSE = """
import sys
from pathlib import Path
import torch.distributed as dist
from evfsam_lightning.config import load
from evfsam_lightning.training.run import _resume_chosen_by_rank_zero

dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2)
rank = dist.get_rank()

class Strategy:
    def broadcast(self, obj, src=0):
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

class Connector:
    def resume_start(self, checkpoint_path=None, weights_only=None):
        print(f"rank {rank} loads {checkpoint_path}", flush=True)

class Trainer:
    is_global_zero = rank == 0
    strategy = Strategy()
    _checkpoint_connector = Connector()

# Each rank sees another run directory: only rank 0's view may decide.
cfg = load(sys.argv[2], [f"root_dir={sys.argv[3 + rank]}"])
trainer = Trainer()
_resume_chosen_by_rank_zero(trainer, cfg)
trainer._checkpoint_connector.resume_start(None)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_rank_zero_chooses_the_resume_checkpoint_for_every_rank(tmp_path):
    from evfsam_lightning.training.callbacks import checkpoint_files, file_digest, marker_of
    from tests.training.conftest import QUICKSTART

    seen = []
    for i, step in enumerate((4, 8)):  # rank 0's run has step 4, rank 1's (a stale view) step 8
        ckpt = tmp_path / f"root{i}" / "quickstart" / "checkpoints" / f"step-{step:08d}.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(os.urandom(1000))
        files = {rel: file_digest(ckpt) for rel in checkpoint_files(ckpt)}
        marker_of(ckpt).write_text(f'{{"step": {step}, "files": {__import__("json").dumps(files)}}}')
        seen.append(ckpt)
    env = clean_env()
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CHOOSE), str(rank), str(QUICKSTART),
                               str(tmp_path / "root0"), str(tmp_path / "root1")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for rank, (out, err) in enumerate(outs):
        assert procs[rank].returncode == 0, err[-3000:]
        assert f"rank {rank} loads {seen[0]}" in out, out + err
    assert f"resuming from {seen[0]}" in outs[0][0]
    assert Path(seen[1]).exists()
