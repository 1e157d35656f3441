"""Resolve a checkpoint or base given as a local path or a Hugging Face hub id.

A reference that exists on disk is a local path; otherwise one that looks like a hub id
(`name` or `org/name`) is resolved through `huggingface_hub`'s cache: `HF_HUB_CACHE`, else
`HF_HOME/hub`, else `~/.cache/huggingface/hub`, read when the call is made (huggingface_hub reads
its own constants once, at import). With `HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`) nothing is
requested from the network: the cache must hold the files. A revision (branch, tag or commit hash)
pins what is read; the commit actually read is recorded.

Only what loading needs is fetched: the checkpoint's single weight file (`model.safetensors` first,
then `pytorch_model.bin`, the order of the official CODI `test.py`; failing both, the Coconut
training's `checkpoint_N` files), and the base's config and tokenizer files (the checkpoint holds
every weight, the frozen base weights included).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from interp.loading.checkpoint import CHECKPOINT_FILES, COCONUT_FILE_RE, CheckpointError

#: the official CODI releases -> the base each was trained on (the default `base`)
OFFICIAL_BASES = {
    "zen-E/CODI-gpt2": "gpt2",
    "zen-E/CODI-llama3.2-1b-Instruct": "meta-llama/Llama-3.2-1B-Instruct",
}
#: the base files loading reads (config + every tokenizer format); weights are not fetched
BASE_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
]
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
LOGIN = "log in with `huggingface-cli login` or set HF_TOKEN"


@dataclass(frozen=True)
class Resolved:
    """Where a checkpoint or base was found: `path` on disk, and for hub ids the repo and commit."""

    ref: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def provenance(self) -> dict[str, Any]:
        """{"ref", "path"} and for hub ids {"repo_id", "revision", "commit"}: for run.json."""
        out: dict[str, Any] = {"ref": self.ref, "path": str(self.path)}
        if self.repo_id is not None:
            out.update(repo_id=self.repo_id, revision=self.revision, commit=self.commit)
        return out


def hub_cache_dir() -> Path:
    """The hub cache directory, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HUGGINGFACE_HUB_CACHE"])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_hub_id(ref: str) -> bool:
    """`name` or `org/name` that is not an existing path."""
    return bool(HUB_ID_RE.match(ref)) and not Path(ref).expanduser().exists()


def default_base(checkpoint: str) -> str:
    """The base of an official CODI release; a clear error for any other checkpoint."""
    for repo_id, base in OFFICIAL_BASES.items():
        if checkpoint.lower() == repo_id.lower():
            return base
    raise CheckpointError(
        f"no default base for checkpoint {checkpoint!r} (defaults exist for {', '.join(OFFICIAL_BASES)}): pass base=, the local directory or hub id of the model it was trained on (e.g. gpt2)"
    )


def _miss(what: str, repo_id: str, revision: str | None, cache: Path) -> CheckpointError:
    rev = f" (revision {revision})" if revision else ""
    return CheckpointError(
        f"{what} {repo_id!r}{rev} is not in the Hugging Face cache {cache} and the Hub cannot be reached "
        f"(HF_HUB_OFFLINE is set, or no network): download it once online (`huggingface-cli download {repo_id}`), "
        "point HF_HOME / HF_HUB_CACHE at a cache that holds it, or pass a local directory"
    )


def _hub_error(exc: Exception, what: str, repo_id: str, revision: str | None, cache: Path) -> CheckpointError:
    """One line for each way a hub look-up fails."""
    if isinstance(exc, GatedRepoError):
        return CheckpointError(f"{what} {repo_id!r} is gated on the Hugging Face Hub: accept its licence on the model's Hub page, then {LOGIN} (a token of the account that was granted access)")
    if isinstance(exc, RepositoryNotFoundError):
        return CheckpointError(f"{what} {repo_id!r} was not found on the Hugging Face Hub: check the id, or if it is private, {LOGIN}")
    if isinstance(exc, RevisionNotFoundError):
        return CheckpointError(f"{what} {repo_id!r} has no revision {revision!r}: pass an existing branch, tag or commit hash")
    return _miss(what, repo_id, revision, cache)


HUB_ERRORS = (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError)


def _local(ref: str | Path, what: str) -> Resolved | None:
    path = Path(ref).expanduser()
    if path.exists():
        return Resolved(ref=str(ref), path=path)
    if not is_hub_id(str(ref)):
        raise CheckpointError(f"{what} {str(ref)!r} does not exist: pass a local path or a Hugging Face hub id (org/name)")
    return None


def _coconut_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The snapshot folder of a hub repo holding Coconut `checkpoint_N` files (fetched unless offline), or None."""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=hub_offline(), allow_patterns=["checkpoint_*"]))
    except LocalEntryNotFoundError:
        return None
    except HUB_ERRORS as exc:
        raise _hub_error(exc, "checkpoint", repo_id, revision, cache) from None
    return folder if any(COCONUT_FILE_RE.match(p.name) for p in folder.iterdir()) else None


def resolve_checkpoint(ref: str | Path, revision: str | None = None) -> Resolved:
    """A local checkpoint path as given, or a hub id's weight file from the cache (or downloaded):
    the CODI file, or else the snapshot folder of its Coconut `checkpoint_N` files."""
    local = _local(ref, "checkpoint")
    if local is not None:
        return local
    repo_id, cache = str(ref), hub_cache_dir()
    if hub_offline():
        for name in CHECKPOINT_FILES:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache, revision=revision)
            if isinstance(found, str):
                path = Path(found)
                return Resolved(str(ref), path, repo_id, revision, path.parent.name)
    else:
        for name in CHECKPOINT_FILES:
            try:
                path = Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache))
            except RemoteEntryNotFoundError:
                continue
            except HUB_ERRORS as exc:
                raise _hub_error(exc, "checkpoint", repo_id, revision, cache) from None
            return Resolved(str(ref), path, repo_id, revision, path.parent.name)
    folder = _coconut_snapshot(repo_id, revision, cache)
    if folder is not None:
        return Resolved(str(ref), folder, repo_id, revision, folder.name)
    if hub_offline():
        raise _miss("checkpoint", repo_id, revision, cache)
    raise CheckpointError(f"checkpoint {repo_id!r} holds neither {' nor '.join(CHECKPOINT_FILES)} nor checkpoint_N files: is it a CODI or Coconut checkpoint?")


def resolve_base(ref: str | Path, revision: str | None = None) -> Resolved:
    """A local base directory as given, or a hub id's config and tokenizer files (a snapshot folder)."""
    local = _local(ref, "base")
    if local is not None:
        return local
    repo_id, cache = str(ref), hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=hub_offline(), allow_patterns=BASE_FILES)
    except HUB_ERRORS as exc:
        raise _hub_error(exc, "base", repo_id, revision, cache) from None
    path = Path(folder)
    return Resolved(str(ref), path, repo_id, revision, path.name)
