"""Where the demo caches its tokenizers, token ids and teachers, and the content hashes that key each entry.

Entries are written atomically (:mod:`letkit.atomic`): an interrupted run leaves only temporaries, which the next
run removes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_FORMAT = "letkit-demo-cache-v1"


def default_cache_dir() -> Path:
    """``$LETKIT_CACHE``, else ``$XDG_CACHE_HOME/letkit``, else ``~/.cache/letkit``."""
    if os.environ.get("LETKIT_CACHE"):
        return Path(os.environ["LETKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "letkit"


def content_hash(*parts: bytes | str) -> str:
    """SHA-256 hex digest of the parts, each length-prefixed so that no two different part lists collide."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
