"""Load any checkpoint for inference, evaluation and export, and consolidate sharded ones.

Accepted: an EVF-SAM folder in the official layout (released or exported; also as a Hub id
`org/name[@revision]`), a training checkpoint
written by `evfsam-train` (`.ckpt`, self-contained: config and tokenizer files travel inside),
DeepSpeed / FSDP2 checkpoint directories after `consolidate` (or directly: they are consolidated
into a temporary file first), and a run directory (its best checkpoint by validation cIoU).
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from evfsam_lightning.models import checkpoints as ck

TOKENIZER_KEY = "tokenizer_files"


def tokenizer_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer files of a folder as bytes (they travel inside training checkpoints)."""
    folder = Path(folder)
    files = {n: (folder / n).read_bytes() for n in ck.TOKENIZER_FILES if (folder / n).is_file()}
    if ck.TOKENIZER_FILES[0] not in files:
        raise FileNotFoundError(f"tokenizer: {folder / ck.TOKENIZER_FILES[0]} not found")
    return files


def write_tokenizer(files: dict[str, bytes], folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if name not in ck.TOKENIZER_FILES:  # names come from a file: never write outside the folder
            raise ck.CheckpointError(f"unexpected tokenizer file name {name!r} in checkpoint")
        (folder / name).write_bytes(data)
    return folder


@contextmanager
def tokenizer_folder(files: dict[str, bytes]):
    """Tokenizer files (as checkpoints and loaded tokenizers carry them) written to a temporary
    folder for the duration of the block: what the data pipeline and the exporter read."""
    with tempfile.TemporaryDirectory(prefix="evfsam-tokenizer-") as tmp:
        yield write_tokenizer(files, tmp)


def is_sharded(path: str | os.PathLike) -> str | None:
    """"deepspeed" or "fsdp" for a sharded checkpoint directory, else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "latest").is_file() or any(path.glob("*/mp_rank_*_model_states.pt")) \
            or any(path.glob("*/zero_pp_rank_*")):
        return "deepspeed"
    if any(path.glob("*.distcp")):
        return "fsdp"
    return None


def consolidate(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A DeepSpeed or FSDP2 checkpoint directory -> one `.ckpt` file loadable without the strategy
    (same content as a DDP checkpoint: config, tokenizer, full fp32 `state_dict`)."""
    path, out = Path(path), Path(out)
    kind = is_sharded(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if kind == "deepspeed":
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(tmp))
    elif kind == "fsdp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(str(path), str(tmp))
        state = torch.load(str(tmp), map_location="cpu", weights_only=True)
        meta = path / "meta.pt"
        if meta.is_file():  # non-tensor entries Lightning keeps beside the DCP files
            state.update(torch.load(str(meta), map_location="cpu", weights_only=True))
        for key in [k for k in state if k.startswith("optimizer")]:  # Lightning names them optimizer_<i>
            del state[key]
        torch.save(state, str(tmp))
    else:
        raise ck.CheckpointError(f"{path} is not a DeepSpeed or FSDP checkpoint directory")
    os.replace(tmp, out)
    return out


def load_training_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, tokenizer, run config) from an `evfsam-train` checkpoint file."""
    from evfsam_lightning.config import config_from_dict
    from evfsam_lightning.data.tokenizer import load_tokenizer
    from evfsam_lightning.models.builders import build_model
    from evfsam_lightning.models.from_config import add_configured_lora, build_configured_model, model_size

    path = Path(path)
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ck.CheckpointError(f"training checkpoint {path}: refused, the file holds code or objects a checkpoint "
                                 "does not (unsafe pickle; only load checkpoints you trust)") from None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ck.CheckpointError(f"cannot read training checkpoint {path}: {type(e).__name__}: {first}") from e
    hp = ckpt.get("hyper_parameters", {})
    if "config" not in hp or "state_dict" not in ckpt:
        raise ck.CheckpointError(f"{path} is not an evfsam-train checkpoint (no config or state_dict)")
    cfg = config_from_dict(hp["config"])
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    left_out = set(ckpt.get("frozen_left_out") or ())
    if left_out:
        model = build_configured_model(cfg)  # frozen weights come back from their pretrained source
        missing = [k for k in model.state_dict() if k not in state and k not in left_out]
        if missing:
            raise ck.CheckpointError(f"{path} lacks weights it did not declare left out: {', '.join(missing[:10])}")
        # What was left out comes from the fp32 source even where a strategy's copy was saved.
        state = {k: v for k, v in state.items() if k not in left_out}
        ck.load_into(model, state, source=str(path), allow_missing=tuple(ck.SUBSETS))
    else:
        model = add_configured_lora(build_model(model_size(cfg.model), presence_head=cfg.model.presence_head), cfg)
        ck.load_into(model, state, source=str(path))
    if TOKENIZER_KEY not in ckpt:
        raise ck.CheckpointError(f"{path} carries no tokenizer files")
    with tokenizer_folder(ckpt[TOKENIZER_KEY]) as tok_dir:
        tokenizer = load_tokenizer(tok_dir)
    tokenizer.evfsam_files = ckpt[TOKENIZER_KEY]
    return model.to(device).eval(), tokenizer, cfg


def verify_if_marked(path: str | os.PathLike) -> None:
    """A checkpoint written by `evfsam-train` (it has a `.complete` marker) is checked against the
    sizes and checksums its marker records; a damaged one raises `DamagedCheckpoint` (a
    `CheckpointError`) naming the file. Files without a marker (exports, copies) load unverified."""
    from evfsam_lightning.training.callbacks import is_complete, verify_checkpoint

    if is_complete(path):
        verify_checkpoint(path)


def best_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint of a run directory to use: the complete one with the best validation cIoU
    (`best-...-ciouX.ckpt`), else the newest complete one; one whose files do not match its marker
    is skipped with a warning naming the file."""
    from evfsam_lightning.training.callbacks import (
        DamagedCheckpoint,
        find_resume_checkpoint,
        is_complete,
        verify_checkpoint,
    )

    folder = Path(run_dir) / "checkpoints"
    scored = []
    for ckpt in folder.glob("best-*"):
        match = re.search(r"ciou([0-9.]+?)(\.ckpt)?$", ckpt.name)
        if match and is_complete(ckpt):
            scored.append((float(match.group(1)), ckpt.name, ckpt))
    for _, _, ckpt in sorted(scored, reverse=True):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except DamagedCheckpoint as e:
            print(f"warning: skipping a damaged checkpoint: {e}", file=sys.stderr)
    newest = find_resume_checkpoint(folder, verify=True)
    if newest is None:
        raise FileNotFoundError(f"run directory {run_dir}: no complete checkpoint in {folder}")
    return newest


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, tokenizer) from any accepted checkpoint (see the module docstring), from a run
    directory (`runs/<name>`: its best checkpoint, see `best_checkpoint`), or from a Hugging Face
    Hub id `org/name[@revision]` of an EVF-SAM folder (`evfsam_lightning.hub.resolve`)."""
    from evfsam_lightning.hub import resolve

    path = resolve(path, "checkpoint")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = best_checkpoint(path)
        print(f"run directory: using {path}", file=sys.stderr)
    verify_if_marked(path)
    if path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = ck.load_reference_folder(path, device=device)
        tokenizer.evfsam_files = tokenizer_files(path)
        return model.eval(), tokenizer
    if is_sharded(path):
        with tempfile.TemporaryDirectory() as tmp:
            model, tokenizer, _ = load_training_checkpoint(consolidate(path, Path(tmp) / "full.ckpt"), device)
        return model, tokenizer
    model, tokenizer, _ = load_training_checkpoint(path, device)
    return model, tokenizer
