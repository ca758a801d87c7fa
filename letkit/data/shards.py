"""Text files -> token shards on disk: :func:`tokenize_corpus`, or ``letkit tokenize`` / ``python -m letkit.data``::

    letkit tokenize corpus/ --tokenizer tokenizer.json --output data/shards --workers 16

* Inputs are ``.txt`` files (one document per line) and ``.jsonl`` files (one JSON object per line, the
  document under ``text_key``), UTF-8; directories are searched recursively. Empty documents are skipped and an
  end-of-sequence token follows every document. A binary file (a NUL byte in its first 8 KiB) is skipped with a
  warning; bytes that are not UTF-8 are tokenized as U+FFFD, and the run ends with a warning naming the number of
  such files and the first one.
* Files are tokenized in parallel (one worker process per file at a time) and streamed: a file is read line
  by line and written out in shards of about ``shard_tokens`` tokens (cut at document boundaries), as
  ``uint16`` when the vocabulary fits, else ``uint32``.
* Resumable: every shard is written atomically (temporary file + rename) and recorded in its source's
  manifest together with the byte offset it ends at. A rerun skips finished files, continues an interrupted
  file after its last finished shard, and restarts a file whose size or mtime changed. Manifests are named
  after their file's path, so a rerun over a changed set of files (one deleted, or other inputs) reuses every
  file still present and unchanged; the index lists exactly the files of the last run, and the shards of
  files left out stay in ``parts/`` for a later run over them. Ctrl-C stops every worker; rerun to resume.
* ``index.json`` is written last; loaders refuse a directory without it (an unfinished tokenization).

Layout of the output directory::

    tokenize.json              settings; a rerun with different settings is refused
    tokenizer.json             a copy of the tokenizer (its SHA-256 is in index.json)
    parts/<id>.json            manifest of the source file whose path hashes to <id>: its path, size and mtime,
                               its shards, the byte offset each ends at, complete?
    parts/<id>-00000.npy       the file's shard 0 (a 1-D .npy array, read with numpy.memmap)
    index.json                 all shards in order, token counts, dtype, vocab size, eos id
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from letkit.atomic import atomic_write, atomic_write_json, remove_stale_temporaries
from letkit.validation import check_int

log = logging.getLogger(__name__)

INDEX_FORMAT = "letkit-token-shards-v1"
SETTINGS_FORMAT = "letkit-tokenize-v2"  # v2: parts/ named by _source_id (v1: by position in the sorted source list)
TEXT_SUFFIXES = (".txt", ".jsonl")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
ENCODE_BATCH_DOCS = 512
BINARY_PROBE_BYTES = 8192


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id of a ``vocab_size`` vocabulary fits, else ``uint32``."""
    vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def find_sources(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The text files named by ``inputs`` (files, or directories searched recursively), sorted and deduplicated."""
    sources: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            sources.update(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise ValueError(f"input {str(path)!r} is neither a {' nor a '.join(TEXT_SUFFIXES)} file")
            sources.add(path)
        else:
            raise ValueError(f"input {str(path)!r} does not exist")
    if not sources:
        raise ValueError(f"no {'/'.join(TEXT_SUFFIXES)} files found in inputs {[str(i) for i in inputs]}")
    return sorted(p.resolve() for p in sources)


def _iter_documents(path: Path, start: int, text_key: str) -> Iterator[tuple[str, int, bool]]:
    """``(document, byte offset just after it, undecodable)`` for the documents of ``path`` from byte offset ``start``
    on; ``undecodable``: the line was not valid UTF-8, and its invalid bytes were replaced by U+FFFD."""
    offset = start
    with open(path, "rb") as f:
        f.seek(start)
        for line_number, line in enumerate(f, 1):
            offset += len(line)
            try:
                decoded, undecodable = line.decode("utf-8"), False
            except UnicodeDecodeError:
                decoded, undecodable = line.decode("utf-8", errors="replace"), True
            if path.suffix == ".jsonl":
                if not decoded.strip():
                    continue
                try:
                    record = json.loads(decoded)
                    text = record[text_key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{path} (line {line_number} after byte {start}): expected a JSON object with a string "
                        f"{text_key!r} field ({type(e).__name__}: {e})"
                    ) from None
                if not isinstance(text, str):
                    raise ValueError(f"{path} (line {line_number} after byte {start}): {text_key!r} is not a string")
            else:
                text = decoded.rstrip("\r\n")
            if text.strip():
                yield text, offset, undecodable


def _is_binary(path: Path) -> bool:
    """A NUL byte in the first ``BINARY_PROBE_BYTES`` bytes (the test git uses): not a text file."""
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_PROBE_BYTES)


_worker_tokenizer = None


def _init_worker(tokenizer_path: str, parallel: bool) -> None:
    global _worker_tokenizer
    from tokenizers import Tokenizer

    if not parallel:  # a pool worker
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent handles it
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per file uses the cores; no nested thread pools
    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)


def _source_id(source: str) -> str:
    """The name of a source file's manifest and shards in ``parts/``: a hash of its (resolved) path, so it does not
    depend on the other files of a run (a rerun over a changed set of files reuses every unchanged file's shards)."""
    return hashlib.sha256(source.encode()).hexdigest()[:20]


def _tokenize_source(task: tuple[str, str, dict[str, Any]]) -> tuple[str, dict[str, Any] | None, bool]:
    """Tokenize one source file into shards; returns ``(source, manifest, skipped)``, manifest None if it vanished."""
    source, out_dir, settings = task
    source_path, parts_dir, name = Path(source), Path(out_dir) / "parts", _source_id(source)
    try:
        stat = source_path.stat()
    except FileNotFoundError:  # deleted since the run listed it
        return source, None, False
    signature = {"source": source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    manifest_path = parts_dir / f"{name}.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if manifest is None or manifest["signature"] != signature:
        manifest = {"signature": signature, "parts": [], "complete": False, "binary": False, "undecodable_lines": 0}
    if manifest["complete"]:
        return source, manifest, True
    if not manifest["parts"] and _is_binary(source_path):
        manifest.update(complete=True, binary=True)
        atomic_write_json(manifest_path, manifest, indent=1)
        return source, manifest, False

    dtype, eos_id = np.dtype(settings["dtype"]), settings["eos_id"]
    shard_tokens = settings["shard_tokens"]
    buffer: list[np.ndarray] = []
    buffered = 0
    undecodable_lines = manifest["undecodable_lines"]  # up to the last shard written

    def flush(end_offset: int) -> None:
        nonlocal buffer, buffered
        shard = f"{name}-{len(manifest['parts']):05d}.npy"
        tokens = np.concatenate(buffer).astype(dtype, copy=False)
        atomic_write(parts_dir / shard, lambda f: np.save(f, tokens, allow_pickle=False))
        manifest["parts"].append({"file": shard, "tokens": int(tokens.size), "end_offset": end_offset})
        manifest["undecodable_lines"] = undecodable_lines
        atomic_write_json(manifest_path, manifest, indent=1)
        buffer, buffered = [], 0

    def encode(batch: list[tuple[str, int, bool]]) -> None:
        nonlocal buffered, undecodable_lines
        encodings = _worker_tokenizer.encode_batch([text for text, _, _ in batch], add_special_tokens=False)
        for encoding, (_, end_offset, undecodable) in zip(encodings, batch):
            ids = np.asarray(encoding.ids if eos_id is None else encoding.ids + [eos_id], dtype=np.int64)
            buffer.append(ids)
            buffered += ids.size
            undecodable_lines += undecodable
            if buffered >= shard_tokens:
                flush(end_offset)

    start = manifest["parts"][-1]["end_offset"] if manifest["parts"] else 0
    batch: list[tuple[str, int, bool]] = []
    last_offset = start
    for document in _iter_documents(source_path, start, settings["text_key"]):
        batch.append(document)
        last_offset = document[1]
        if len(batch) == ENCODE_BATCH_DOCS:
            encode(batch)
            batch = []
    if batch:
        encode(batch)
    if buffered:
        flush(last_offset)
    manifest.update(complete=True, undecodable_lines=undecodable_lines)
    atomic_write_json(manifest_path, manifest, indent=1)
    return source, manifest, False


def _resolve_eos(tokenizer, eos_token: str | None) -> int | None:
    if eos_token is None:
        return None
    if eos_token != "auto":
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
        return eos_id
    for candidate in EOS_CANDIDATES:
        eos_id = tokenizer.token_to_id(candidate)
        if eos_id is not None:
            return eos_id
    raise ValueError(
        f"eos_token='auto' found none of {list(EOS_CANDIDATES)} in the tokenizer: pass eos_token explicitly "
        "(or None to not separate documents)"
    )


def tokenize_corpus(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    tokenizer: str | os.PathLike,
    *,
    text_key: str = "text",
    eos_token: str | None = "auto",
    shard_tokens: int = 100_000_000,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Tokenize text files into token shards in ``output_dir`` (see the module docstring); returns the index.

    Args:
        inputs: ``.txt`` / ``.jsonl`` files or directories holding them.
        output_dir: where the shards, manifests and ``index.json`` go. Rerunning on the same directory
            resumes, also over another set of files (each file still present and unchanged is reused);
            rerunning with other settings (tokenizer, text_key, eos_token, shard_tokens) raises ValueError.
        tokenizer: a ``tokenizers`` ``tokenizer.json`` file (a directory holding one is accepted too).
        text_key: the document field of ``.jsonl`` records.
        eos_token: token appended after every document: ``"auto"`` (the first of ``<|endoftext|>``, ``</s>``,
            ``<eos>``, ``<|end_of_text|>``, ``[SEP]`` in the vocabulary), a token string, or None for none.
        shard_tokens: a shard is closed at the first document boundary once it holds this many tokens.
        num_workers: processes tokenizing files in parallel (default: CPU count, at most the number of files).
            With one worker the files are tokenized in this process, with ``tokenizers``' own threads.
    """
    from tokenizers import Tokenizer

    shard_tokens = check_int("shard_tokens", shard_tokens, minimum=1)
    num_workers = check_int("num_workers", num_workers, minimum=1, optional=True)
    tokenizer_path = Path(tokenizer)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ValueError(f"tokenizer {str(tokenizer)!r} is not a tokenizer.json file or a directory holding one")
    sources = find_sources(inputs)
    loaded = Tokenizer.from_file(str(tokenizer_path))
    vocab_size = loaded.get_vocab_size(with_added_tokens=True)
    settings = {
        "format": SETTINGS_FORMAT,
        "tokenizer_sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size).name,
        "eos_id": _resolve_eos(loaded, eos_token),
        "text_key": text_key,
        "shard_tokens": shard_tokens,
    }
    out = Path(output_dir)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # half-written files of an interrupted run
    settings_path = out / "tokenize.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            raise ValueError(
                f"output_dir {str(out)!r} holds a tokenization with other settings ({', '.join(changed)} differ): "
                "use a new output_dir or delete this one"
            )
    else:
        atomic_write_json(settings_path, settings, indent=1)
    tokenizer_bytes, tokenizer_copy = tokenizer_path.read_bytes(), out / "tokenizer.json"
    if not tokenizer_copy.is_file() or tokenizer_copy.read_bytes() != tokenizer_bytes:  # for checks against a teacher's
        atomic_write(tokenizer_copy, lambda f: f.write(tokenizer_bytes))
    (out / "index.json").unlink(missing_ok=True)  # stale until every source is done again

    _report_absent_sources(out, sources)
    workers = min(num_workers or os.cpu_count() or 1, len(sources))
    tasks = [(str(s), str(out), settings) for s in sources]
    manifests: dict[str, dict[str, Any] | None] = {}
    started = time.perf_counter()
    if workers == 1:
        _init_worker(str(tokenizer_path), parallel=True)
        results: Iterator = map(_tokenize_source, tasks)
        pool = None
    else:
        # Workers run only tokenizers and numpy: forking spares each one re-importing torch (spawn elsewhere).
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (str(tokenizer_path), False))
        results = pool.imap_unordered(_tokenize_source, tasks)
    try:
        for source, manifest, skipped in results:
            manifests[source] = manifest
            if manifest is None:
                log.warning("[%d/%d] %s: deleted during the run, left out", len(manifests), len(tasks), source)
                continue
            if manifest["binary"]:
                log.warning("[%d/%d] %s: skipped, binary (a NUL byte in its first %d bytes)", len(manifests),
                            len(tasks), source, BINARY_PROBE_BYTES)
                continue
            tokens = sum(p["tokens"] for p in manifest["parts"])
            state = "already done" if skipped else f"{time.perf_counter() - started:.1f}s"
            log.info("[%d/%d] %s: %d tokens in %d shards (%s)", len(manifests), len(tasks), source,
                     tokens, len(manifest["parts"]), state)
    except BaseException:
        if pool is not None:  # stop the other files now (Ctrl-C, or an error in one file): every write is atomic
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    done = [manifests[str(s)] for s in sources if manifests[str(s)] is not None]
    _remove_unlisted_shards(out / "parts", done)
    _report_skipped_text(done)
    shards = [{"path": f"parts/{p['file']}", "tokens": p["tokens"]} for manifest in done for p in manifest["parts"]]
    index = {
        "format": INDEX_FORMAT,
        "dtype": settings["dtype"],
        "vocab_size": vocab_size,
        "eos_id": settings["eos_id"],
        "tokenizer_sha256": settings["tokenizer_sha256"],
        "total_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }
    atomic_write_json(out / "index.json", index, indent=1)
    return index


def _report_absent_sources(out: Path, sources: Sequence[Path]) -> None:
    """Log the files tokenized into ``out`` by earlier runs that are not among ``sources`` (deleted, or other inputs).

    Their manifests and shards stay in ``parts/`` (a later run over them reuses them) but not in this run's index.
    """
    current = {_source_id(str(s)) for s in sources}
    absent = sorted(p for p in (out / "parts").glob("*.json") if p.stem not in current)
    if absent:
        first = json.loads(absent[0].read_text())["signature"]["source"]
        log.warning("%d file(s) tokenized into %s by an earlier run are not in these inputs (first: %s): left out of "
                    "index.json; their shards stay in %s", len(absent), out, first, out / "parts")


def _report_skipped_text(manifests: Sequence[dict[str, Any]]) -> None:
    """Log, once at the end of a run, the binary files left out and the files with bytes that are not UTF-8."""
    binary = [m["signature"]["source"] for m in manifests if m["binary"]]
    if binary:
        log.warning("skipped %d binary file(s) (a NUL byte in the first %d bytes), first: %s", len(binary),
                    BINARY_PROBE_BYTES, binary[0])
    undecodable = [m for m in manifests if m["undecodable_lines"]]
    if undecodable:
        first = undecodable[0]
        log.warning(
            "%d file(s) are not valid UTF-8, first: %s (%d lines): their undecodable bytes were tokenized as U+FFFD. "
            "Convert them to UTF-8 (e.g. iconv -f latin1 -t utf-8) and rerun: changed files are redone",
            len(undecodable), first["signature"]["source"], first["undecodable_lines"])


def _remove_unlisted_shards(parts_dir: Path, manifests: Sequence[dict[str, Any]]) -> None:
    """Delete the shards of these sources that their manifests no longer list (left by a file that changed)."""
    listed = {p["file"] for manifest in manifests for p in manifest["parts"]}
    names = {_source_id(manifest["signature"]["source"]) for manifest in manifests}
    for entry in os.scandir(parts_dir):
        if entry.name.endswith(".npy") and entry.name.split("-")[0] in names and entry.name not in listed:
            os.unlink(entry.path)


def load_index(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``index.json`` of a finished tokenization in ``data_dir`` (ValueError if there is none)."""
    path = Path(data_dir) / "index.json"
    if not path.is_file():
        raise ValueError(
            f"{str(data_dir)!r} has no index.json: not a token-shard directory, or its tokenization did not finish "
            "(rerun tokenize_corpus / python -m letkit.data to complete it)"
        )
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} has format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
    return index


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None, prog: str = "python -m letkit.data") -> int:
    """``python -m letkit.data INPUT... --tokenizer T --output DIR``: tokenize text files into token shards.

    Returns the exit status: 0, or 2 after printing ``<prog>: error: <message>`` for bad inputs (a missing file, an
    unknown tokenizer or EOS token, a malformed record) and unreadable or unwritable paths, or 130 after Ctrl-C (with
    a message that rerunning resumes).
    """
    parser = argparse.ArgumentParser(
        prog=prog, description="Tokenize .txt / .jsonl files into uint16/uint32 token shards for pretraining, in "
        "parallel; rerun the same command to resume an interrupted run.")
    parser.add_argument("inputs", nargs="+", help=".txt (one document per line) / .jsonl files or directories")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json (or a directory holding one)")
    parser.add_argument("--output", required=True, help="output directory (rerun on it to resume)")
    parser.add_argument("--text-key", default="text", help="document field of .jsonl records (default: text)")
    parser.add_argument("--eos-token", default="auto", help="token after every document, 'auto' (the first of "
                        f"{', '.join(EOS_CANDIDATES)} in the vocabulary) or 'none' (default: %(default)s)")
    parser.add_argument("--shard-tokens", type=_positive_int, default=100_000_000, help="tokens per shard (default: 1e8)")
    parser.add_argument("--workers", type=_positive_int, default=None, help="parallel processes (default: CPU count)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        index = tokenize_corpus(
            args.inputs, args.output, args.tokenizer, text_key=args.text_key,
            eos_token=None if args.eos_token.lower() == "none" else args.eos_token,
            shard_tokens=args.shard_tokens, num_workers=args.workers,
        )
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; finished shards are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    log.info("%d tokens (%s) in %d shards -> %s", index["total_tokens"], index["dtype"], len(index["shards"]), args.output)
    return 0
