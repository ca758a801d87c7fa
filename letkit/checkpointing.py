"""Training checkpoints: what one is, how it is written and verified, which one to resume from, which to delete.

A checkpoint is a directory ``<ckpt_dir>/step_XXXXXXX`` (the step number, 7 digits) holding the training state
as ``torch.distributed.checkpoint`` (DCP) files -- ``.metadata`` and one ``__<rank>_<n>.distcp`` per writing rank
-- and ``trainer_state.json``: the step, the world size, every rank's RNG states, each file's size (``files``) and
SHA-256 (``sha256``), and whatever the trainer adds (schedules, data position, config). It is written under
``<name>.tmp`` and renamed once complete (:func:`save_checkpoint`), so a directory under its final name is
complete unless something changed it afterwards: :func:`checkpoint_problem` checks that nothing did, before DCP
reads (or unpickles) anything. :func:`find_checkpoint` picks the newest intact checkpoint and
:func:`prune_checkpoints` applies retention counting only intact ones. :class:`RunDirLock` keeps a second run out
of a run directory, so two runs never checkpoint into it at once.

Used by examples/pretrain_fsdp.py (writing, resuming, retention) and ``letkit export`` (reading). DCP's
``.metadata`` is a pickle: load only checkpoints your own runs wrote.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from letkit.atomic import atomic_write_json
from letkit.validation import check_int

__all__ = ["RunDirInUse", "RunDirLock", "checkpoint_dirs", "checkpoint_name", "checkpoint_problem", "file_owner",
           "find_checkpoint", "load_checkpoint", "locked_run_dir", "prune_checkpoints", "save_checkpoint"]

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step_(\d{7})")
"""A checkpoint directory's name: ``step_`` and the step it was saved at, 7 digits."""


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint saved after ``step`` optimizer steps."""
    return f"step_{step:07d}"


def checkpoint_dirs(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step_XXXXXXX`` directories in ``ckpt_dir``, newest first (not checked)."""
    found = [(int(match[1]), p) for p in Path(ckpt_dir).iterdir() if (match := STEP_DIR.fullmatch(p.name))]
    return sorted(found, reverse=True)


def file_owner(name: str, world: int) -> int:
    """The rank that checksums checkpoint file ``name``: DCP writes ``__<rank>_<n>.distcp`` from rank <rank>, which
    reads it back from its page cache right after writing; other files (``.metadata``) are rank 0's. On a resume
    with another number of ranks the files are spread over the ranks the same way (modulo the world size)."""
    match = re.match(r"__(\d+)_", name)
    return int(match.group(1)) % world if match else 0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(path: str | os.PathLike, rank: int = 0, world: int = 1, *, checksums: bool = True) -> str | None:
    """Why ``path`` is not a complete, intact checkpoint (a reason naming the file), or None if it is one.

    Checks that ``trainer_state.json`` is readable (and, under a ``step_XXXXXXX`` name, for that step), that
    ``.metadata`` and every file it lists are there with the size they were written with, and (``checksums``) the
    SHA-256 of this rank's share of the files (:func:`file_owner`; with the default ``world=1`` all of them):
    bytes changed in place, in a shard or in DCP's ``.metadata``, are found before anything reads them.
    Checkpoints written before checksums were recorded (no ``sha256`` in trainer_state.json) are checked by size.
    """
    path = Path(path)
    if path.name.endswith(".tmp"):
        return "its save was interrupted (.tmp)"
    if not (path / "trainer_state.json").is_file():
        return "it has no trainer_state.json"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        step, files, digests = state["step"], dict(state["files"]), dict(state.get("sha256", {}))
        match = STEP_DIR.fullmatch(path.name)
        if match and int(match[1]) != step:
            return f"trainer_state.json says step {step}"
        outside = [name for name in {*files, *digests} if not isinstance(name, str) or "/" in name or name in (".", "..")]
        if outside:
            return f"trainer_state.json lists {outside[0]!r}, which is not a file name in the checkpoint directory"
        for name in sorted({".metadata", *files}):
            if not (path / name).is_file():
                return f"it has no {name}"
        for name, written in files.items():
            size = (path / name).stat().st_size
            if size != written:
                return f"{name} has {size} bytes, {written} were written"
        for name, written in digests.items() if checksums else ():
            if file_owner(name, world) == rank and sha256_file(path / name) != written:
                return f"{name} has other bytes than were written (its SHA-256 differs from trainer_state.json's)"
    except KeyError as e:
        return f"trainer_state.json has no {e}"
    except (OSError, ValueError, TypeError) as e:
        return f"trainer_state.json: {e or type(e).__name__}"
    return None


def _on_every_rank(value: Any) -> list[Any]:
    """``value`` of every rank (a list of one without a process group)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def find_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """The newest complete, intact checkpoint in ``ckpt_dir`` (None if there is none) and the ones skipped for it.

    Interrupted saves (``.tmp``) and checkpoints with a :func:`checkpoint_problem` are skipped with a warning naming
    them, so a damaged checkpoint makes the run fall back to the previous one instead of loading it. Collective when
    a process group exists: every rank checksums its share of each candidate's files and all agree on the result.
    """
    ckpt_dir = Path(ckpt_dir)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    listing = [sorted((p.name for p in ckpt_dir.iterdir()), reverse=True) if ckpt_dir.is_dir() else []]
    if dist.is_initialized():
        dist.broadcast_object_list(listing)  # rank 0's view, so every rank checks the same candidates
    skipped = []
    for name in listing[0]:
        path = ckpt_dir / name
        if name.endswith(".tmp"):
            if rank == 0:
                log.warning("skipping incomplete checkpoint %s (its save was interrupted)", path)
            continue
        if not STEP_DIR.fullmatch(name):
            continue
        problem = next((p for p in _on_every_rank(checkpoint_problem(path, rank, world)) if p), None)
        if problem is None:
            return path, skipped
        if rank == 0:
            log.warning("skipping damaged checkpoint %s: %s", path, problem)
        skipped.append(path)
    return None, skipped


def prune_checkpoints(ckpt_dir: str | os.PathLike, newest: int, keep: int, skipped: list[Path]) -> list[Path]:
    """Delete the intact checkpoints up to step ``newest`` but the ``keep`` newest of them (``keep=0``: delete
    none); returns those deleted.

    Counted are only checkpoints that pass :func:`checkpoint_problem`'s size checks and were not ``skipped`` at
    resume (their checksums failed). Damaged ones, and any newer than ``newest`` (written by an earlier run, skipped
    at resume), are neither counted nor deleted: they are left for inspection, and a save of the same step replaces
    them. So the newest intact checkpoint is never deleted, whatever else lies in ``ckpt_dir``.
    """
    keep = check_int("keep", keep, minimum=0)  # a negative count would slice the newest ones off for deletion
    intact = [path for step, path in checkpoint_dirs(ckpt_dir) if step <= newest and path not in skipped
              and checkpoint_problem(path, checksums=False) is None]
    doomed = intact[keep:] if keep else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, state: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` (collective): DCP files of ``state`` (this rank's shards) and ``trainer_state``
    (JSON-safe) under ``<name>.tmp``, renamed to ``<name>`` by rank 0 once every rank has written; returns its path.

    trainer_state.json gets ``step``, ``world_size``, every rank's torch RNG states (``rng``) and each file's size
    (``files``) and SHA-256 (``sha256``). Each rank checksums the files it wrote itself (:func:`file_owner`): one more
    sequential read of its own shard, mostly from the page cache. A damaged checkpoint of the same step (skipped
    at resume) is replaced.
    """
    final = Path(ckpt_dir) / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=tmp)
    mine = {p.name: (p.stat().st_size, sha256_file(p))
            for p in sorted(tmp.iterdir()) if file_owner(p.name, dist.get_world_size()) == rank}
    gathered = _on_every_rank((mine, _rng_state()))
    if rank == 0:
        written = dict(sorted(record for files, _ in gathered for record in files.items()))
        record = {**trainer_state, "step": step, "world_size": dist.get_world_size(), "rng": [rng for _, rng in gathered],
                  "files": {name: size for name, (size, _) in written.items()},
                  "sha256": {name: digest for name, (_, digest) in written.items()}}
        atomic_write_json(tmp / "trainer_state.json", record, indent=1)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``state`` in place (collective; check it with :func:`find_checkpoint` first);
    returns its trainer_state.json. RNG states are restored when it was written by as many ranks as this run has."""
    dcp.load(state, checkpoint_id=path)
    trainer_state = json.loads((Path(path) / "trainer_state.json").read_text())
    if trainer_state["world_size"] == dist.get_world_size():
        _set_rng_state(trainer_state["rng"][dist.get_rank()])
    return trainer_state


def _rng_state() -> dict[str, str]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in state.items()}


def _set_rng_state(state: dict[str, str]) -> None:
    def tensor(key: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(state[key])), dtype=torch.uint8)

    torch.set_rng_state(tensor("cpu"))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor("cuda"))


class RunDirInUse(RuntimeError):
    """Another run holds the run directory's lock."""


class RunDirLock:
    """An exclusive lock on a run directory, so that two runs never train and checkpoint into it at once.

    The lock is the file ``<run_dir>/run.lock``, created atomically (a hard link of a complete temporary file,
    which works on NFS too) and naming its holder: host, pid namespace, pid, the process's start time, the
    command. A lock whose holder ran here (same host and pid namespace) and is gone, or whose pid now belongs to
    another process, is stale and is taken over; a holder on another host or in another container cannot be
    checked from here, so the error says how to remove its lock.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / "run.lock"
        pid = os.getpid()
        self.holder = {"host": socket.gethostname(), "pid_namespace": _pid_namespace(), "pid": pid,
                       "process_start": _process_start(pid), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "command": " ".join(sys.argv)}

    def acquire(self) -> None:
        """Take the lock; RunDirInUse naming the holder if a live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f"{self.path.name}.{self.holder['host']}.{self.holder['pid']}")
        atomic_write_json(mine, self.holder)
        try:
            while True:
                try:
                    os.link(mine, self.path)
                    return
                except FileExistsError:
                    pass
                holder = self._read(self.path)
                if holder is None:  # removed in between
                    continue
                here = all(holder.get(key) == self.holder[key] for key in ("host", "pid_namespace"))
                if not here or _running(holder.get("pid"), holder.get("process_start")):
                    raise RunDirInUse(
                        f"{self.path.parent} is in use by another run: process {holder.get('pid')} on host "
                        f"{holder.get('host')!r}, since {holder.get('since')} ({holder.get('command')!r}) holds "
                        f"{self.path}. Stop that run first, or use another train.run_dir; if it is no longer running "
                        f"(e.g. it crashed on another host or in another container), delete {self.path}")
                log.warning("taking over the stale lock %s of process %s on this host, which is no longer running",
                            self.path, holder.get("pid"))
                self._break(holder)
        finally:
            mine.unlink()

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        with contextlib.suppress(RunDirInUse):  # unreadable: not ours to remove
            if self._read(self.path) == self.holder:
                self.path.unlink()

    def _break(self, stale: dict[str, Any]) -> None:
        moved = self.path.with_name(f"{self.path.name}.stale.{self.holder['pid']}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        if self._read(moved) != stale:  # another run took the lock over first: give it back
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
        moved.unlink()

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise RunDirInUse(f"{path} exists but cannot be read ({e}): another run may hold it; if none does, delete it") from e


def _pid_namespace() -> str | None:
    """This process's pid namespace (containers on one host may share its name but not their pids)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time (in clock ticks since boot, from /proc), to tell a reused pid from its old process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: Any, process_start: str | None) -> bool:
    """Whether the process that wrote a lock still runs on this host."""
    if not isinstance(pid, int):
        return True  # not a lock of this module's: leave it to the user
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return process_start is None or _process_start(pid) in (None, process_start)


@contextlib.contextmanager
def locked_run_dir(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold :class:`RunDirLock` on ``run_dir`` for the block: rank 0 takes it; if another run holds it, every rank
    raises :class:`RunDirInUse` (collective when a process group exists)."""
    lock, refusal = RunDirLock(run_dir), [None]
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        try:
            lock.acquire()
        except RunDirInUse as e:
            refusal = [str(e)]
    if dist.is_initialized():
        dist.broadcast_object_list(refusal)
    if refusal[0]:
        raise RunDirInUse(refusal[0])
    try:
        yield
    finally:
        if rank == 0:
            lock.release()
