"""Hugging Face Hub ids wherever a checkpoint or tokenizer folder is accepted.

`org/name` or `org/name@revision` (a branch, tag or commit) is resolved to a local snapshot folder
by `huggingface_hub.snapshot_download`: its cache (`HF_HOME` / `HF_HUB_CACHE`), `HF_HUB_OFFLINE=1`,
and the token from the usual place (`HF_TOKEN`, `huggingface-cli login`). A local path of the same
name wins, so `runs/quickstart` is never looked up on the Hub when it exists here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from evfsam_lightning.config import ConfigError

#: `org/name[@revision]`: the Hub's repo-id characters; the revision may hold '/' (a branch such as refs/pr/1).
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")


def parse_hub_id(value: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `value` has a Hub id's form, else None."""
    match = HUB_ID.match(value)
    if match is None or value.endswith((".ckpt", ".pth", ".pt", ".safetensors", ".bin")):
        return None
    return match.group("repo"), match.group("revision")


def resolve(value: str | os.PathLike, what: str = "checkpoint") -> Path:
    """A local path when it exists (or when `value` is no Hub id: the caller reports it missing),
    else the local snapshot folder of the Hub id `value`, downloaded or taken from the cache.

    Raises `ConfigError` (one line naming `what` and the id) when the id cannot be resolved:
    offline with nothing cached, an unknown repository or revision, a gated repository."""
    local = Path(value).expanduser()
    if local.exists():
        return local
    parsed = parse_hub_id(str(value))
    if parsed is None:
        return local
    repo, revision = parsed
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{what} {value}: no such local path, and as a Hugging Face Hub id"
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(f"{where}: HF_HUB_OFFLINE is set and {repo}"
                              f"{'@' + revision if revision else ''} is not in the cache "
                              f"{constants.HF_HUB_CACHE}") from None
        raise ConfigError(f"{where}: not in the cache {constants.HF_HUB_CACHE} and the Hub cannot be "
                          "reached") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{where}: {repo} has no revision {revision!r}") from None
    except GatedRepoError:
        raise ConfigError(f"{where}: {repo} is gated: accept its terms on the Hub and log in "
                          "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}: no repository {repo} (or it is private: log in with `hf auth login` "
                          "or set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None


# -- model cards and upload ------------------------------------------------------------------------
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")
_BEST_CHECKPOINT = re.compile(r"^best-step(?P<step>\d+)-ciou(?P<ciou>[0-9.]+?)(\.ckpt)?$")


def hub_id_of(value: str | None) -> str | None:
    """The Hub id behind `value`: the id itself, or that of a snapshot folder of the Hub cache (what
    a run's config holds once `model.pretrained=org/name` was resolved)."""
    if not value:
        return None
    if parse_hub_id(value) and not Path(value).exists():
        return parse_hub_id(value)[0]
    match = _CACHE_SNAPSHOT.search(Path(value).as_posix())
    return f"{match.group('org')}/{match.group('name')}" if match else None


def run_dir_of(checkpoint: str | os.PathLike) -> Path | None:
    """The `evfsam-train` run directory a checkpoint comes from (`runs/<name>` itself, or the folder
    above its `checkpoints/`), when it has the run's `config.yaml`."""
    path = Path(checkpoint)
    for candidate in (path, path.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


def _evaluations(files: list[Path]) -> list[tuple[str, dict]]:
    """(split, {giou, ciou}) of every `evfsam-eval --out` JSON among `files` (others are passed over)."""
    import json

    found = []
    for file in files:
        try:
            results = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(results, dict) and isinstance(results.get("splits"), dict) and "checkpoint" in results \
                and not results.get("shuffled_expressions"):  # the text-blind control is no result of the model
            found.extend((name, r) for name, r in results["splits"].items()
                         if isinstance(r, dict) and {"giou", "ciou"} <= r.keys())
    return found


def model_card(checkpoint: str | os.PathLike, name: str, license: str = "apache-2.0",
               results: list[str | os.PathLike] = (), repo_id: str | None = None):
    """A `huggingface_hub.ModelCard` (the `README.md` of an exported folder named `name`): the Hub's metadata (license,
    library_name, pipeline_tag, base_model, datasets) and, as model-index, the evaluation results
    found in the checkpoint's run (`evfsam-eval --out` JSON files under the run directory, and the
    validation cIoU of a `best-...-ciou...` checkpoint) and in the `results` files given; its usage
    example names `repo_id` (the repository it is pushed to) when given."""
    import yaml
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    run_dir = run_dir_of(checkpoint)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if run_dir else {}
    model = config.get("model") or {}
    data = config.get("data") or {}
    base_model = hub_id_of(model.get("pretrained"))
    datasets = [s["name"] for s in data.get("train") or []] or (["synthetic"] if data.get("synthetic") else [])
    task = {"task_type": "image-segmentation", "task_name": "Referring expression segmentation"}
    files = [*(sorted(run_dir.rglob("*.json")) if run_dir else []), *map(Path, results)]
    evaluations = []
    for split, r in _evaluations(files):
        for metric, label in (("giou", "gIoU"), ("ciou", "cIoU")):
            evaluations.append(EvalResult(**task, dataset_type=split, dataset_name=split, metric_type=metric,
                                      metric_name=label, metric_value=round(100 * float(r[metric]), 2)))
    best = _BEST_CHECKPOINT.match(Path(checkpoint).name)
    if best:
        val = "+".join(s["name"] for s in data.get("val") or []) or ("synthetic" if data.get("synthetic")
                                                                      else "validation")
        evaluations.append(EvalResult(**task, dataset_type=val, dataset_name=val, dataset_split="validation",
                                  metric_type="ciou", metric_name="cIoU",
                                  metric_value=round(100 * float(best.group("ciou")), 2)))
    card_data = ModelCardData(
        license=license, library_name="evfsam-lightning", pipeline_tag="image-segmentation",
        base_model=base_model, datasets=datasets or None, model_name=name, eval_results=evaluations or None,
        tags=["evf-sam", "segment-anything", "referring-expression-segmentation", "text-prompted-segmentation"])
    lines = [f"# {name}", "",
             "EVF-SAM (early vision-language fusion for text-prompted Segment Anything): a BEiT-3 encoder reads the "
             "image and the sentence together and prompts a SAM mask decoder. This folder has the official EVF-SAM "
             "layout (`config.json`, `model.safetensors` under the official key names, the XLM-R tokenizer), "
             "so the reference inference code opens it too.", ""]
    if base_model:
        lines += [f"Fine-tuned from [{base_model}](https://huggingface.co/{base_model}).", ""]
    if datasets:
        lines += [f"Training data: {', '.join(datasets)}.", ""]
    if evaluations:
        lines += ["| data | metric | value |", "|---|---|---|"]
        lines += [f"| {r.dataset_name} | {r.metric_name} | {r.metric_value:.2f} |" for r in evaluations]
        lines.append("")
    lines += ["## Use", "", "```", "pip install evfsam-lightning",
              f"evfsam-predict --checkpoint {repo_id or 'ORG/' + name} --image photo.jpg --text \"the dog on the left\" --out mask.png",
              "```", ""]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False, dry_run: bool = False) -> list[str]:
    """Upload an exported folder to the Hub repository `repo_id` (created if absent, `private` then),
    with `huggingface_hub.upload_folder` and the usual token. With `dry_run` nothing is sent: returns
    the files (with sizes) that would go."""
    folder = Path(folder)
    if parse_hub_id(repo_id) is None or "@" in repo_id:
        raise ConfigError(f"--push-to-hub {repo_id!r}: expected a Hub repository id org/name")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    listing = [f"{p.relative_to(folder).as_posix()} ({p.stat().st_size} bytes)" for p in files]
    if dry_run:
        return listing
    import httpx
    from huggingface_hub import create_repo, upload_folder
    from huggingface_hub.errors import HfHubHTTPError

    try:
        create_repo(repo_id, private=private, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"Upload {folder.name} (evfsam-export)")
    except (HfHubHTTPError, OSError, httpx.HTTPError) as e:  # OSError: offline mode, no connection
        raise ConfigError(f"--push-to-hub {repo_id}: {type(e).__name__}: {str(e).splitlines()[0]} "
                          f"(the export in {folder} is complete)") from None
    return listing
