"""Prompt prefixes: the tokens a group prefills, common prefixes, and the order that puts prompts
sharing a prefix next to each other (so the prefix cache still holds it when the next one comes)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .policy import Group


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
