"""Token shards -> batches: :class:`ShardedTokenLoader`, distributed, shuffled across all shards, resumable.

Fixed-length windows of ``seq_len + 1`` tokens are cut from each shard (inputs and next-token targets) and
shuffled per epoch across all shards by a seeded bijection of the window indices (:class:`WindowPermutation`).
Every rank reads its own slice of each global batch. The position is a count of global samples consumed, so it
is the same on every rank, is saved with ``state_dict()``, and resumes exactly (even with another world size).
Cross-tokenizer LET on these shards: :class:`letkit.token_alignment.TeacherTokenizedLoader` wraps the loader.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from letkit.data.shards import load_index
from letkit.validation import check_int


class WindowPermutation:
    """A seeded bijection of ``[0, n)``, evaluated per index in O(1) memory (nothing of size ``n`` is stored).

    A balanced Feistel network on the smallest even number of bits covering ``n`` (``rounds`` rounds, each a
    splitmix64-style hash of one half keyed by a 64-bit round key drawn from ``numpy.random.default_rng(seed)``),
    with cycle walking: an image ``>= n`` is permuted again until it falls in ``[0, n)``. The domain is less
    than ``4 n``, so fewer than 4 walks are needed on average.

    Args:
        n: size of the permuted range.
        seed: anything ``numpy.random.default_rng`` accepts (e.g. ``[seed, epoch]``).
        rounds: Feistel rounds.
    """

    MIX1, MIX2, GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, n: int, seed: Any, rounds: int = 6) -> None:
        n = check_int("n", n, minimum=1)
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half_bits) - 1)
        self.keys = np.random.default_rng(seed).integers(0, 2**63, size=rounds, dtype=np.uint64)

    def _round(self, x: np.ndarray, key: np.uint64) -> np.ndarray:
        z = (x ^ key) * self.GOLDEN  # uint64 arrays wrap around on overflow, as the hash wants
        z = (z ^ (z >> np.uint64(30))) * self.MIX1
        z = (z ^ (z >> np.uint64(27))) * self.MIX2
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << shift) | right

    def __call__(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """The images of ``indices`` (ints in ``[0, n)``) as an int64 array."""
        x = np.asarray(indices, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"indices must be in [0, n={self.n}), got values in [{x.min()}, {x.max()}]")
        out = self._feistel(x.astype(np.uint64))
        outside = out >= self.n
        while outside.any():
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


class ShardedTokenLoader:
    """Batches ``[batch_size, seq_len + 1]`` (int64) of token windows for one rank, resumable and deterministic.

    Each shard is cut into non-overlapping windows of ``seq_len + 1`` tokens (a shard's tail shorter than a
    window is not used); ``batch[:, :-1]`` are inputs and ``batch[:, 1:]`` their next-token targets. The windows
    of all shards are numbered in shard order, and epoch ``e`` reads them in the order of a
    :class:`WindowPermutation` seeded with ``[seed, e]``: a global shuffle, so consecutive batches mix windows of
    all shards (of all source files), at no memory cost per window. The global batch of a step is the next
    ``world_size * batch_size`` windows; rank ``r`` gets the ``r``-th block of ``batch_size`` of them. Windows
    left over at the end of an epoch (fewer than a global batch) are skipped. At most ``MAX_OPEN_SHARDS`` shards
    are memory-mapped at a time (the least recently used is closed first).

    Args:
        data_dir: a directory written by :func:`tokenize_corpus`.
        seq_len: tokens per input sequence.
        batch_size: sequences per batch on this rank.
        rank, world_size: this rank and the number of ranks sharing the data.
        seed: shuffling seed; ``shuffle=False`` reads shards and windows in order.
        windows: the part of the windows (numbered in shard order) this loader reads, e.g. ``slice(None, -64)`` for
            training and ``slice(-64, None)`` for a held-out validation set of the last 64; default all.
    """

    MAX_OPEN_SHARDS = 8

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        windows: slice = slice(None),
    ) -> None:
        seq_len, batch_size = check_int("seq_len", seq_len, minimum=1), check_int("batch_size", batch_size, minimum=1)
        world_size, rank = check_int("world_size", world_size, minimum=1), check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.data_dir = Path(data_dir)
        self.index = load_index(data_dir)
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.windows_per_shard = np.array([max(0, (s["tokens"] - 1) // seq_len) for s in self.index["shards"]])
        self.window_ends = np.cumsum(self.windows_per_shard)
        total = int(self.window_ends[-1]) if len(self.window_ends) else 0
        if not isinstance(windows, slice) or windows.step not in (None, 1):
            raise ValueError(f"windows must be a slice with step 1, got {windows!r}")
        self.first_window, stop, _ = windows.indices(total)
        self.num_windows = max(0, stop - self.first_window)
        self.global_batch = world_size * batch_size
        if self.num_windows < self.global_batch:
            part = "" if self.num_windows == total else f" (windows={windows!r} of its {total})"
            raise ValueError(
                f"the data has {self.num_windows} windows of seq_len + 1 = {seq_len + 1} tokens{part} "
                f"({self.index['total_tokens']} tokens in {len(self.index['shards'])} shards), fewer than one global "
                f"batch of world_size * batch_size = {world_size} * {batch_size}"
            )
        shard_sizes = ",".join(str(s["tokens"]) for s in self.index["shards"])
        part = "" if self.num_windows == total else f":{self.first_window}:{stop}"  # all: resumes states saved before windows=
        self.fingerprint = hashlib.sha256(f"{self.index['tokenizer_sha256']}:{shard_sizes}{part}".encode()).hexdigest()[:16]
        self.epoch = 0
        self.position = 0  # global windows consumed in this epoch
        self._shards: OrderedDict[int, np.ndarray] = OrderedDict()
        self._permutation: WindowPermutation | None = None
        self._permutation_epoch = -1

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer the data was made with."""
        return self.index["vocab_size"]

    @property
    def tokenizer_file(self) -> Path | None:
        """The copy of the data's ``tokenizer.json`` in ``data_dir``, if present and the one index.json names."""
        path = self.data_dir / "tokenizer.json"
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == self.index["tokenizer_sha256"]:
            return path
        return None

    def _shard(self, k: int) -> np.ndarray:
        if k in self._shards:
            self._shards.move_to_end(k)
        else:
            if len(self._shards) >= self.MAX_OPEN_SHARDS:
                self._shards.popitem(last=False)  # dropping the last reference unmaps the file
            path = self.data_dir / self.index["shards"][k]["path"]
            self._shards[k] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._shards[k]

    def locate(self, positions: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, window within the shard)`` read at ``positions`` (indices into the current epoch's order)."""
        g = np.asarray(positions, dtype=np.int64)
        if self.shuffle:
            if self._permutation is None or self._permutation_epoch != self.epoch:
                self._permutation = WindowPermutation(self.num_windows, [self.seed, self.epoch])
                self._permutation_epoch = self.epoch
            g = self._permutation(g)
        g = g + self.first_window
        shard = np.searchsorted(self.window_ends, g, side="right")
        first = np.concatenate([[0], self.window_ends])[shard]
        return shard, g - first

    def __iter__(self) -> ShardedTokenLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self.position + self.global_batch > self.num_windows:
            self.epoch += 1
            self.position = 0
        first = self.position + self.rank * self.batch_size
        shards, windows = self.locate(np.arange(first, first + self.batch_size))
        rows = [self._shard(int(k))[int(w) * self.seq_len : (int(w) + 1) * self.seq_len + 1] for k, w in zip(shards, windows)]
        self.position += self.global_batch
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict[str, Any]:
        """The loader's position (JSON-serialisable; identical on every rank)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "shuffle": self.shuffle, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; ValueError if it was saved for other data, seq_len, seed or shuffling."""
        for key in ("fingerprint", "seq_len", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"loader state was saved with {key}={state.get(key)!r} but this loader has {key}={getattr(self, key)!r}"
                    + (" (different data)" if key == "fingerprint" else "")
                )
        if not 0 <= state["position"] <= self.num_windows:
            raise ValueError(f"loader state position {state['position']} is outside [0, {self.num_windows}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
