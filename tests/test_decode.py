"""masked_decode: split-K kernel, argmax, shared segments, against a float64 oracle over explicit key lists."""

import pytest
import torch

import oracle
from retmask.kernels import masked_decode, masked_decode_cpu, masked_decode_reference
from retmask.kernels.decode import masked_decode_triton

FLOOR = {torch.float16: 1e-4, torch.float32: 1e-6, torch.bfloat16: 1e-3}
IMPLS = {"triton": masked_decode_triton, "cpu": masked_decode_cpu, "reference": masked_decode_reference}
SCORE_TOL = 1e-4

# B, Hq, Hkv, Smax, D, keep, lengths, window  (the interpreter cuts caches in chunks of 32 keys)
CASES = [
    (3, 8, 1, 255, 64, "random", [255, 1, 113], None),  # GQA 8
    (2, 4, 4, 113, 32, "all", [32, 33], None),  # GQA 1, at a chunk boundary
    (2, 8, 2, 65, 128, "random", [65, 31], 20),  # GQA 4, window
    (2, 4, 2, 40, 32, "none", [40, 17], None),  # every head off
    (3, 4, 1, 113, 80, "random", [64, 113, 2], 33),  # head dim 80, window across chunks
    (1, 2, 1, 17, 32, "all", [17], 1),  # window of one key: the token itself
]
# B, Hq, Hkv, G, Ssh, Smax, D, row_seg, shared_lens, kv_lens, window
SHARED = [
    (2, 8, 2, 1, 113, 33, 64, [0, 0], [113], [1, 33], None),  # one pair on one prompt
    (8, 8, 2, 3, 100, 40, 32, [0, 0, 1, 1, 1, 1, 2, -1], [100, 64, 5], [3, 40, 1, 7, 40, 2, 17, 30], None),
    (6, 8, 1, 2, 70, 20, 32, [1, 0, 1, -1, 0, 1], [70, 31], [1, 20, 4, 9, 0, 13], None),  # interleaved, GQA 8
    (5, 4, 2, 2, 90, 30, 32, [0, 0, 0, 1, 1], [90, 47], [30, 3, 11, 1, 25], 20),  # window crosses the seam
    (3, 4, 4, 1, 64, 64, 32, [0, 0, 0], [64], [64, 40, 1], 50),  # window inside the private part only
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make(case, dtype, seed=0):
    b, hq, hkv, smax, d, keep_kind, lens, window = case
    g = _gen(seed)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    kc = torch.randn(b, hkv, smax, d, generator=g).to(dtype)
    vc = torch.randn(b, hkv, smax, d, generator=g).to(dtype)
    keep = {"all": None, "none": torch.zeros(b, hq, dtype=torch.bool),
            "random": torch.rand(b, hq, generator=g) < 0.6}[keep_kind]
    return q, kc, vc, torch.tensor(lens), keep, window


def rows_of(kc, vc, lens, shared=None):
    """Explicit per-row key lists: [shared segment] + private keys."""
    keys, vals = [], []
    for b in range(kc.shape[0]):
        kb, vb = kc[b, :, : lens[b]], vc[b, :, : lens[b]]
        if shared is not None and shared["row_seg"][b] >= 0:
            s = int(shared["row_seg"][b])
            n = int(shared["shared_lens"][s])
            kb = torch.cat([shared["shared_k"][s, :, :n], kb], dim=1)
            vb = torch.cat([shared["shared_v"][s, :, :n], vb], dim=1)
        keys.append(kb)
        vals.append(vb)
    return keys, vals


def check(out, pos, score, q, keys, vals, keep, window, dtype):
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731  (the oracle runs on the host)
    out, pos, score, q, keep = map(cpu, (out, pos, score, q, keep))
    keys, vals = [k.cpu() for k in keys], [v.cpu() for v in vals]
    truth, tpos, scores = oracle.decode(q, keys, vals, keep, window)
    same, _, _ = oracle.decode(q, keys, vals, keep, window, dtype=dtype)
    oracle.assert_close_to_truth(out, same, truth, FLOOR[dtype], f"decode {dtype}")
    on = torch.ones_like(pos, dtype=torch.bool) if keep is None else keep
    assert (pos[~on] == -1).all() and (score[~on] == float("-inf")).all() and (out[~on] == 0).all()
    for b, h in on.nonzero().tolist():
        row = scores[b][h]
        p = int(pos[b, h])
        assert 0 <= p < row.numel(), f"row {b} head {h}: position {p} outside its {row.numel()} keys"
        assert row[p] >= row.max() - SCORE_TOL, f"row {b} head {h}: position {p} is not a maximum"
        assert abs(float(score[b, h]) - row[p].item()) <= SCORE_TOL
        top2 = row.topk(min(2, row.numel())).values
        if top2.numel() == 1 or top2[0] - top2[1] > SCORE_TOL:
            assert p == int(tpos[b, h]), f"row {b} head {h}: {p} != {int(tpos[b, h])}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES,
                         ids=[f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-S{c[3]}-D{c[4]}-{c[5]}-w{c[7]}" for c in CASES])
def test_decode_matches_float64(impl, dtype, case, poison):
    q, kc, vc, lens, keep, window = make(case, dtype)
    out, pos, score = IMPLS[impl](q, kc, vc, lens, keep, window=window, return_argmax=True)
    assert out.shape == q.shape and pos.dtype == torch.int64 and score.dtype == torch.float32
    keys, vals = rows_of(kc, vc, lens)
    check(out, pos, score, q, keys, vals, keep, window, dtype)
    plain = IMPLS[impl](q, kc, vc, lens, keep, window=window)  # without argmax: the same output
    torch.testing.assert_close(plain, out, atol=0, rtol=0)


def make_shared(case, dtype, seed=0):
    b, hq, hkv, g, ssh, smax, d, row_seg, shared_lens, lens, window = case
    gen = _gen(seed)
    shared = dict(
        shared_k=torch.randn(g, hkv, ssh, d, generator=gen).to(dtype),
        shared_v=torch.randn(g, hkv, ssh, d, generator=gen).to(dtype),
        shared_lens=torch.tensor(shared_lens), row_seg=torch.tensor(row_seg),
    )
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    kc = torch.randn(b, hkv, smax, d, generator=gen).to(dtype)
    vc = torch.randn(b, hkv, smax, d, generator=gen).to(dtype)
    keep = torch.rand(b, hq, generator=gen) < 0.7
    return q, kc, vc, torch.tensor(lens), keep, window, shared


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", SHARED, ids=[f"B{c[0]}-G{c[3]}-Hq{c[1]}-Hkv{c[2]}-w{c[10]}" for c in SHARED])
def test_shared_segments(impl, dtype, case, poison):
    q, kc, vc, lens, keep, window, shared = make_shared(case, dtype)
    out, pos, score = IMPLS[impl](q, kc, vc, lens, keep, window=window, return_argmax=True, **shared)
    keys, vals = rows_of(kc, vc, lens, shared)
    check(out, pos, score, q, keys, vals, keep, window, dtype)


def test_group_size_bound_avoids_sync_and_is_checked():
    q, kc, vc, lens, keep, window, shared = make_shared(SHARED[1], torch.float32)
    a = masked_decode_triton(q, kc, vc, lens, keep, max_group_rows=4, **shared)
    b = masked_decode_triton(q, kc, vc, lens, keep, **shared)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="max_group_rows"):
        masked_decode_triton(q, kc, vc, lens, keep, max_group_rows=2, **shared)


def test_precomputed_segment_layout():
    """A layout computed once (batched over layers, as the engine keeps it) gives the same result as the
    per-call one; the layout groups rows exactly as a plain Python grouping does."""
    from retmask.kernels import segment_layout

    q, kc, vc, lens, keep, window, shared = make_shared(SHARED[1], torch.float32)
    seg = shared["row_seg"]
    n_seg = shared["shared_k"].shape[0]
    lay = segment_layout(torch.stack([seg, torch.full_like(seg, -1)]), n_seg).select(0)  # (2, B) -> entry 0
    rows = lay.order.tolist()
    for gi in range(n_seg):
        got = rows[lay.starts[gi]: lay.starts[gi] + lay.counts[gi]]
        assert got == [b for b in range(len(seg)) if seg[b] == gi]  # in row order
    a = masked_decode_triton(q, kc, vc, lens, keep, return_argmax=True, max_group_rows=4, seg_layout=lay, **shared)
    b = masked_decode_triton(q, kc, vc, lens, keep, return_argmax=True, max_group_rows=4, **shared)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    stale = segment_layout(torch.full_like(seg, -1), n_seg)
    with pytest.raises(ValueError, match="seg_layout: does not match row_seg"):
        masked_decode_triton(q, kc, vc, lens, keep, seg_layout=stale, **shared)
    with pytest.raises(ValueError, match="seg_layout.counts: expected a contiguous int32"):
        masked_decode_triton(q, kc, vc, lens, keep, seg_layout=(lay.order, lay.starts, lay.counts.long()), **shared)
    with pytest.raises(ValueError, match="seg_layout: given without a shared segment"):
        masked_decode_triton(q, kc, vc, lens, keep, seg_layout=lay)


@pytest.mark.parametrize("impl", IMPLS)
def test_argmax_ties_go_to_lowest_position(impl):
    """Exact ties (integer-valued data, exactly representable scores) across tiles, chunks and the seam."""
    hq, hkv, d, ssh, smax = 4, 2, 64, 70, 100
    g = _gen(11)
    q = torch.randint(-2, 3, (1, hq, d), generator=g).to(torch.float16).expand(2, hq, d).contiguous()
    kc = torch.randint(-1, 2, (2, hkv, smax, d), generator=g).to(torch.float16)
    sk = torch.randint(-1, 2, (1, hkv, ssh, d), generator=g).to(torch.float16)
    # the winning key, planted at several positions: shared 40 and 66, private 5 and 90
    for h in range(hkv):
        win = q[:, h * (hq // hkv)].sign().to(torch.float16) * 2  # (2, D): same winner for both rows
        sk[0, h, 40] = sk[0, h, 66] = win[0]
        kc[:, h, 5] = kc[:, h, 90] = win
    vc = torch.randn(2, hkv, smax, d, generator=g).to(torch.float16)
    sv = torch.randn(1, hkv, ssh, d, generator=g).to(torch.float16)
    lens = torch.tensor([100, 95])
    fn = IMPLS[impl]
    _, pos, score = fn(q, kc, vc, lens, return_argmax=True)
    for h in range(0, hq, hq // hkv):
        assert pos[0, h] == 5 and pos[1, h] == 5
    shared = dict(shared_k=sk, shared_v=sv, shared_lens=torch.tensor([70]), row_seg=torch.tensor([0, 0]))
    _, pos, _ = fn(q, kc, vc, lens, return_argmax=True, **shared)
    for h in range(0, hq, hq // hkv):
        assert pos[0, h] == 40 and pos[1, h] == 40
    # a window that starts after 40 leaves 66 as the first maximum
    _, pos, _ = fn(q, kc, vc, lens, return_argmax=True, window=(70 + 95) - 50, **shared)
    for h in range(0, hq, hq // hkv):
        assert pos[0, h] == 66 and pos[1, h] == 66


def test_rows_are_independent_of_batch_mates():
    """A row's result does not depend on the other rows of its batch (nor on their groups)."""
    q, kc, vc, lens, keep, window, shared = make_shared(SHARED[1], torch.float32, seed=4)
    full = masked_decode_triton(q, kc, vc, lens, keep, window=window, **shared)
    for b in (0, 3, 7):
        sub = dict(shared, row_seg=shared["row_seg"][b : b + 1])
        one = masked_decode_triton(q[b : b + 1], kc[b : b + 1], vc[b : b + 1], lens[b : b + 1],
                                   keep[b : b + 1], window=window, **sub)
        torch.testing.assert_close(one[0], full[b], atol=1e-6, rtol=0)


def test_public_function_dispatches_to_the_cpu_backend_on_cpu(monkeypatch):
    q, kc, vc, lens, keep, window = make(CASES[0], torch.float32)
    torch.testing.assert_close(
        masked_decode(q, kc, vc, lens, keep, max_group_rows=3),
        masked_decode_cpu(q, kc, vc, lens, keep), atol=0, rtol=0,
    )
    monkeypatch.setenv("RETMASK_BACKEND", "reference")
    torch.testing.assert_close(
        masked_decode(q, kc, vc, lens, keep, max_group_rows=3),
        masked_decode_reference(q, kc, vc, lens, keep), atol=0, rtol=0,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [None, 20])
def test_padding_never_reaches_the_output(impl, window):
    """NaN past every row's private length, past every segment's length and in a segment no row reads (as
    unwritten or reused cache memory may hold): outputs, positions and scores equal those of clean memory."""
    q, kc, vc, lens, keep, _, shared = make_shared(SHARED[1], torch.float32, seed=9)
    clean = IMPLS[impl](q, kc, vc, lens, keep, window=window, return_argmax=True, **shared)
    kp, vp = kc.clone(), vc.clone()
    for b, n in enumerate(lens.tolist()):
        kp[b, :, n:] = vp[b, :, n:] = float("nan")
    sk, sv = shared["shared_k"].clone(), shared["shared_v"].clone()
    for gi, n in enumerate(shared["shared_lens"].tolist()):
        sk[gi, :, n:] = sv[gi, :, n:] = float("nan")
    sk = torch.cat([sk, torch.full_like(sk[:1], float("nan"))])  # a free segment
    sv = torch.cat([sv, torch.full_like(sv[:1], float("nan"))])
    lens_sh = torch.cat([shared["shared_lens"], torch.tensor([sk.shape[2]])])
    got = IMPLS[impl](q, kp, vp, lens, keep, window=window, return_argmax=True, shared_k=sk, shared_v=sv,
                      shared_lens=lens_sh, row_seg=shared["row_seg"])
    assert not torch.isnan(got[0]).any()
    for x, y in zip(got, clean):
        assert torch.equal(x, y)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_long_decode(dtype, poison):
    b, hq, hkv, d, smax, ssh = 4, 32, 8, 128, 9000, 20000
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    q, kc, vc = r(b, hq, d), r(b, hkv, smax, d), r(b, hkv, smax, d)
    shared = dict(shared_k=r(2, hkv, ssh, d), shared_v=r(2, hkv, ssh, d),
                  shared_lens=torch.tensor([20000, 12345], device="cuda"),
                  row_seg=torch.tensor([0, 0, 1, -1], device="cuda"))
    lens = torch.tensor([9000, 1, 4321, 7777], device="cuda")
    keep = torch.rand(b, hq, device="cuda", generator=g) < 0.5
    for window in (None, 4096):
        out, pos, score = masked_decode(q, kc, vc, lens, keep, window=window, return_argmax=True, **shared)
        keys, vals = rows_of(kc, vc, lens.cpu(), {k: (v.cpu() if k != "shared_k" and k != "shared_v" else v)
                                                 for k, v in shared.items()})
        check(out, pos, score, q, keys, vals, keep, window, dtype)


def test_k_and_v_caches_with_different_layouts():
    """V caches and V segments are read through their own strides, not K's."""
    q, kc, vc, lens, keep, window, shared = make_shared(SHARED[1], torch.float32, seed=6)
    vcs = vc.transpose(1, 2).contiguous().transpose(1, 2)
    svs = shared["shared_v"].transpose(1, 2).contiguous().transpose(1, 2)
    assert vcs.stride(2) != kc.stride(2)
    got = masked_decode_triton(q, kc, vcs, lens, keep, window=window, **dict(shared, shared_v=svs))
    want = masked_decode_reference(q, kc, vc, lens, keep, window=window, **shared)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
