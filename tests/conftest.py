"""Shared test fixtures: paths to the parity fixtures, a tiny tokenizer, a tiny model, the README's
quickstart run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"

#: Memory of the largest test (the full-size smoke run, ~16 GiB) and what any other test may use beside it.
_FULL_SIZE_GIB, _TEST_GIB = 16, 4


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): one worker per core, but no more than memory allows beside the
    full-size run (24 GiB, 2 cores: 2 workers). PYTEST_XDIST_AUTO_NUM_WORKERS overrides."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(len(os.sched_getaffinity(0)), 1 + int(memory - _FULL_SIZE_GIB) // _TEST_GIB))


def pytest_configure(config) -> None:
    """Under xdist each worker, and every process it starts, gets its share of the cores: OpenMP
    threads spinning on an oversubscribed machine made the tiny quickstart over 4x slower."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        share = max(1, len(os.sched_getaffinity(0)) // int(workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models trained in the test process: on a shared CPU a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Tests that share a costly fixture run on one xdist worker (`--dist loadgroup`), so it is built
    once: the README quickstart's training, a SLURM cluster, and any module-scoped fixture."""
    for item in items:
        fixturedefs = getattr(item, "_fixtureinfo", None)
        scopes = {defs[-1].scope for defs in fixturedefs.name2fixturedefs.values()} if fixturedefs else set()
        if "quickstart_run" in getattr(item, "fixturenames", ()):
            group = "quickstart"
        elif item.get_closest_marker("slurm") is not None:
            group = "slurm"
        elif "module" in scopes:
            group = item.nodeid.split("::", 1)[0]
        else:
            continue
        item.add_marker(pytest.mark.xdist_group(group))
    _longest_first(items)


def _longest_first(items: list) -> None:
    """Order the collection so that xdist hands out the long work first (pyproject passes
    `--no-loadscope-reorder`, so units go out in this order): the quickstart group (the README run
    and the trainings that start from it), then every file with a slow test, then the rest; each
    file's tests stay together and in their order. Sent last, a ten-minute group kept one worker
    busy while the other one sat idle."""
    def rank(item) -> int:
        group = item.get_closest_marker("xdist_group")
        if group is not None and group.args[0] == "quickstart":
            return 0
        return 1 if item.get_closest_marker("slow") is not None else 2

    files: dict[str, int] = {}
    for item in items:
        files[item.path] = min(files.get(item.path, 2), rank(item))
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (files[item.path], order[id(item)]))


TINY_SENTENCES = [
    "the red circle", "the blue square on the left", "a green triangle", "the yellow one",
    "the leftmost shape", "the purple shape on the right", "the orange star", "the man on the left",
    "[semantic] wall", "[semantic] left shoe", "aeroplane body", "the astronaut on the left",
]


def fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "manifest.json").is_file():
        pytest.skip(f"parity fixture {path} not present (it ships in ../shared/fixtures)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from evfsam_lightning.data.tokenizer import build_tokenizer

    return build_tokenizer(TINY_SENTENCES * 5, tmp_path_factory.mktemp("tokenizer"), vocab_size=64,
                           added_tokens=["[semantic]"])


@pytest.fixture
def tiny_model():
    from evfsam_lightning.models.builders import build_model

    torch.manual_seed(0)
    return build_model("tiny")


def readme_setup_commands() -> list[str]:
    """The bash blocks of the README's "Set up" section: install-and-train, then the tests."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def run_shell(command: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`command` through the shell, output captured; at the timeout the shell and everything it
    started are killed (`subprocess.run(shell=True)` kills only the shell: the training it started
    kept running after the test had failed)."""
    job = subprocess.Popen(command, shell=True, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        raise
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> tuple[Path, str]:
    """The README's main command as a reader runs it (install step skipped: the package is
    installed), in a fresh folder; returns (that folder, the run's stdout). Trained once per session:
    the README test checks it, the fine-tuning doc test starts from it as the "released" model."""
    main = readme_setup_commands()[0].split("&&")[-1].strip()
    assert main.startswith("evfsam-train recipes/quickstart.yaml"), main
    folder = tmp_path_factory.mktemp("quickstart")
    (folder / "recipes").symlink_to(REPO / "recipes")
    command = main.replace("evfsam-train", f"{sys.executable} -m evfsam_lightning.cli.train", 1)
    result = run_shell(command + " logging.progress_bar=false", folder, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return folder, result.stdout
