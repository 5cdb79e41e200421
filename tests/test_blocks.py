"""BlockManager and chain_hashes against an independent model of what must hold.

The model keeps plain dicts and lists: each block's reference count, the cached blocks' (prefix tokens,
tag), and the cached blocks nobody holds in the order they were freed. Random operation sequences run
on both; after every operation the counts, reference counts and `check()` agree, an allocation takes
free blocks before evicting the least recently freed cached ones, and `match` finds what a brute-force
scan over every cached block's prefix tokens finds.
"""

import random

import numpy as np
import pytest

from retmask.blocks import BlockManager, BlockTag, chain_hashes

BS = 4  # tokens per block (the manager does not care; small keeps prompts short)
N_LAYERS = 8


def serves(tag: BlockTag, lo: int, hi: int, heads: tuple) -> bool:
    """Written from the rule, not from BlockTag.serves: layers [lo, hi) inside the tag's, and the same heads
    off at every layer below hi (K/V of a layer depends only on the heads off below it)."""
    below = lambda hs: {h for h in hs if h[0] < hi}  # noqa: E731
    return tag.lo <= lo and hi <= tag.hi and below(tag.heads) == below(heads)


class Model:
    """What a pool of `n` blocks must look like after each operation."""

    def __init__(self, n: int):
        self.n = n
        self.refs = [0] * n
        self.key: dict[int, tuple[tuple, BlockTag]] = {}  # cached block -> (prefix tokens, tag)
        self.lru: list[int] = []  # cached blocks with no reference, least recently freed first
        self.peak = self.reused = 0

    def free_set(self) -> set:
        return {b for b in range(self.n) if self.refs[b] == 0 and b not in self.key}

    @property
    def n_free(self) -> int:
        return len(self.free_set()) + len(self.lru)

    def held(self) -> list[int]:
        return [b for b in range(self.n) if self.refs[b] > 0]

    def allocate(self, n: int, got: list[int]) -> None:
        free = self.free_set()
        k = min(n, len(free))
        assert len(got) == n and len(set(got)) == n
        assert set(got[:k]) <= free, "free blocks go before any eviction"
        assert got[k:] == self.lru[: n - k], "evictions in the order the blocks were freed"
        for b in got[k:]:
            del self.key[b]
        self.lru = self.lru[n - k:]
        for b in got:
            assert self.refs[b] == 0, f"block {b} handed out while referenced"
            self.refs[b] = 1
        self.peak = max(self.peak, self.n - self.n_free)

    def ref(self, ids, reused: bool) -> None:
        for b in ids:
            if self.refs[b] == 0:
                self.lru.remove(b)
            self.refs[b] += 1
        self.reused += len(ids) if reused else 0
        self.peak = max(self.peak, self.n - self.n_free)

    def free(self, ids) -> None:
        for b in ids:
            self.refs[b] -= 1
            if self.refs[b] == 0 and b in self.key:
                self.lru.append(b)

    def cache(self, b: int, prefix: tuple, tag: BlockTag) -> None:
        self.key[b] = (prefix, tag)

    def uncache(self, b: int) -> None:
        if b in self.key:
            del self.key[b]
            if b in self.lru:
                self.lru.remove(b)

    def match(self, tokens, lo, hi, heads) -> list[set]:
        """Per leading full block, the cached blocks that hold its prefix and serve the request."""
        out = []
        for i in range(len(tokens) // BS):
            prefix = tuple(tokens[: (i + 1) * BS])
            found = {b for b, (p, t) in self.key.items() if p == prefix and serves(t, lo, hi, heads)}
            if not found:
                break
            out.append(found)
        return out


def agree(bm: BlockManager, m: Model) -> None:
    bm.check()
    assert bm.n_free == m.n_free
    assert bm.n_used == m.n - m.n_free
    assert bm.n_cached == len(m.key)
    assert bm.refs.tolist() == m.refs
    assert bm.peak_used == m.peak and bm.reused == m.reused


def prompts(rng: random.Random) -> list[tuple]:
    """Prompts that share prefixes: a base of 5 full blocks and a tail, the same with one token changed in
    the tail (no full block changes), in its last block, in its second block or first token, a prefix of
    it, and an unrelated one."""
    base = [rng.randrange(1, 50) for _ in range(5 * BS + 2)]
    out = [base]
    for pos in (5 * BS + 1, 4 * BS + 1, BS, 0):
        v = list(base)
        v[pos] = 50 + pos
        out.append(v)
    out.append(base[: 3 * BS])
    out.append(base[: 2 * BS + 1])
    out.append([rng.randrange(1, 50) for _ in range(4 * BS)])
    return [tuple(p) for p in out]


HEADS = [(), ((2, 1),), ((2, 1), (5, 0)), ((2, 1), (7, 3)), ((1, 0),), ((5, 0),), ((2, 1), (5, 0), (7, 3)),
         ((7, 3),)]
TAGS = [BlockTag(0, N_LAYERS, ()), BlockTag(0, 2, ()), BlockTag(2, N_LAYERS, ((2, 1), (5, 0))),
        BlockTag(2, N_LAYERS, ((2, 1), (7, 3))), BlockTag(2, N_LAYERS, ((2, 1),)), BlockTag(0, 5, ((7, 3),)),
        BlockTag(1, 6, ((5, 0),))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_against_model(seed):
    rng = random.Random(seed)
    n = 24
    bm, m = BlockManager(n), Model(n)
    universe = prompts(rng)
    digests = {p: chain_hashes(np.asarray(p), BS) for p in universe}
    counts = dict.fromkeys(["alloc", "short", "ref", "free", "bad_free", "cache", "run", "uncache", "match", "hit"],
                           0)
    for _ in range(3000):
        op = rng.random()
        if op < 0.15:  # allocate, sometimes more than is free
            k = rng.randint(0, m.n_free + 2)
            if k > m.n_free:
                before = (bm.refs.copy(), bm.n_free, bm.n_cached)
                with pytest.raises(MemoryError):
                    bm.allocate(k)
                assert (bm.refs == before[0]).all() and (bm.n_free, bm.n_cached) == before[1:], "took blocks"
                counts["short"] += 1
            else:
                m.allocate(k, bm.allocate(k))
                counts["alloc"] += 1
        elif op < 0.27:  # one more reference to held or cached-unreferenced blocks
            pool = m.held() + m.lru
            if pool:
                ids = rng.sample(pool, rng.randint(1, min(3, len(pool))))
                reused = rng.random() < 0.5
                bm.ref(ids, reused=reused)
                m.ref(ids, reused)
                counts["ref"] += 1
        elif op < 0.45:  # drop references
            held = m.held()
            if held:
                ids = rng.sample(held, rng.randint(1, min(4, len(held))))
                bm.free(ids)
                m.free(ids)
                counts["free"] += 1
        elif op < 0.50:  # free a block nobody holds
            unheld = [b for b in range(n) if m.refs[b] == 0]
            if unheld:
                with pytest.raises(RuntimeError):
                    bm.free([rng.choice(unheld)])
                counts["bad_free"] += 1
        elif op < 0.60:  # cache a held block as some prompt's block i under some tag
            held = m.held()
            p = rng.choice(universe)
            if held and len(p) >= BS:
                b, i, tag = rng.choice(held), rng.randrange(len(p) // BS), rng.choice(TAGS)
                bm.cache(b, digests[p][i], tag)
                m.cache(b, p[: (i + 1) * BS], tag)
                counts["cache"] += 1
        elif op < 0.72:  # a prompt's leading blocks, cached as a prefill would, often released at once
            p, tag = rng.choice(universe), rng.choice(TAGS)
            k = rng.randint(1, len(p) // BS)
            if k <= m.n_free:
                ids = bm.allocate(k)
                m.allocate(k, ids)
                for i, b in enumerate(ids):
                    bm.cache(b, digests[p][i], tag)
                    m.cache(b, p[: (i + 1) * BS], tag)
                if rng.random() < 0.7:
                    bm.free(ids)
                    m.free(ids)
                counts["run"] += 1
        elif op < 0.78:  # forget a block's content (cached or not, held or not)
            b = rng.randrange(n)
            bm.uncache(b)
            m.uncache(b)
            counts["uncache"] += 1
        else:  # match a prompt for some layers and heads
            q = rng.choice(universe)
            lo = rng.randrange(0, 4)
            hi = rng.randint(lo + 1, N_LAYERS)
            heads = rng.choice(HEADS)
            got = bm.match(digests[q], lo, hi, heads)
            want = m.match(q, lo, hi, heads)
            assert len(got) == len(want), (q, lo, hi, heads, got, want)
            assert all(b in w for b, w in zip(got, want))
            counts["match"] += 1
            counts["hit"] += bool(got)
        agree(bm, m)
    # the sequence reached every branch (a change to the weights that starves one fails here)
    assert all(v > 20 for v in counts.values()), counts


def test_eviction_order_and_held_blocks():
    bm = BlockManager(6)
    p = tuple(range(100, 100 + 4 * BS))
    d = chain_hashes(np.asarray(p), BS)
    tag = BlockTag(0, N_LAYERS, ())
    ids = bm.allocate(4)
    for i, b in enumerate(ids):
        bm.cache(b, d[i], tag)
    bm.free([ids[2], ids[0], ids[3], ids[1]])
    bm.ref([ids[3]])  # a match took it again: never evicted while held
    assert bm.n_free == 2 + 3 and bm.n_cached == 4
    assert set(bm.allocate(2)) == set(range(6)) - set(ids)  # free blocks first, nothing evicted
    assert bm.n_cached == 4
    assert bm.allocate(2) == [ids[2], ids[0]]  # then the least recently freed
    assert bm.n_cached == 2
    assert bm.match(d, 0, N_LAYERS, ()) == []  # block 0 was evicted: no leading run
    with pytest.raises(MemoryError):
        bm.allocate(2)
    assert bm.allocate(1) == [ids[1]]
    with pytest.raises(MemoryError):
        bm.allocate(1)
    assert bm.refs[ids[3]] == 1 and bm.n_cached == 1
    bm.check()


def test_match_heads_above_and_below_hi():
    """A block computed with other heads off above the layers asked still serves; heads below `hi` must
    agree (a head at layer hi - 1 counts as below)."""
    p = tuple(range(7, 7 + 3 * BS))
    d = chain_hashes(np.asarray(p), BS)
    bm = BlockManager(8)
    ids = bm.allocate(3)
    for i, b in enumerate(ids):
        bm.cache(b, d[i], BlockTag(2, N_LAYERS, ((2, 1), (6, 0))))
    assert bm.match(d, 2, 6, ((2, 1),)) == ids  # (6, 0) is at hi: above
    assert bm.match(d, 2, 6, ((2, 1), (6, 5), (7, 0))) == ids  # differs only above hi
    assert bm.match(d, 2, 7, ((2, 1),)) == []  # (6, 0) is below hi = 7
    assert bm.match(d, 2, 6, ((2, 1), (5, 3))) == []  # an extra head below hi
    assert bm.match(d, 2, 6, ((2, 2),)) == []  # another head below hi
    assert bm.match(d, 2, 6, ()) == []
    assert bm.match(d, 1, 6, ((2, 1),)) == []  # layer 1 is not held
    assert bm.match(d, 3, 8, ((2, 1), (6, 0))) == ids  # fewer layers, the same heads below
    assert bm.match(d[:2], 2, 8, ((2, 1), (6, 0))) == ids[:2]
    # a run stops at the first block not cached, even when a later one is
    bm.uncache(ids[1])
    assert bm.match(d, 2, 8, ((2, 1), (6, 0))) == ids[:1]
    bm.check()


def test_free_and_allocate_errors():
    bm = BlockManager(3)
    with pytest.raises(RuntimeError):
        bm.free([0])
    ids = bm.allocate(2)
    with pytest.raises(MemoryError):
        bm.allocate(2)
    assert bm.n_free == 1 and bm.refs.tolist() == [1, 1, 0]
    bm.free(ids)
    with pytest.raises(RuntimeError):
        bm.free([ids[0]])
    assert bm.allocate(0) == []
    with pytest.raises(ValueError):
        BlockManager(0)
    bm.check()


@pytest.mark.parametrize("bs", [4, 16, 32])
def test_chain_hashes_equal_iff_equal_prefix(bs):
    rng = np.random.default_rng(bs)
    base = rng.integers(0, 128256, size=6 * bs + 5)
    variants = [base, base[: 3 * bs], base[: 3 * bs + 1], base[: 6 * bs]]
    for pos in (0, bs - 1, bs, 3 * bs + 2, 6 * bs - 1, 6 * bs + 4):  # a late token, the tail, block edges
        v = base.copy()
        v[pos] = (v[pos] + 1) % 128256
        variants.append(v)
    variants += [rng.integers(0, 128256, size=int(rng.integers(0, 7 * bs))) for _ in range(6)]
    for a in variants:
        da = chain_hashes(a, bs)
        assert len(da) == len(a) // bs
        assert chain_hashes(a.astype(np.int32), bs) == da == chain_hashes(a.tolist(), bs)
        for b in variants:
            db = chain_hashes(b, bs)
            for i in range(min(len(da), len(db))):
                same = np.array_equal(a[: (i + 1) * bs], b[: (i + 1) * bs])
                assert (da[i] == db[i]) == same, (i, len(a), len(b))
    assert chain_hashes(np.zeros(0, dtype=np.int64), bs) == []
    assert chain_hashes(base[: bs - 1], bs) == []
    # the tail past the last full block changes no digest
    t = base.copy()
    t[-1] += 1
    assert chain_hashes(t, bs) == chain_hashes(base, bs)
