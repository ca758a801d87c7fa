"""Hub model names resolved to checkpoint directories in the local Hugging Face cache, read offline: letkit never
downloads anything."""

from __future__ import annotations

import os
import re
from pathlib import Path

from letkit.models.checkpoint_files import CONFIG_NAME, CheckpointError

_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}", re.ASCII)
_REVISION = re.compile(r"[\w.-]+(?:/[\w.-]+)*", re.ASCII)
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, where ``hf download`` puts models: ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    hf_home = os.environ.get("HF_HOME") or os.path.join(cache_home, "huggingface")
    return Path(os.path.expandvars(hf_home)).expanduser() / "hub"


def resolve_pretrained(name_or_path: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """The local checkpoint directory for ``name_or_path``: the directory itself if it exists, else the snapshot of
    hub model ``org/name`` in the Hugging Face cache (:func:`hub_cache_dir`), read offline and never downloaded.

    The cache layout is ``models--org--name/snapshots/<commit>/`` (files there are symlinks into ``blobs/``), with
    ``refs/<branch or tag>`` holding the commit of each revision downloaded.

    Args:
        name_or_path: a checkpoint directory, or a hub name such as ``"HuggingFaceTB/SmolLM-135M"``.
        revision: for hub names: a branch or tag (its commit read from ``refs/``) or a 40-hex commit hash;
            None means ``main``.

    Raises:
        FileNotFoundError: neither a directory nor a model in the cache (the message says where it looked and the
            command that downloads it), or a cached snapshot without config.json (an incomplete download).
        ValueError: a ``revision`` for a local directory, or one that is not a plain branch, tag or commit name.
        CheckpointError: a cache ``refs/`` file that does not hold a commit hash.
    """
    if Path(name_or_path).is_dir():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} applies to hub names, but {str(name_or_path)!r} is a local directory"
            )
        return Path(name_or_path)
    name = os.fspath(name_or_path)
    if not _REPO_ID.fullmatch(name) or "--" in name or ".." in name:
        raise FileNotFoundError(
            f"{name!r} is not a directory, nor a hub model name of the form 'org/name': pass a local checkpoint "
            "directory (config.json + *.safetensors) or the name of a model in the Hugging Face cache"
        )
    if revision is not None and (not isinstance(revision, str) or not _REVISION.fullmatch(revision)
                                 or ".." in revision.split("/")):
        raise ValueError(f"revision must be a branch, tag or commit name, got {revision!r}")
    rev = revision or "main"
    download = f"`hf download {name}{f' --revision {rev}' if revision else ''}` (or `huggingface-cli download ...`)"
    cache = hub_cache_dir()
    repo = cache / f"models--{name.replace('/', '--')}"
    if not repo.is_dir():
        raise FileNotFoundError(
            f"{name!r} is not a local directory, and the Hugging Face cache {cache} has no {repo.name} (the cache is "
            "$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub). letkit reads local files only: run "
            f"{download} where the hub is reachable, with the same cache settings, or pass the checkpoint directory"
        )
    commit = rev
    if not _COMMIT_HASH.fullmatch(rev):
        ref = repo / "refs" / rev
        if not ref.is_file():
            snapshots = sorted(p.name for p in (repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
            raise FileNotFoundError(
                f"{name!r}: the Hugging Face cache has no revision {rev!r} ({ref} does not exist; cached snapshots: "
                f"{snapshots or 'none'}). Run {download}, or pass revision=<one of the cached commits>"
            )
        commit = ref.read_text(errors="replace").strip()
        if not _COMMIT_HASH.fullmatch(commit):
            raise CheckpointError(f"{ref} should hold a 40-hex commit hash, got {commit[:80]!r}")
    snapshot = repo / "snapshots" / commit
    if not (snapshot / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{name!r} revision {rev!r}: {snapshot} has no {CONFIG_NAME} (not downloaded, or the download is "
            f"incomplete). Run {download}"
        )
    return snapshot

