"""The demo's corpus: text files (default: this Python's standard library) or a pre-tokenised token file, read
and split into training and validation parts. Reads only; writes nothing."""

from __future__ import annotations

import glob
import math
import os
import platform
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from letkit.demo.cache import CACHE_FORMAT, content_hash
from letkit.demo.config import DemoError, Log


@dataclass
class Corpus:
    """A corpus split into training and validation parts: text documents, or token ids for pre-tokenised files."""

    description: str
    key: str
    train_docs: list[str] = field(default_factory=list)
    val_docs: list[str] = field(default_factory=list)
    train_tokens: np.ndarray | None = None
    val_tokens: np.ndarray | None = None

    @property
    def pretokenized(self) -> bool:
        return self.train_tokens is not None


def stdlib_corpus_files() -> list[Path]:
    """The running interpreter's top-level standard-library ``*.py`` files, sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (NUL bytes or invalid UTF-8). Unreadable -> DemoError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DemoError(f"cannot read corpus file {str(path)!r}: {e.strerror or e}") from e
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_corpus(spec: str | None, *, val_fraction: float, bin_dtype: str = "uint16", log: Log = print) -> Corpus:
    """Read and split the corpus named by ``spec`` (see :class:`DemoConfig`). Reads only; writes nothing."""
    if spec is None:
        files = stdlib_corpus_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        if not files:
            raise DemoError(f"found no *.py files in the standard library directory {str(root)!r}; pass --corpus")
        description = f"Python {platform.python_version()} standard library ({len(files)} top-level .py files)"
        return _split_text(_read_documents(files, root, skip_binary=True, log=log), description, val_fraction)
    path = Path(spec).expanduser()
    if not _is_glob(spec) and path.suffix in (".npy", ".bin"):
        return _load_token_file(path, val_fraction, bin_dtype)
    if _is_glob(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise DemoError(f"--corpus glob {spec!r} matches no files")
        root, skip_binary = Path(os.path.commonpath([str(f.parent) for f in files])), True
    elif path.is_dir():
        try:
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        except OSError as e:
            raise DemoError(f"cannot list corpus directory {spec!r}: {e.strerror or e}") from e
        if not files:
            raise DemoError(f"corpus directory {spec!r} contains no files")
        root, skip_binary = path, True
    elif path.is_file():
        files, root, skip_binary = [path], path.parent, False
    elif not path.exists():
        raise DemoError(f"--corpus {spec!r} does not exist")
    else:
        raise DemoError(f"--corpus {spec!r} is neither a file nor a directory")
    docs = _read_documents(files, root, skip_binary=skip_binary, log=log)
    return _split_text(docs, f"{spec} ({len(docs)} text files)", val_fraction)


def _read_documents(files: Sequence[Path], root: Path, *, skip_binary: bool, log: Log) -> list[tuple[str, str]]:
    docs, binary = [], []
    for f in files:
        text = _read_text(f)
        if text is None:
            if not skip_binary:
                raise DemoError(
                    f"corpus file {str(f)!r} is not UTF-8 text (it contains NUL bytes or invalid UTF-8); a pre-tokenised "
                    "corpus must be a .npy file or a raw .bin token file"
                )
            binary.append(f)
            continue
        docs.append((f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f), text))
    if binary:
        names = ", ".join(str(b) for b in binary[:3]) + (", ..." if len(binary) > 3 else "")
        if not docs:
            raise DemoError(f"the corpus has no text files: all {len(binary)} files are binary (not UTF-8 text): {names}")
        log(f"corpus: skipped {len(binary)} binary (non-UTF-8) files: {names}")
    if not any(text.strip() for _, text in docs):
        raise DemoError(f"the corpus is empty: its {len(docs)} text files contain no text")
    return docs


def _split_text(docs: list[tuple[str, str]], description: str, val_fraction: float) -> Corpus:
    """Split the concatenated documents at the first line break after ``(1 - val_fraction)`` of the characters."""
    key = content_hash(CACHE_FORMAT, "text", str(val_fraction), *(part for name, text in docs for part in (name, text)))
    total = sum(len(text) for _, text in docs)
    cut = math.floor(total * (1 - val_fraction))
    train, val, seen = [], [], 0
    for _, text in docs:
        if seen + len(text) <= cut:
            train.append(text)
        elif seen >= cut:
            val.append(text)
        else:
            newline = text.find("\n", cut - seen)
            at = len(text) if newline < 0 else newline + 1
            train.append(text[:at])
            val.append(text[at:])
        seen += len(text)
    return Corpus(description, key, [t for t in train if t], [t for t in val if t])


def _load_token_file(path: Path, val_fraction: float, bin_dtype: str) -> Corpus:
    if not path.is_file():
        raise DemoError(f"--corpus {str(path)!r} does not exist" if not path.exists() else f"--corpus {str(path)!r} is not a file")
    try:
        if path.suffix == ".npy":
            tokens = np.load(path, allow_pickle=False, mmap_mode="r")
            what = f"{path} (.npy, {tokens.dtype})"
        else:
            tokens = np.fromfile(path, dtype=bin_dtype)
            what = f"{path} (raw .bin, {bin_dtype})"
    except (OSError, ValueError) as e:
        raise DemoError(f"cannot read token file {str(path)!r}: {e}") from e
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DemoError(f"token file {str(path)!r} must hold a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
    if tokens.size and tokens.min() < 0:
        raise DemoError(f"token file {str(path)!r} contains negative token ids (min {tokens.min()})")
    tokens = np.array(tokens, dtype=np.int64)
    cut = math.floor(len(tokens) * (1 - val_fraction))
    key = content_hash(CACHE_FORMAT, "tokens", str(val_fraction), tokens.tobytes())
    return Corpus(f"{what}, {len(tokens)} tokens", key, train_tokens=tokens[:cut], val_tokens=tokens[cut:])
