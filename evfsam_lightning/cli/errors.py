"""One error convention for every console script.

A user error (bad path, bad value, bad or unsafe file, missing optional dependency, impossible
device) is printed as exactly one line on stderr and the command exits 2:

    <command>: error: <what>, <where> (<how to fix, when known>)

A bug keeps its traceback (exit 1). With `--debug` on the command line or `EVFSAM_DEBUG=1` in the
environment every error keeps its traceback. Each `main` is wrapped with `@console_script(name)`;
its argparse parser is `ArgumentParser` from here (usage mistakes are one line too). This module
imports only the standard library: the checks here run before torch or Lightning are imported.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import pickle
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

DEBUG_ENV = "EVFSAM_DEBUG"


class UserError(ValueError):
    """A mistake of the user's (a path, a value, a file); the message says what, where and how to fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line instead of the usage text plus a line, and
    lists `--debug` (which `console_script` takes off the command line before parsing)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"a traceback for every error, not one line (also: {DEBUG_ENV}=1)")

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _os_error(e: OSError) -> str:
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    what = {
        errno.ENOENT: "no such file or directory",
        errno.EISDIR: "is a directory, a file was expected",
        errno.ENOTDIR: "a part of the path is a file, not a directory",
        errno.EEXIST: "already exists (and is not a folder)",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
    }.get(e.errno, e.strerror or _first_line(e) or type(e).__name__)
    fix = {
        errno.ENOENT: "check the path",
        errno.ENOSPC: "free space and run the same command again",
        errno.EDQUOT: "free space and run the same command again",
        errno.EACCES: "check the file's permissions",
    }.get(e.errno)
    text = f"{what}, {where}" if where else (_first_line(e) or what)
    return f"{text} ({fix})" if fix else text


def describe(e: BaseException) -> str | None:
    """The one-line message of a user error, or None for a bug (which keeps its traceback)."""
    from evfsam_lightning.config import ConfigError  # omegaconf only: cheap

    if isinstance(e, UserError | ConfigError):
        return _first_line(e)
    module = type(e).__module__ or ""
    name = type(e).__name__
    # our own error types, matched by name so that describing one never imports torch
    ours = ("CheckpointError", "DataError", "SampleError", "EmbeddingCacheError", "LaunchError", "ShardError")
    if module.startswith("evfsam_lightning") and any(c.__name__ in ours for c in type(e).__mro__):  # subclasses too
        return _first_line(e)
    if name == "MisconfigurationException" and module.startswith("lightning"):  # e.g. a GPU asked of a CPU build
        return _first_line(e)
    if isinstance(e, pickle.UnpicklingError):  # torch.load(weights_only=True) refusing code, or a bad pickle
        return ("refused to load an unsafe or damaged pickle (it would run code or is not a checkpoint): "
                f"{_first_line(e)[:200]} (only load files you trust; never disable weights_only)")
    if isinstance(e, zipfile.BadZipFile | EOFError):
        return f"damaged file: {_first_line(e) or name} (the file is truncated or not what was expected)"
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.split(".")[0]
        return f"the optional dependency {top!r} is not installed (pip install {top})"
    if isinstance(e, OSError) and (e.filename is not None or e.errno in (errno.ENOSPC, errno.EDQUOT)):
        return _os_error(e)
    if isinstance(e, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError | FileExistsError):
        return _first_line(e) or name  # raised by our code with a message naming the path
    if isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e):
        return f"damaged checkpoint: {_first_line(e)} (the file is truncated or corrupted)"
    try:
        from omegaconf.errors import OmegaConfBaseException
        from yaml import YAMLError
    except ImportError:  # pragma: no cover - both are dependencies
        return None
    if isinstance(e, OmegaConfBaseException | YAMLError):
        return _first_line(e)
    return None


def console_script(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a console script's `main(argv)` in the error convention (see the module docstring)."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = debug_requested(argv)
            if "--debug" in argv:  # also for what this process starts (e.g. DDP ranks)
                os.environ[DEBUG_ENV] = "1"
            argv = [a for a in argv if a != "--debug"]
            try:
                return main(argv)
            except SystemExit as e:  # a message given to SystemExit / sys.exit: a user error too
                if isinstance(e.code, str) and not debug:
                    message = e.code.removeprefix(f"{prog}: ").removeprefix("error: ")
                    print(f"{prog}: error: {_first_line(message)}", file=sys.stderr)
                    return 2
                raise
            except Exception as e:
                message = None if debug else describe(e)
                if message is None:
                    raise
                print(f"{prog}: error: {message}", file=sys.stderr)
                return 2

        return run

    return wrap


# -- cheap checks of user inputs, before heavy imports ------------------------------------------

def existing_path(path: str | os.PathLike, what: str) -> Path:
    """`path` if it exists, else a UserError naming `what` (e.g. "--image")."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {p}: no such file or directory (check the path)")
    return p


def checkpoint_input(path: str | os.PathLike, what: str = "--checkpoint") -> Path:
    """A checkpoint given on the command line, checked without loading it: an official EVF-SAM
    folder, a run directory, a DeepSpeed/FSDP directory, or a PyTorch (zip) file. A truncated or
    non-checkpoint file is refused here; the content is checked (safely) when it is loaded. A Hub id
    (`org/name[@revision]`, no local path of that name) passes: it is resolved when loaded."""
    from evfsam_lightning.hub import parse_hub_id  # omegaconf only: cheap

    if not Path(path).exists() and parse_hub_id(str(path)):
        return Path(path)
    p = existing_path(path, what)
    if p.is_dir():
        if (p / "config.json").is_file() or (p / "checkpoints").is_dir() or (p / "latest").is_file() \
                or any(p.glob("*.distcp")) or any(p.glob("*/mp_rank_*_model_states.pt")) \
                or any(p.glob("*/zero_pp_rank_*")):
            return p
        raise UserError(f"{what} {p}: a directory that holds no checkpoint (expected an EVF-SAM folder with "
                        "config.json, a run directory, or a DeepSpeed/FSDP checkpoint directory)")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} {p}: permission denied (check the file's permissions)")
    if not zipfile.is_zipfile(p):
        raise UserError(f"{what} {p}: not a PyTorch checkpoint (not a complete zip archive: truncated, "
                        "damaged, or another kind of file)")
    return p


def output_path(path: str | os.PathLike, what: str = "--out", *, folder: bool = False) -> Path:
    """`path` as a place to write a file (or, with `folder`, a folder): refused at once when a part of
    it is an existing file, or when a file is wanted and it is an existing folder."""
    p = Path(path)
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {p}: {parent} is a file, not a folder (choose another {what})")
            break
    if p.exists() and p.is_dir() != folder:
        kind = "a folder" if p.is_dir() else "a file"
        raise UserError(f"{what} {p} is {kind}; a {'folder' if folder else 'file'} is written there")
    return p
