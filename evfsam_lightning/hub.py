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
