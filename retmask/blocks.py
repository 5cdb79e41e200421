"""The KV block pool's bookkeeping: which blocks are free, who references each, and which full prompt
blocks stay cached for a later prompt that starts with the same tokens (prefix caching).

Every layer's K/V lives in one preallocated pool of fixed-size blocks; a block id names the same
block in every layer's pool. This module holds no tensors: the engine owns the pools and asks the
manager for ids. A block is *free* (on the free list), *in use* (reference count > 0) or *cached*
(count 0, content kept, found by its key, evicted least recently used first when blocks run out).

A cached block's key says what its K/V is: the hash of every token up to its end (a chain over the
blocks before it), the layers it holds, and the heads that were off over the prompt below them. The
K/V of layer l depends only on the tokens, their positions and the heads off below l, so a block
computed with other heads off above the layers asked still serves them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


def heads_below(heads: tuple, layer: int) -> tuple:
    """The (layer, head) pairs of `heads` below `layer`: what decides the KV of layers up to `layer`."""
    return tuple(x for x in heads if x[0] < layer)


def chain_hashes(ids: np.ndarray, block_size: int) -> list[bytes]:
    """One digest per full block of `ids`: block i's covers every token of blocks 0..i (each digest
    hashes the one before it and its block's tokens), so equal digests mean equal prefixes."""
    out, h = [], b""
    a = np.ascontiguousarray(ids, dtype="<i8")
    for i in range(len(a) // block_size):
        h = hashlib.blake2b(h + a[i * block_size:(i + 1) * block_size].tobytes(), digest_size=16).digest()
        out.append(h)
    return out


@dataclass(frozen=True)
class BlockTag:
    """What a cached block holds: layers [lo, hi) computed with `heads` off over the prompt."""

    lo: int
    hi: int
    heads: tuple

    def serves(self, lo: int, hi: int, heads: tuple) -> bool:
        """Whether this block's K/V equals what layers [lo, hi) compute with `heads` off."""
        return self.lo <= lo and self.hi >= hi and heads_below(self.heads, hi) == heads_below(heads, hi)


class BlockManager:
    """Block ids of a pool of `n_blocks`: allocation, reference counts and the prefix cache.

    `allocate(n)` takes free blocks first, then evicts cached ones (least recently used first);
    `free(ids)` drops one reference from each, and a block whose count reaches 0 returns to the free
    list unless it is cached (it then stays findable until evicted). `cache(id, digest, tag)`
    registers a full block; `match(digests, lo, hi, heads)` finds the longest run of leading blocks
    whose K/V serves a new prompt, without taking references (`ref` does)."""

    def __init__(self, n_blocks: int):
        if n_blocks < 1:
            raise ValueError(f"n_blocks={n_blocks}: the pool needs at least one block")
        self.n_blocks = n_blocks
        self.refs = np.zeros(n_blocks, dtype=np.int64)
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: the lowest id is taken first
        self._key: dict[int, tuple[bytes, BlockTag]] = {}  # cached block -> its key
        self._by_hash: dict[bytes, dict[int, BlockTag]] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks with no reference, oldest first
        self.peak_used = 0
        self.reused = 0  # blocks a match handed out (counted by `ref(..., reused=True)`)

    # ---- counts ---------------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        """Blocks an allocation can take now: free ones and cached ones nobody references."""
        return len(self._free) + len(self._lru)

    @property
    def n_used(self) -> int:
        return self.n_blocks - self.n_free

    @property
    def n_cached(self) -> int:
        return len(self._key)

    # ---- allocation -----------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """`n` block ids, each with one reference. Raises MemoryError (taking none) if fewer are free."""
        if n > self.n_free:
            raise MemoryError(f"{n} KV blocks asked, {self.n_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._lru.popitem(last=False)
                self._forget(b)
            self.refs[b] = 1
            out.append(b)
        self.peak_used = max(self.peak_used, self.n_used)
        return out

    def ref(self, ids, reused: bool = False) -> None:
        """One more reference to each of `ids` (a cached block nobody held leaves the eviction list)."""
        for b in ids:
            if self.refs[b] == 0:
                if b not in self._lru:
                    raise RuntimeError(f"KV block {b} referenced while free (only held or cached blocks can be)")
                del self._lru[b]
            self.refs[b] += 1
        if reused:
            self.reused += len(ids)
        self.peak_used = max(self.peak_used, self.n_used)

    def free(self, ids) -> None:
        """Drop one reference from each of `ids`."""
        for b in ids:
            if self.refs[b] <= 0:
                raise RuntimeError(f"KV block {b} freed with no reference held")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self._key:
                    self._lru[b] = None  # most recently used last
                else:
                    self._free.append(b)

    # ---- prefix cache ---------------------------------------------------------------------
    def cache(self, b: int, digest: bytes, tag: BlockTag) -> None:
        """Register block `b` (held, full) as holding the prefix `digest` under `tag`."""
        if self.refs[b] <= 0:
            raise RuntimeError(f"KV block {b} cached while nobody holds it (cache blocks as they are written)")
        if b in self._key:
            self._forget(b)
        self._key[b] = (digest, tag)
        self._by_hash.setdefault(digest, {})[b] = tag

    def uncache(self, b: int) -> None:
        """Forget block `b`'s content (it is about to be rewritten, or its writer failed)."""
        if b in self._key:
            self._forget(b)
            if self._lru.pop(b, 0) is None:  # it was only cached: back to the free list
                self._free.append(b)

    def match(self, digests: list[bytes], lo: int, hi: int, heads: tuple) -> list[int]:
        """Cached blocks holding the longest run of leading blocks of a prompt (its `digests`) for layers
        [lo, hi) with `heads` off over it; takes no reference."""
        out = []
        for d in digests:
            found = next((b for b, t in self._by_hash.get(d, {}).items() if t.serves(lo, hi, heads)), None)
            if found is None:
                break
            out.append(found)
        return out

    def _forget(self, b: int) -> None:
        digest, _ = self._key.pop(b)
        entries = self._by_hash[digest]
        del entries[b]
        if not entries:
            del self._by_hash[digest]

    def check(self) -> None:
        """Invariants (tests): every block is exactly one of free, cached-unreferenced or referenced."""
        free, lru = set(self._free), set(self._lru)
        assert len(free) == len(self._free) and not free & lru
        assert all(self.refs[b] == 0 for b in free | lru)
        assert all(b in self._key for b in lru)
        held = {b for b in range(self.n_blocks) if self.refs[b] > 0}
        assert held | free | lru == set(range(self.n_blocks)) and not held & (free | lru)
