"""masked_decode over paged KV (block pools read through block tables) on every backend: against the float64
oracle over keys read from the pool by plain indexing, and equal to the contiguous mode on the same keys.

Every pool slot that holds no key (free blocks, the tail of each row's and segment's last block) is NaN,
blocks lie in a random physical order, and table entries past a row's blocks are -1 or out of range."""

import math

import pytest
import torch

import oracle
from retmask.kernels import masked_decode, segment_layout
from test_decode import IMPLS, check  # the decode tests' backends and output / argmax check

NAN = float("nan")

# B, Hq, Hkv, D, kv_lens, window, Bs   (Smax = a whole number of blocks, one more than the longest row needs)
PRIVATE = [
    (3, 8, 2, 64, [37, 1, 16], None, 16),  # GQA 4, a 1-key row, a row of exactly one block
    (2, 4, 1, 32, [70, 33], 20, 32),  # GQA 4, window across blocks and splits
    (2, 4, 2, 80, [100, 5], None, 64),  # head dim 80 (masked D), 64-key blocks
]
# B, Hq, Hkv, D, row_seg, shared_lens, kv_lens, window, Bs
SHARED = [
    (6, 8, 2, 32, [0, 0, 1, 1, 1, -1], [45, 20], [3, 17, 1, 16, 0, 9], None, 16),
    (5, 4, 1, 64, [1, 0, 1, 0, 1], [33, 50], [1, 20, 4, 31, 13], 30, 32),  # interleaved; window crosses the seam
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def to_paged(kc, vc, lens, bs, gen, shared=None, spare=3):
    """The keys of contiguous caches `(B, Hkv, Smax, D)` (and of the segments `(G, Hkv, Ssh, D)` in `shared`),
    laid out in one block pool in a random physical order, as a paged cache keeps them.

    Returns `(pool_k, pool_v, block_table, shared_kw)`: the pools `(NB, Hkv, bs, D)` hold rows and segments
    alike (spare free blocks included), every slot holding no key is NaN; a table row lists its blocks, then
    -1 and out-of-range ids (never read); `shared_kw` is the paged shared-segment kwargs (or {})."""
    seqs = [(kc[b], vc[b], int(n)) for b, n in enumerate(lens)]
    if shared is not None:
        seqs += [(shared["shared_k"][g], shared["shared_v"][g], int(n))
                 for g, n in enumerate(shared["shared_lens"].tolist())]
    need = [math.ceil(n / bs) for _, _, n in seqs]
    nb = sum(need) + spare
    ids = torch.randperm(nb, generator=gen).tolist()  # physical block of each logical block, shuffled
    hkv, d = kc.shape[1], kc.shape[3]
    pool_k = torch.full((nb, hkv, bs, d), NAN, dtype=kc.dtype)
    pool_v = torch.full((nb, hkv, bs, d), NAN, dtype=kc.dtype)
    owned = []
    for (k, v, n), m in zip(seqs, need):
        own, ids = ids[:m], ids[m:]
        for j, blk in enumerate(own):
            w = min(bs, n - j * bs)  # a partly filled last block keeps its NaN tail
            pool_k[blk, :, :w] = k[:, j * bs: j * bs + w]
            pool_v[blk, :, :w] = v[:, j * bs: j * bs + w]
        owned.append(own)

    def table(rows, width):
        t = torch.full((len(rows), width), -1, dtype=torch.int32)
        t[:, 1::2] = nb + 1000  # garbage past each row's blocks
        for i, own in enumerate(rows):
            t[i, : len(own)] = torch.tensor(own, dtype=torch.int32)
        return t

    ptab = table(owned[: len(lens)], kc.shape[2] // bs)
    shared_kw = {}
    if shared is not None:
        shared_kw = dict(shared_k=pool_k, shared_v=pool_v, shared_lens=shared["shared_lens"],
                         row_seg=shared["row_seg"],
                         shared_table=table(owned[len(lens):], shared["shared_k"].shape[2] // bs))
    return pool_k, pool_v, ptab, shared_kw


def rows_from_pool(pool_k, pool_v, ptab, lens, shared_kw=None):
    """Each row's keys and values `(Hkv, T_b, D)`, read from the pool key by key: [segment] + private."""
    keys, vals = [], []
    for b, n in enumerate(lens.tolist()):
        kb, vb = oracle.paged_keys(pool_k, ptab[b], n), oracle.paged_keys(pool_v, ptab[b], n)
        if shared_kw and int(shared_kw["row_seg"][b]) >= 0:
            g = int(shared_kw["row_seg"][b])
            m = int(shared_kw["shared_lens"][g])
            st = shared_kw["shared_table"][g]
            kb = torch.cat([oracle.paged_keys(shared_kw["shared_k"], st, m), kb], dim=1)
            vb = torch.cat([oracle.paged_keys(shared_kw["shared_v"], st, m), vb], dim=1)
        keys.append(kb)
        vals.append(vb)
    return keys, vals


def make_private(case, dtype, seed=0):
    b, hq, hkv, d, lens, window, bs = case
    g = _gen(seed)
    smax = (max(lens) // bs + 2) * bs  # a spare table column past the longest row
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    kc = torch.randn(b, hkv, smax, d, generator=g).to(dtype)
    vc = torch.randn(b, hkv, smax, d, generator=g).to(dtype)
    keep = torch.rand(b, hq, generator=g) < 0.6
    keep[-1, :2] = False
    lens = torch.tensor(lens)
    return q, kc, vc, lens, keep, window, to_paged(kc, vc, lens, bs, g)


def make_shared(case, dtype, seed=0):
    b, hq, hkv, d, row_seg, shared_lens, lens, window, bs = case
    gen = _gen(seed)
    ssh = (max(shared_lens) // bs + 1) * bs
    smax = (max(lens) // bs + 1) * bs
    shared = dict(shared_k=torch.randn(len(shared_lens), hkv, ssh, d, generator=gen).to(dtype),
                  shared_v=torch.randn(len(shared_lens), hkv, ssh, d, generator=gen).to(dtype),
                  shared_lens=torch.tensor(shared_lens), row_seg=torch.tensor(row_seg))
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    kc = torch.randn(b, hkv, smax, d, generator=gen).to(dtype)
    vc = torch.randn(b, hkv, smax, d, generator=gen).to(dtype)
    keep = torch.rand(b, hq, generator=gen) < 0.7
    keep[0] = False  # a row with every head off
    lens = torch.tensor(lens)
    return q, kc, vc, lens, keep, window, shared, to_paged(kc, vc, lens, bs, gen, shared)


def _same(got, want):
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", PRIVATE, ids=[f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-D{c[3]}-w{c[5]}-Bs{c[6]}" for c in PRIVATE])
def test_paged_matches_float64(impl, dtype, case, poison):
    q, kc, vc, lens, keep, window, (pk, pv, ptab, _) = make_private(case, dtype)
    fn = IMPLS[impl]
    out, pos, score = fn(q, pk, pv, lens, keep, window=window, return_argmax=True, block_table=ptab)
    assert out.shape == q.shape and pos.dtype == torch.int64 and score.dtype == torch.float32
    keys, vals = rows_from_pool(pk, pv, ptab, lens)
    check(out, pos, score, q, keys, vals, keep, window, dtype)
    # the same keys as contiguous caches: the same kernel gives the same bits
    _same((out, pos, score), fn(q, kc, vc, lens, keep, window=window, return_argmax=True))
    _same((out,), (fn(q, pk, pv, lens, keep, window=window, block_table=ptab.long()),))  # int64 table, no argmax


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", SHARED, ids=[f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-w{c[7]}-Bs{c[8]}" for c in SHARED])
def test_paged_shared_segments(impl, dtype, case, poison):
    """Two segments read by several rows each from the pool the rows' own blocks live in."""
    q, kc, vc, lens, keep, window, shared, (pk, pv, ptab, shared_kw) = make_shared(case, dtype)
    fn = IMPLS[impl]
    hint = dict(seg_layout=segment_layout(shared["row_seg"], len(case[5])))  # as the engine passes them
    if impl != "reference":
        hint["max_group_rows"] = 3  # a bound: no host sync on a GPU
    got = fn(q, pk, pv, lens, keep, window=window, return_argmax=True, block_table=ptab, **hint, **shared_kw)
    keys, vals = rows_from_pool(pk, pv, ptab, lens, shared_kw)
    check(*got, q, keys, vals, keep, window, dtype)
    _same(got, fn(q, kc, vc, lens, keep, window=window, return_argmax=True, **hint, **shared))


def test_paged_group_size_bound_is_checked():
    q, kc, vc, lens, keep, window, shared, (pk, pv, ptab, shared_kw) = make_shared(SHARED[0], torch.float32)
    fn = IMPLS["triton"]
    with pytest.raises(ValueError, match="max_group_rows: 2 is less than the largest group"):
        fn(q, pk, pv, lens, keep, block_table=ptab, max_group_rows=2, **shared_kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_argmax_ties_go_to_lowest_position(impl):
    """Exact ties (integer-valued data) across blocks, splits and the seam, the blocks shuffled."""
    hq, hkv, d, bs = 4, 2, 64, 16
    g = _gen(11)
    q = torch.randint(-2, 3, (1, hq, d), generator=g).to(torch.float16).expand(2, hq, d).contiguous()
    kc = torch.randint(-1, 2, (2, hkv, 112, d), generator=g).to(torch.float16)
    sk = torch.randint(-1, 2, (1, hkv, 80, d), generator=g).to(torch.float16)
    for h in range(hkv):  # the winning key at shared 40 and 66, private 5 and 90
        win = q[:, h * (hq // hkv)].sign() * 2  # (2, D)
        sk[0, h, 40] = sk[0, h, 66] = win[0]
        kc[:, h, 5] = kc[:, h, 90] = win
    vc = torch.randn(2, hkv, 112, d, generator=g).to(torch.float16)
    sv = torch.randn(1, hkv, 80, d, generator=g).to(torch.float16)
    lens = torch.tensor([100, 95])
    shared = dict(shared_k=sk, shared_v=sv, shared_lens=torch.tensor([70]), row_seg=torch.tensor([0, 0]))
    pk, pv, ptab, shared_kw = to_paged(kc, vc, lens, bs, g, shared)
    fn, heads = IMPLS[impl], range(0, hq, hq // hkv)
    _, pos, _ = fn(q, pk, pv, lens, return_argmax=True, block_table=ptab)
    assert all(pos[r, h] == 5 for r in (0, 1) for h in heads)
    _, pos, _ = fn(q, pk, pv, lens, return_argmax=True, block_table=ptab, **shared_kw)
    assert all(pos[r, h] == 40 for r in (0, 1) for h in heads)
    _, pos, _ = fn(q, pk, pv, lens, return_argmax=True, block_table=ptab, window=(70 + 95) - 50, **shared_kw)
    assert all(pos[r, h] == 66 for r in (0, 1) for h in heads)  # the window starts past 40


@pytest.mark.parametrize("backend", IMPLS)
def test_public_function_passes_the_tables(backend, monkeypatch):
    q, kc, vc, lens, keep, window, shared, (pk, pv, ptab, shared_kw) = make_shared(SHARED[1], torch.float32, seed=3)
    monkeypatch.setenv("RETMASK_BACKEND", backend)
    got = masked_decode(q, pk, pv, lens, keep, window=window, return_argmax=True, block_table=ptab, **shared_kw)
    _same(got, IMPLS[backend](q, pk, pv, lens, keep, window=window, return_argmax=True, block_table=ptab,
                              **shared_kw))


def _bad_inputs():
    """(name, change to the good paged call's kwargs, message the ValueError must match)."""
    q, kc, vc, lens, keep, window, shared, (pk, pv, ptab, shared_kw) = make_shared(SHARED[0], torch.float32)
    good = dict(q=q, k_cache=pk, v_cache=pv, kv_lens=lens, block_table=ptab, **shared_kw)

    def pool(bs):
        return torch.zeros(4, pk.shape[1], bs, pk.shape[3])

    def entry(t, at, value):
        t = t.clone()
        t[at] = value
        return t

    row1 = ptab[1].tolist()
    return [
        ("block size 24", dict(k_cache=pool(24), v_cache=pool(24)), r"k_cache: block size Bs=24 .* power of two"),
        ("block size 8", dict(k_cache=pool(8), v_cache=pool(8)), r"k_cache: block size Bs=8 "),
        ("block size 512", dict(k_cache=pool(512), v_cache=pool(512)), r"k_cache: block size Bs=512 "),
        ("shared block size", dict(shared_k=pool(48), shared_v=pool(48)), r"shared_k: block size Bs=48 "),
        ("head dim", dict(k_cache=pk[..., :16], v_cache=pv[..., :16]), r"k_cache: expected a block pool shaped"),
        ("float table", dict(block_table=ptab.float()), r"block_table: expected an int32 .* got torch.float32"),
        ("int16 table", dict(block_table=ptab.short()), r"block_table: expected an int32 .* got torch.int16"),
        ("1-D table", dict(block_table=ptab[0]), r"block_table: expected rank 2"),
        ("table rows", dict(block_table=ptab[:2]), r"block_table: expected 6 rows \(B\)"),
        ("shared table dtype", dict(shared_table=shared_kw["shared_table"].float()),
         r"shared_table: expected an int32"),
        ("shared table rows", dict(shared_table=shared_kw["shared_table"][:1]),
         r"shared_lens: expected 1 entries \(G\)"),
        ("paged rows, contiguous segments", dict(shared, shared_table=None),
         r"shared_table: required with block_table"),
        ("contiguous rows, paged segments", dict(k_cache=kc, v_cache=vc, block_table=None),
         r"block_table: required with shared_table"),
        ("table without segments", dict(shared_k=None, shared_v=None, shared_lens=None, row_seg=None),
         r"shared_table: given without a shared segment"),
        ("entry past the pool", dict(block_table=entry(ptab, (1, 0), pk.shape[0])),
         rf"block_table: entry \[1, 0\] = {pk.shape[0]} is read .* \[0, {pk.shape[0]}\)"),
        ("entry -1 in use", dict(block_table=entry(ptab, (1, 1), -1)), r"block_table: entry \[1, 1\] = -1 is read"),
        ("shared entry", dict(shared_table=entry(shared_kw["shared_table"], (0, 2), -5)),
         r"shared_table: entry \[0, 2\] = -5"),
        ("rows past the table", dict(kv_lens=entry(lens, 1, len(row1) * 16 + 1)), r"kv_lens: values must lie in .*NBp"),
    ], good


BAD, GOOD = _bad_inputs()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("change,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_paged_inputs_name_the_input(impl, change, match):
    kw = dict(GOOD, **change)
    q, k, v, n = kw.pop("q"), kw.pop("k_cache"), kw.pop("v_cache"), kw.pop("kv_lens")
    with pytest.raises(ValueError, match=match):
        IMPLS[impl](q, k, v, n, **{key: val for key, val in kw.items() if val is not None})

