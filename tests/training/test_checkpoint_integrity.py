"""Checkpoint integrity: markers record sizes and CRC-32s, damaged checkpoints are skipped on resume,
failed saves leave nothing behind, one training process per run directory, no temporary files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evfsam_lightning.config import ConfigError
from evfsam_lightning.training.callbacks import (
    LAST_POINTER,
    DamagedCheckpoint,
    checkpoint_files,
    file_digest,
    find_resume_checkpoint,
    marker_of,
    remove_stale_staging,
    staging_of,
    verify_checkpoint,
)
from evfsam_lightning.training.run_lock import RunLock
from tests.training.conftest import (  # noqa: F401
    clean_env,
    finish_training,
    run_training,
    small_run,
    start_training,
    synthetic_dir,
    train_command,
)


def damage(path: Path, how: str) -> None:
    """Truncate, zero (a run of bytes in the middle) or flip one byte of a file in place."""
    size = path.stat().st_size
    if how == "truncate":
        os.truncate(path, size // 2)
    elif how == "zero":
        with open(path, "r+b") as f:
            f.seek(size // 3)
            f.write(bytes(min(4096, size // 3)))
    elif how == "flip":
        with open(path, "r+b") as f:
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0x01]))
    else:
        raise ValueError(how)


def _fake_checkpoint(folder: Path, step: int, sharded: bool) -> Path:
    """A complete checkpoint as `save_complete_checkpoint` marks it (file or sharded directory)."""
    path = folder / f"step-{step:08d}.ckpt"
    if sharded:
        (path / "checkpoint").mkdir(parents=True)
        for rank in range(2):
            (path / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(50_000))
        (path / "latest").write_text("checkpoint")
    else:  # a real torch zip archive, as a .ckpt is (the config check looks at that)
        torch.save({"state_dict": {"w": torch.randn(25_000)}}, path)
    files = {rel: file_digest(path if rel == "." else path / rel) for rel in checkpoint_files(path)}
    marker_of(path).write_text(json.dumps({"step": step, "files": files}))
    (folder / LAST_POINTER).write_text(json.dumps({"checkpoint": path.name, "step": step}))
    return path


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "sharded"])
@pytest.mark.parametrize("how", ["truncate", "zero", "flip"])
def test_damage_is_detected_naming_the_file_and_resume_falls_back(tmp_path, capsys, sharded, how):
    older = _fake_checkpoint(tmp_path, 10, sharded)
    newest = _fake_checkpoint(tmp_path, 20, sharded)
    verify_checkpoint(newest)
    assert find_resume_checkpoint(tmp_path, verify=True) == newest
    victim = newest / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt" if sharded else newest
    damage(victim, how)
    with pytest.raises(DamagedCheckpoint, match=str(victim)):
        verify_checkpoint(newest)
    assert find_resume_checkpoint(tmp_path, verify=True) == older
    assert str(victim) in capsys.readouterr().out  # the warning names the damaged file
    assert find_resume_checkpoint(tmp_path) == newest  # without verification: the newest marker


def test_missing_shard_and_unverifiable_old_marker(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 5, sharded=True)
    victim = ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.unlink()
    with pytest.raises(DamagedCheckpoint, match="missing"):
        verify_checkpoint(ckpt)
    old = tmp_path / "step-00000001.ckpt"
    old.write_bytes(b"x")
    marker_of(old).write_text(json.dumps({"step": 1}))  # written before checksums existed
    verify_checkpoint(old)


def test_explicitly_named_damaged_checkpoint_is_a_config_error(tmp_path):
    from evfsam_lightning.config import load
    from evfsam_lightning.training.run import resume_path

    ckpt = _fake_checkpoint(tmp_path, 3, sharded=False)
    damage(ckpt, "flip")
    cfg = load(Path(__file__).parents[2] / "recipes" / "quickstart.yaml", [f"checkpoint.resume={ckpt}"])
    with pytest.raises(ConfigError, match=f"checkpoint.resume={ckpt}.*{ckpt}.*damaged"):
        resume_path(cfg)


def test_stale_staging_and_unmarked_checkpoints_are_removed(tmp_path):
    keep = _fake_checkpoint(tmp_path, 4, sharded=False)
    staged_dir = staging_of(tmp_path / "step-00000008.ckpt")
    (staged_dir / "checkpoint").mkdir(parents=True)
    (staged_dir / "checkpoint" / "x.pt").write_bytes(b"1")
    staged_file = staging_of(tmp_path / "step-00000006.ckpt")
    staged_file.write_bytes(b"1")
    unmarked = tmp_path / "step-00000007.ckpt"
    unmarked.write_bytes(b"partial")
    tmp_marker = tmp_path / ".last.json.tmp1234"
    tmp_marker.write_text("{")
    removed = set(remove_stale_staging(tmp_path))
    assert removed == {staged_dir, staged_file, unmarked, tmp_marker}
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST_POINTER, keep.name, marker_of(keep).name]


_HOLD = """
import sys, time
from pathlib import Path
from evfsam_lightning.training.run_lock import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_run_lock_refuses_a_second_holder_and_takes_over_a_killed_one(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    env = clean_env()
    env.pop("SLURM_JOB_ID", None)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by another evfsam-train .*PID {holder.pid}"):
            RunLock(tmp_path).acquire()
        # A requeued SLURM job is not blocked by its own earlier start (same SLURM_JOB_ID).
        (tmp_path / ".lock").write_text(json.dumps({"host": "n1", "pid": holder.pid, "slurm_job_id": "77"}))
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        RunLock(tmp_path).acquire()
        assert "this SLURM job 77" in capsys.readouterr().out
        monkeypatch.setenv("SLURM_JOB_ID", "78")
        with pytest.raises(ConfigError, match="in use"):
            RunLock(tmp_path).acquire()
        monkeypatch.delenv("SLURM_JOB_ID")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": "h", "pid": holder.pid}))
    with RunLock(tmp_path):
        assert f"stale lock of host h, PID {holder.pid}" in capsys.readouterr().out
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert (tmp_path / ".lock").read_text() == ""  # a clean end leaves no holder behind


# -- real runs -------------------------------------------------------------------------------------
RUN = ("trainer.max_steps=10", "checkpoint.every_n_steps=2", "trainer.global_batch_size=4",
       "trainer.micro_batch_size=4", "checkpoint.keep_top_k=0")


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 10
    return {k: v for k, v in state["state_dict"].items() if k.startswith("model.")}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory, synthetic_dir):  # noqa: F811
    """Final weights of an uninterrupted run of RUN."""
    cwd = tmp_path_factory.mktemp("straight")
    run_training(cwd, *small_run(synthetic_dir, *RUN), timeout=900)
    return _weights(find_resume_checkpoint(cwd / "runs" / "quickstart" / "checkpoints"))


def _left_behind(*folders: Path) -> list[Path]:
    """Temporary or staging files anywhere under the folders."""
    return [p for f in folders for p in f.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                            text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")


@pytest.mark.slow
def test_resume_auto_skips_damaged_checkpoints_and_ends_like_an_uninterrupted_run(tmp_path, synthetic_dir,  # noqa: F811
                                                                                  straight):
    overrides = small_run(synthetic_dir, *RUN, "checkpoint.keep_last=4")
    ckpt_dir = tmp_path / "runs" / "quickstart" / "checkpoints"
    proc = subprocess.Popen(train_command(*overrides), cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None and len(list(ckpt_dir.glob("*.complete"))) < 4:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before its fourth checkpoint"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    complete = sorted(m.with_name(m.name[: -len(".complete")]) for m in ckpt_dir.glob("*.complete"))
    assert len(complete) == 4
    oldest, *damaged = complete
    for ckpt, how in zip(damaged, ("flip", "zero", "truncate"), strict=True):
        damage(ckpt, how)
    resumed = run_training(tmp_path, *overrides, timeout=900)
    for ckpt in damaged:  # the run names its checkpoints relative to its working directory
        assert f"skipping a damaged checkpoint: checkpoint {ckpt.relative_to(tmp_path)}" in resumed.stdout
    assert f"resuming from {oldest.relative_to(tmp_path)}" in resumed.stdout
    _assert_same(_weights(find_resume_checkpoint(ckpt_dir, verify=True)), straight)


@pytest.mark.slow
def test_preempt_resume_finish_with_a_small_tmpdir_leaves_only_the_kept_checkpoints(tmp_path, synthetic_dir,  # noqa: F811
                                                                                     straight):
    tmpdir = tmp_path / "tmpdir"
    _mount_tmpfs(tmpdir, "10M")  # smaller than one checkpoint (about 20 MB): staging there would fail
    try:
        env = clean_env() | {"TMPDIR": str(tmpdir)}
        overrides = small_run(synthetic_dir, *RUN)
        ckpt_dir = tmp_path / "runs" / "quickstart" / "checkpoints"
        proc = subprocess.Popen(train_command(*overrides), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None and not any(ckpt_dir.glob("*.complete")):
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 75, out[-3000:]
        preempted = find_resume_checkpoint(ckpt_dir)
        result = subprocess.run(train_command(*overrides), cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"resuming from {preempted.relative_to(tmp_path)}" in result.stdout
        names = sorted(p.name for p in ckpt_dir.iterdir())
        assert names == [LAST_POINTER, "step-00000008.ckpt", "step-00000008.ckpt.complete", "step-00000010.ckpt",
                         "step-00000010.ckpt.complete"], names  # keep_last=2; the preemption one rotated away
        assert not _left_behind(tmp_path / "runs", tmpdir)
        assert not list(tmpdir.iterdir())
        _assert_same(_weights(ckpt_dir / "step-00000010.ckpt"), straight)
    finally:
        subprocess.run(["umount", "-l", str(tmpdir)], check=False)


@pytest.mark.slow
def test_disk_full_during_a_save_stops_with_one_line_and_rerun_resumes_exactly(tmp_path, synthetic_dir,  # noqa: F811
                                                                               straight):
    root = tmp_path / "small"
    _mount_tmpfs(root, "50M")  # two checkpoints of about 20 MB fit, a third does not
    try:
        overrides = small_run(synthetic_dir, *RUN, f"root_dir={root}", "logging.tensorboard=false")
        result = subprocess.run(train_command(*overrides), cwd=tmp_path, env=clean_env(), capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if "could not write" in line]
        assert len(lines) == 1 and lines[0].startswith("evfsam-train: error: "), result.stderr[-3000:]
        ckpt_dir = root / "quickstart" / "checkpoints"
        assert "could not write checkpoint " + str(ckpt_dir / "step-00000006.ckpt") in lines[0]
        assert "No space left on device" in lines[0] and "needs about" in lines[0] and "free" in lines[0]
        assert not _left_behind(root)
        kept = find_resume_checkpoint(ckpt_dir, verify=True)
        assert kept == ckpt_dir / "step-00000004.ckpt"
        subprocess.run(["mount", "-o", "remount,size=200M", str(root)], check=True)  # space freed
        resumed = run_training(tmp_path, *overrides, timeout=900)
        assert f"resuming from {kept}" in resumed.stdout
        _assert_same(_weights(find_resume_checkpoint(ckpt_dir, verify=True)), straight)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_fsdp_checkpoint_damaged_on_one_rank_falls_back_and_ends_like_an_uninterrupted_run(
        tmp_path, synthetic_dir, monkeypatch):  # noqa: F811
    from evfsam_lightning.training.loading import consolidate

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two 2-rank runs side by side on 2 cores: one thread each

    overrides = small_run(synthetic_dir, "trainer.max_steps=6", "checkpoint.every_n_steps=2",
                          "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.devices=2",
                          "trainer.accelerator=cpu", "strategy.name=fsdp", "checkpoint.keep_top_k=0",
                          "logging.tensorboard=false", "optim.schedule=constant", "optim.warmup_steps=0")
    straight_dir, damaged_dir = tmp_path / "straight", tmp_path / "damaged"
    straight_dir.mkdir()
    damaged_dir.mkdir()
    straight_job = start_training(straight_dir, *overrides)  # beside the damaged run
    first = run_training(damaged_dir, *overrides, "trainer.max_steps=4", timeout=900)  # steps 2 and 4 kept
    assert "starting from scratch" in first.stdout
    ckpt_dir = damaged_dir / "runs" / "quickstart" / "checkpoints"
    newest = find_resume_checkpoint(ckpt_dir)
    assert newest.name == "step-00000004.ckpt" and newest.is_dir()
    assert set(json.loads(marker_of(newest).read_text())["files"]) == set(checkpoint_files(newest))
    victim = newest / "__1_0.distcp"  # rank 1's shard
    damage(victim, "flip")
    resumed = run_training(damaged_dir, *overrides, timeout=900)
    rel = newest.relative_to(damaged_dir)
    assert f"skipping a damaged checkpoint: checkpoint {rel}: {rel / victim.name} is damaged" in resumed.stdout
    assert f"resuming from {rel.with_name('step-00000002.ckpt')}" in resumed.stdout

    def final(run: Path) -> dict[str, torch.Tensor]:
        ckpt = find_resume_checkpoint(run / "runs" / "quickstart" / "checkpoints", verify=True)
        state = torch.load(consolidate(ckpt, run / "full.ckpt"), map_location="cpu", weights_only=True)
        assert state["global_step"] == 6
        return {k: v for k, v in state["state_dict"].items() if k.startswith("model.")}

    finish_training(straight_job, timeout=900)
    _assert_same(final(damaged_dir), final(straight_dir))


def test_eval_and_export_verify_what_they_load(tmp_path, capsys):
    from evfsam_lightning.training.loading import best_checkpoint, load_for_inference

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    older = _fake_checkpoint(folder, 2, sharded=False)
    newest = _fake_checkpoint(folder, 4, sharded=False)
    damage(newest, "zero")
    with pytest.raises(DamagedCheckpoint, match=str(newest)):  # evfsam-eval / evfsam-export --checkpoint FILE
        load_for_inference(newest)
    assert best_checkpoint(tmp_path / "run") == older  # --checkpoint RUN_DIR: the damaged one is skipped
    assert str(newest) in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-m", "evfsam_lightning.cli.export", "--checkpoint", str(newest),
                             "--out", str(tmp_path / "out")], env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("evfsam-export: error: checkpoint ") and str(newest) in line and "damaged" in line
    assert not (tmp_path / "out").exists()
