"""Prefix reuse bookkeeping: which prompt's KV each pool segment and slot holds, searched by token
prefix, and the helpers that order prompts so that shared prefixes meet."""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import numpy as np

from .policy import Group


class Held:
    """Prompts whose KV numbered holders (pool segments, or slots) keep, each under a tag (what it holds:
    a segment's depth, a slot's prompt bitmap and depth), in lexicographic order of their tokens per tag:
    the longest common prefix of a new prompt with any of them is with a neighbour of its place."""

    def __init__(self, n: int, at_least: int):
        self.at_least = at_least
        self.ids: list[np.ndarray | None] = [None] * n
        self.key: list[bytes | None] = [None] * n
        self.tag: list[Any] = [None] * n
        self.index: dict[Any, list[tuple[bytes, int]]] = {}

    def hold(self, i: int, ids: np.ndarray | None, tag: Any = None) -> None:
        """Holder `i` now keeps the KV of `ids` (None: nothing reusable)."""
        if not self.at_least:
            return
        if self.key[i] is not None:
            self.index[self.tag[i]].remove((self.key[i], i))
        ok = ids is not None and len(ids) >= self.at_least
        self.ids[i], self.key[i], self.tag[i] = (ids, token_key(ids), tag) if ok else (None, None, None)
        if ok:
            bisect.insort(self.index.setdefault(tag, []), (self.key[i], i))

    def lookup(self, a: np.ndarray, tags, prefer=()) -> tuple[int, int]:
        """Longest prefix of `a` held under one of `tags`, as (tokens, holder); (0, -1) under `at_least`.
        A tie goes to a holder in `prefer` among the 16 nearest on each side."""
        if not self.at_least or len(a) < self.at_least:
            return 0, -1
        k, best, who = token_key(a), 0, -1
        for t in tags:
            idx = self.index.get(t, ())
            i = bisect.bisect_left(idx, (k, -1))
            for rng in (range(i - 1, max(i - 17, -1), -1), range(i, min(i + 16, len(idx)))):
                top = None
                for j in rng:
                    h = idx[j][1]
                    n = common_prefix(a, self.ids[h])
                    if n < best or (top is not None and n < top):
                        break
                    top = n if top is None else top
                    if n > best or (h in prefer and who not in prefer):
                        best, who = n, h
                    elif who in prefer:
                        break
        return (best, who) if best >= self.at_least else (0, -1)


def heads_below(heads: tuple, layer: int) -> tuple:
    """The (layer, head) pairs of `heads` below `layer`: what decides the KV of layers up to `layer`."""
    return tuple(x for x in heads if x[0] < layer)


def token_key(ids) -> bytes:
    """Big-endian bytes of token ids: they compare as the id sequences do (a prefix first), in C."""
    return np.asarray(ids, dtype=">u4").tobytes()


def prefix_ids(g: Group) -> np.ndarray:
    """The prompt tokens a group prefills (all but the last), as an int64 copy (a segment keeps it: the
    caller may refill its own buffer)."""
    p = g.prompt
    if not isinstance(p, (list, tuple, np.ndarray)):  # a torch tensor (numpy would warn converting it)
        p = p.detach().cpu().numpy()
    return np.array(p[:-1], dtype=np.int64)


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token arrays (compared in growing blocks, so prompts
    that differ early cost little)."""
    a, b = np.asarray(a), np.asarray(b)
    k = min(len(a), len(b))
    start, step = 0, 256
    while start < k:
        end = min(k, start + step)
        diff = np.flatnonzero(a[start:end] != b[start:end])
        if diff.size:
            return start + int(diff[0])
        start, step = end, step * 4
    return k


def prefix_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Indices of `prompts` in lexicographic order of their tokens: a prompt's longest common prefix
    with any other is then shared with a neighbour, so an engine fed in this order (one slot, or a few)
    finds each prefix still held in a segment, and computes only what the prompts' prefix tree holds."""
    keys = [token_key(p) for p in prompts]
    return sorted(range(len(keys)), key=keys.__getitem__)
