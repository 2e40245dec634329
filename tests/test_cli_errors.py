"""Every console script answers a user error with one line on stderr and exit 2 (issue 17).

The table runs each case as a subprocess, as a user would: `<command>: error: ...` as the only line
on stderr, exit code 2, no traceback; a pickle that would create `pwned` in the working folder
never runs. Most cases fail before torch or Lightning are imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
MODULES = {
    "evfsam-train": "train", "evfsam-eval": "evaluate", "evfsam-predict": "predict", "evfsam-export": "export",
    "evfsam-data": "data", "evfsam-shards": "shards", "evfsam-slurm": "slurm",
    "evfsam-cache-embeddings": "cache", "evfsam-demo": "demo", "evfsam-predict-video": "predict_video",
    "evfsam-eval-video": "eval_video",
}


class _Pwn:
    """Pickles to a call that creates the file `pwned`: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    import torch

    d = tmp_path_factory.mktemp("inputs")
    f = {"dir": d / "folder", "text": d / "notes.txt", "garbage": d / "garbage.bin", "missing": d / "missing.ckpt"}
    f["dir"].mkdir()
    f["text"].write_text("not a checkpoint\n")
    f["garbage"].write_bytes(bytes(range(256)) * 8)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, d / "good.ckpt")
    data = (d / "good.ckpt").read_bytes()
    f.update(truncated=d / "truncated.ckpt", pickle=d / "pwn.ckpt")
    f["truncated"].write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {}, "x": _Pwn()}, f["pickle"])
    assert zipfile.is_zipfile(f["pickle"])
    f["malformed"] = d / "malformed.yaml"
    f["malformed"].write_text("model: {size: tiny\ndata: [1,\n")
    f["list"] = d / "list.yaml"
    f["list"].write_text("- model\n- data\n")
    f["yaml_code"] = d / "code.yaml"
    f["yaml_code"].write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    f["urls_string"] = d / "urls.yaml"
    f["urls_string"].write_text("data:\n  train:\n    - {name: mine, urls: shards/mine.tar}\n")
    f["data_dialect"] = d / "data_section.yaml"  # the data module's former dialect, once read by evfsam-data
    f["data_dialect"].write_text("data:\n  tokenizer: tok/\n  sources:\n    - {name: mine, urls: shards/mine.tar}\n")
    f["official"] = d / "official"  # looks like an EVF-SAM folder (config.json): gets past the path check
    f["official"].mkdir()
    (f["official"] / "config.json").write_text("{}")
    f["image"] = d / "image.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f["image"])
    f["refer"] = d / "refer"  # the refer layout with a refs pickle that would run code
    (f["refer"] / "refcoco").mkdir(parents=True)
    import pickle

    (f["refer"] / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Pwn()]))
    (f["refer"] / "refcoco" / "instances.json").write_text('{"images": [], "annotations": [], "categories": []}')
    f["unreadable"] = d / "unreadable.yaml"  # permission denied (only where the tests do not run as root)
    f["unreadable"].write_text("name: x\n")
    f["unreadable"].chmod(0)
    f["shards"] = d / "shards"
    f["shards"].mkdir()
    import tarfile

    tarfile.open(f["shards"] / "s-000000.tar", "w").close()
    f["frames"] = d / "frames"  # a one-frame clip as a frame folder
    f["frames"].mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f["frames"] / "00000.jpg")
    return f


def _cases(f: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    """(command, arguments, a piece of the expected message)."""
    q = str(QUICKSTART)
    ck = ["--data", str(f["shards"])]
    pred = ["--image", str(f["image"]), "--text", "the dog", "--out", "out/mask.png"]
    clip = ["--video", str(f["frames"]), "--text", "the dog", "--out", "out/masks"]
    cases = [
        # recipes: malformed, a list, missing, a directory, binary, YAML that would build objects
        ("evfsam-train", [str(f["malformed"])], "malformed YAML"),
        ("evfsam-train", [str(f["list"])], "must be a mapping"),
        ("evfsam-train", [str(f["missing"])], "not found"),
        ("evfsam-train", [str(f["dir"])], "is a directory"),
        ("evfsam-train", [str(f["garbage"])], str(f["garbage"])),
        ("evfsam-train", [str(f["yaml_code"])], "python/object"),
        ("evfsam-train", [str(f["urls_string"])], "must be a list"),
        ("evfsam-train", [q, "trainer.bogus=1"], "unknown key"),
        ("evfsam-train", [q, "optim.lr"], "key=value"),
        ("evfsam-train", [q, "optim.lr=abc"], "optim.lr"),
        # numeric ranges, before any work
        ("evfsam-train", [q, "data.num_workers=-1"], "data.num_workers=-1"),
        ("evfsam-train", [q, "checkpoint.every_n_steps=-5"], "checkpoint.every_n_steps=-5"),
        ("evfsam-train", [q, "data.synthetic.train=-1"], "data.synthetic.train=-1"),
        ("evfsam-train", [q, "optim.lr=-1"], "optim.lr=-1"),
        ("evfsam-train", [q, "trainer.devices=0"], "trainer.devices=0"),
        ("evfsam-train", [q, "optim.betas=[0.9,1.5]"], "optim.betas"),
        # resume inputs
        ("evfsam-train", [q, f"checkpoint.resume={f['dir']}"], "not a DeepSpeed or FSDP"),
        ("evfsam-train", [q, f"checkpoint.resume={f['text']}"], "not a PyTorch checkpoint"),
        ("evfsam-train", [q, f"checkpoint.resume={f['truncated']}"], "not a PyTorch checkpoint"),
        ("evfsam-train", [q, f"checkpoint.resume={f['pickle']}"], "unsafe pickle"),
        ("evfsam-train", [q, f"checkpoint.resume={f['missing']}"], "no such checkpoint"),
        ("evfsam-train", [q, f"model.tokenizer={f['dir']}", "data.synthetic.dir=syn"], "sentencepiece.bpe.model"),
        ("evfsam-train", [q, f"root_dir={f['text']}"], "is a file, not a folder"),
        ("evfsam-train", [q, "trainer.accelerator=gpu", "data.synthetic.dir=syn"], "accelerator=gpu: "),
        # evaluation
        ("evfsam-eval", ["--checkpoint", str(f["missing"]), *ck], "no such file"),
        ("evfsam-eval", ["--checkpoint", str(f["dir"]), *ck], "holds no checkpoint"),
        ("evfsam-eval", ["--checkpoint", str(f["text"]), *ck], "not a PyTorch checkpoint"),
        ("evfsam-eval", ["--checkpoint", str(f["truncated"]), *ck], "not a PyTorch checkpoint"),
        ("evfsam-eval", ["--checkpoint", str(f["pickle"]), *ck], "unsafe pickle"),
        ("evfsam-eval", ["--checkpoint", str(f["official"]), "--data", str(f["missing"])], "no such file"),
        ("evfsam-eval", ["--checkpoint", str(f["official"]), "--data", str(f["dir"])], "no *.tar"),
        ("evfsam-eval", ["--checkpoint", str(f["official"]), *ck, "--devices", "0"], "--devices 0"),
        ("evfsam-eval", ["--checkpoint", str(f["official"])], "--data"),
        ("evfsam-eval", ["--checkpoint", str(f["official"]), *ck, "--out", f"{f['text']}/r.json"], "is a file"),
        # prediction
        ("evfsam-predict", ["--checkpoint", str(f["official"]), *pred, "--device", "cuda"], "--device cuda"),
        ("evfsam-predict", ["--checkpoint", str(f["official"]), "--image", str(f["image"]), "--text", "x",
                            "--out", f"{f['text']}/mask.png"], "cannot create its folder"),
        ("evfsam-predict", ["--checkpoint", str(f["official"]), "--image", str(f["image"]), "--text", "  \t ",
                            "--out", "m.png"], "--text is empty"),
        ("evfsam-predict", ["--checkpoint", str(f["missing"]), *pred], "no such file"),
        ("evfsam-predict", ["--checkpoint", str(f["pickle"]), *pred], "unsafe pickle"),
        ("evfsam-predict", ["--checkpoint", str(f["text"]), *pred], "not a PyTorch checkpoint"),
        ("evfsam-predict", ["--checkpoint", str(f["official"]), "--image", str(f["missing"]), "--text", "x",
                            "--out", "m.png"], "--image"),
        ("evfsam-predict", ["--checkpoint", str(f["official"]), "--image", str(f["dir"]), "--text", "x",
                            "--out", "m.png"], "--image"),
        ("evfsam-predict", ["--checkpoint", str(f["official"]), "--image", str(f["garbage"]), "--text", "x",
                            "--out", "m.png"], "cannot read the image"),
        # export
        ("evfsam-export", ["--checkpoint", str(f["missing"]), "--out", "x"], "no such file"),
        ("evfsam-export", ["--checkpoint", str(f["dir"]), "--out", "x"], "holds no checkpoint"),
        ("evfsam-export", ["--checkpoint", str(f["truncated"]), "--out", "x"], "not a PyTorch checkpoint"),
        ("evfsam-export", ["--checkpoint", str(f["pickle"]), "--out", "x"], "unsafe pickle"),
        ("evfsam-export", ["--checkpoint", str(f["official"]), "--out", f"{f['text']}/x"], "is a file"),
        ("evfsam-export", ["--checkpoint", str(f["official"]), "--out", str(f["text"])], "is a file"),
        # data inspection
        ("evfsam-data", ["inspect", str(f["missing"])], "not found"),
        ("evfsam-data", ["inspect", str(f["dir"])], "is a directory"),
        ("evfsam-data", ["inspect", str(f["malformed"])], "malformed YAML"),
        ("evfsam-data", ["inspect", str(f["yaml_code"])], "python/object"),
        ("evfsam-data", ["inspect", str(f["data_dialect"])], "no longer read; pass a training recipe"),
        ("evfsam-data", ["inspect", q, "data.num_workers=-1"], "data.num_workers=-1"),
        ("evfsam-data", ["inspect", q, "--samples", "0"], "--samples"),
        # shard conversion
        ("evfsam-shards", ["synthetic", "--out", "s", "--train", "-5"], "--train -5"),
        ("evfsam-shards", ["refer", "--root", str(f["missing"]), "--out", "s"], "not found"),
        ("evfsam-shards", ["jsonl", "--ann", str(f["missing"]), "--out", "s"], str(f["missing"])),
        ("evfsam-shards", ["jsonl", "--ann", str(f["dir"]), "--out", "s"], str(f["dir"])),
        ("evfsam-shards", ["nope"], "invalid choice"),
        ("evfsam-shards", ["refer", "--root", str(f["refer"]), "--out", "s"], "refs(unc).p"),
        # SLURM and the embedding cache
        ("evfsam-slurm", ["submit", str(f["missing"]), "--nodes", "1", "--gpus-per-node", "0"], "not found"),
        ("evfsam-slurm", ["submit", str(f["dir"]), "--nodes", "1", "--gpus-per-node", "0"], "is a directory"),
        ("evfsam-slurm", ["submit", str(f["yaml_code"]), "--nodes", "1", "--gpus-per-node", "0"], "python/object"),
        ("evfsam-slurm", ["launch"], "unknown command"),
        ("evfsam-cache-embeddings", [q, "--out", "cache"], "model.mode='full'"),
        ("evfsam-cache-embeddings", [str(f["missing"]), "--out", "cache"], "not found"),
        # the demo, video prediction and video evaluation
        ("evfsam-demo", ["--checkpoint", str(f["missing"])], "no such file"),
        ("evfsam-demo", ["--checkpoint", str(f["dir"])], "holds no checkpoint"),
        ("evfsam-demo", ["--checkpoint", str(f["text"])], "not a PyTorch checkpoint"),
        ("evfsam-demo", ["--checkpoint", str(f["pickle"])], "unsafe pickle"),
        ("evfsam-predict-video", ["--checkpoint", str(f["missing"]), *clip], "no such file"),
        ("evfsam-predict-video", ["--checkpoint", str(f["dir"]), *clip], "holds no checkpoint"),
        ("evfsam-predict-video", ["--checkpoint", str(f["truncated"]), *clip], "not a PyTorch checkpoint"),
        ("evfsam-predict-video", ["--checkpoint", str(f["pickle"]), *clip], "unsafe pickle"),
        ("evfsam-predict-video", ["--checkpoint", str(f["official"]), "--video", str(f["missing"]), "--text", "x",
                                  "--out", "o"], "--video"),
        ("evfsam-predict-video", ["--checkpoint", str(f["official"]), "--video", str(f["dir"]), "--text", "x",
                                  "--out", "o"], "no frames"),
        ("evfsam-eval-video", ["--checkpoint", str(f["official"]), "--data", str(f["missing"])], "not found"),
        ("evfsam-eval-video", ["--checkpoint", str(f["official"]), "--data", str(f["dir"])], "meta_expressions"),
    ]
    if os.geteuid() != 0:  # root reads any file
        cases += [("evfsam-train", [str(f["unreadable"])], "cannot read"),
                  ("evfsam-predict", ["--checkpoint", str(f["unreadable"]), *pred], "permission denied"),
                  ("evfsam-data", ["inspect", str(f["unreadable"])], "unreadable.yaml")]
    return cases


CASES = _cases({k: Path(f"<{k}>") for k in ("dir", "text", "garbage", "missing", "truncated", "pickle",
                                             "malformed", "list", "yaml_code", "urls_string", "data_dialect",
                                             "official", "image", "shards", "refer", "unreadable", "frames")})


def _run(command: str, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "EVFSAM_DEBUG"}
    env = {**base, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-m", f"evfsam_lightning.cli.{MODULES[command]}", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def _needs_torch(command: str, args: list[str]) -> bool:
    """Cases found only once torch is imported (loading a checkpoint, asking for CUDA): slow here."""
    text = " ".join(args)
    return any(k in text for k in ("<pickle>", "model.tokenizer", "--device cuda", "accelerator=gpu"))


def _marks(command: str, args: list[str]) -> list:
    marks = [pytest.mark.slow] if _needs_torch(command, args) else []
    if any("cuda" in a or "gpu" in a for a in args):
        import torch

        marks.append(pytest.mark.skipif(torch.cuda.is_available(), reason="a case for machines without CUDA"))
    return marks


@pytest.fixture(scope="module")
def outcomes(request, files, tmp_path_factory) -> dict[int, tuple[Path, subprocess.CompletedProcess]]:
    """Every selected case's subprocess, run three at a time (each its own process and working
    folder, as a user would run it; most of a case's time is the interpreter starting, which
    overlaps well on 2 cores): {index: (working folder, result)}."""
    from concurrent.futures import ThreadPoolExecutor

    cases = _cases(files)
    wanted = [item.callspec.params["index"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_user_error_is_one_line_and_exit_2"
              and not any(m.name == "skipif" and m.args and m.args[0] for m in item.iter_markers())]

    def run(index: int) -> tuple[int, Path, subprocess.CompletedProcess]:
        cwd = tmp_path_factory.mktemp(f"case{index}")
        return index, cwd, _run(cases[index][0], cases[index][1], cwd)

    with ThreadPoolExecutor(3) as pool:
        return {index: (cwd, result) for index, cwd, result in pool.map(run, wanted)}


@pytest.mark.parametrize("index", [pytest.param(i, marks=_marks(c, a)) for i, (c, a, _) in enumerate(CASES)],
                         ids=[f"{c}:{' '.join(a)[:60]}" for c, a, _ in CASES])
def test_user_error_is_one_line_and_exit_2(index, files, outcomes):
    command, args, expected = _cases(files)[index]
    tmp_path, result = outcomes[index]
    lines = result.stderr.strip().splitlines()
    shown = f"{command} {' '.join(args)}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, shown
    assert len(lines) == 1 and "Traceback" not in result.stderr, shown
    assert lines[0].startswith(f"{command}: error: ") and expected in lines[0], shown
    assert not (tmp_path / "pwned").exists(), "the malicious pickle ran"


def test_debug_shows_the_traceback(files, tmp_path):
    for extra, env in ((["--debug"], None), ([], {"EVFSAM_DEBUG": "1"})):
        result = _run("evfsam-train", [str(QUICKSTART), "optim.lr=-1", *extra], tmp_path, env)
        assert result.returncode == 1 and "Traceback" in result.stderr and "optim.lr=-1" in result.stderr


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from evfsam_lightning.data.schema import image_to_rgb

    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        rgb = image_to_rgb(im)
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 1, 128, 255]


def test_describe_tells_user_errors_from_bugs():
    import errno
    import pickle

    from evfsam_lightning.cli.errors import describe

    assert "pip install deepspeed" in describe(ModuleNotFoundError("No module named 'deepspeed'", name="deepspeed"))
    full = describe(OSError(errno.ENOSPC, "No space left on device", "runs/x/step-5.ckpt"))
    assert full.startswith("no space left on device, runs/x/step-5.ckpt") and "free space" in full
    assert "unsafe" in describe(pickle.UnpicklingError("Weights only load failed.\nline two"))
    assert "\n" not in describe(pickle.UnpicklingError("Weights only load failed.\nline two"))
    for bug in (KeyError("x"), TypeError("unsupported operand"), AttributeError("no attribute"), RuntimeError("x")):
        assert describe(bug) is None


@pytest.mark.parametrize("value", ["false", "False", "'false'"])
def test_resume_false_as_documented(value):
    from evfsam_lightning.config import load

    assert load(QUICKSTART, [f"checkpoint.resume={value}"]).checkpoint.resume == "false"
    assert load(QUICKSTART, ["checkpoint.resume=auto"]).checkpoint.resume == "auto"


def test_every_numeric_key_is_range_checked_when_the_recipe_loads():
    from evfsam_lightning.config import _AT_LEAST, _FRACTION, _POSITIVE, ConfigError, load

    below = {**{k: low - 1 for k, low in _AT_LEAST.items()}, **dict.fromkeys(_POSITIVE, 0),
             **dict.fromkeys(_FRACTION, 1.5)}
    for key, value in below.items():
        with pytest.raises(ConfigError, match=rf"^{key}="):
            load(QUICKSTART, [f"{key}={value}"])
    load(QUICKSTART, ["checkpoint.every_n_steps=0"])  # 0: saved only at the end and on preemption
