"""Crash-safe file output: a reader sees the old file or the complete new one, never a half-written one.

Every writer goes through a temporary named ``.tmp-<name>-<pid>-<random>`` in the destination's directory, then
``os.replace`` / ``os.rename``. A process killed mid-write leaves only such a temporary behind;
:func:`remove_stale_temporaries` deletes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_directory", "atomic_write", "atomic_write_bytes", "atomic_write_json", "remove_stale_temporaries",
           "replace_directory"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes to a binary file, atomically.

    The data is flushed and fsynced before the rename; on any exception (Ctrl-C included) the temporary file
    is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Create or replace ``path`` with ``data``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Create or replace ``path`` with ``obj`` as JSON (plus a final newline), atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; rename it to ``final`` when the block succeeds.

    On any exception (Ctrl-C included) the temporary directory is removed. If another process created
    ``final`` first, its result is kept and ours is discarded (the callers' outputs are content-addressed).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ".tmp-<name>-<pid>-<random>" (ours), possibly wrapped by save_pretrained's own ".<that>.tmp-<random>".
_TEMPORARY_NAME = re.compile(r"^\.+tmp-(?P<name>.+)-(?P<pid>\d+)-(?P<tag>[a-z0-9_]+)(\.tmp-[a-z0-9_]+)?(\.png)?$")
_RETIRED = "retired"


def replace_directory(complete: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the complete directory ``complete`` to ``final``, replacing ``final`` if it exists.

    Two renames: the old ``final`` first moves aside to ``.tmp-<name>-<pid>-retired``, then ``complete`` takes its
    place, then the old one is deleted. A crash between the renames leaves no ``final``, only the retired copy,
    which :func:`remove_stale_temporaries` moves back rather than deleting: nothing is lost either way.
    """
    complete, final = Path(complete), Path(final)
    if not final.exists():
        os.rename(complete, final)
        return
    retired = final.with_name(f".tmp-{final.name}-{os.getpid()}-{_RETIRED}")
    os.rename(final, retired)
    os.rename(complete, final)
    shutil.rmtree(retired)


def remove_stale_temporaries(root: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Delete the ``.tmp-*`` leftovers below ``root`` (directly in it if not ``recursive``) of processes that no
    longer run; returns what was removed. A directory retired by an interrupted :func:`replace_directory` whose
    replacement never arrived is moved back to its name instead (and not listed)."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for tmp in (root.rglob if recursive else root.glob)("*.tmp-*"):
        match = _TEMPORARY_NAME.match(tmp.name)
        if match is None or _process_alive(int(match["pid"])):
            continue
        original = tmp.with_name(match["name"])
        if match["tag"] == _RETIRED and tmp.is_dir() and not original.exists():
            os.rename(tmp, original)
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
