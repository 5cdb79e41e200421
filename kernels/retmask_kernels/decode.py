"""Masked decode attention in Triton: split over keys, GQA-packed, keep bitmap, argmax, shared segments.

Each row's keys are `[shared segment] + [private cache]`: the shared segment (e.g. a prompt whose KV
is identical for every policy of a group) lives once in a pool `shared_k/shared_v (G, Hkv, Ssh, D)`
and `row_seg[b]` names the segment of row b (-1: none). Positions count from the start of the
shared segment, so row b's query sits at `shared_lens[row_seg[b]] + kv_lens[b] - 1`.

Paged caches (PAGED, a constexpr: the contiguous kernels compile as without it): the private caches and
the segments are block pools `(NB, Hkv, Bs, D)` read through block tables; key t of a row (segment)
lies at block `table[row, t // Bs]`, offset `t % Bs`. Each key of a tile is gathered on its own (its
D-vector is contiguous, so the loads stay coalesced), so a tile may straddle blocks and Bs is free of
BLOCK_N; table entries past a row's keys are never loaded.

Three launches, all with shapes fixed by the cache sizes (no host sync, graph-capturable):
1. `_shared_split`, grid (splits, G, Hkv): one program reads a chunk of one segment's KV tiles
   *once* and scores it against every query head of every row of the group that maps to that KV
   head: the Q tile is (rows of the group x heads per KV head, D).
2. `_private_split`, grid (splits, B, Hkv): a chunk of one row's private cache, Q tile = the
   GQA group of query heads (a KV tile is read once for all of them).
3. `_combine`, grid (B * Hq,): merges the chunks' partial softmax states and argmaxes.
A kv head whose query heads are all off for the row (or group) loads nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_decode
from ._launch import alloc, check_interpreter_dtype, dot_precision, interpreting, next_pow2, sm_count
from .segments import segment_layout

LOG2E = tl.constexpr(1.4426950408889634)  # a jit function reads only constexpr globals
_MIN_SPLIT_KEYS = 256  # fewest keys worth a program of their own on a GPU


@triton.jit
def _tiles(
    q, k_base, v_base, tbl, stride_kblk, stride_vblk, stride_kn, stride_vn, offs_d, D, lo, hi, win_lo, pos_base,
    sm_scale, m_i, l_i, acc, best, best_pos,
    BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, ARGMAX: tl.constexpr, PREC: tl.constexpr,
    PAGED: tl.constexpr, BS: tl.constexpr,
):
    """Online softmax (+ running argmax) of a Q tile over keys [lo, hi) of one KV segment: contiguous from
    k_base/v_base, or (PAGED) key t at block `tbl[t // BS]`, offset `t % BS` of the pools at k_base/v_base."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        kmask = cols[:, None] < hi
        if not EVEN_D:
            kmask = kmask & (offs_d[None, :] < D)
        if PAGED:
            blk = tl.load(tbl + cols // BS, mask=cols < hi, other=0).to(tl.int64)  # (BLOCK_N,) block of each key
            k_rows = blk * stride_kblk + (cols % BS) * stride_kn
            v_rows = blk * stride_vblk + (cols % BS) * stride_vn
        else:
            k_rows = cols * stride_kn
            v_rows = cols * stride_vn
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale  # (M, BLOCK_N) scaled scores
        vis = (cols[None, :] < hi) & (cols[None, :] >= win_lo[:, None])
        s = tl.where(vis, s, float("-inf"))
        if ARGMAX:
            t_best = tl.max(s, 1)
            t_arg = tl.argmax(s, 1, tie_break_left=True)
            upd = t_best > best  # strict: an earlier tile keeps ties (lowest position wins)
            best = tl.where(upd, t_best, best)
            best_pos = tl.where(upd, pos_base + start + t_arg, best_pos)
        s = s * LOG2E
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return m_i, l_i, acc, best, best_pos


@triton.jit
def _shared_split(
    Q, SK, SV, SHLENS, LENS, KEEP, STARTS, COUNTS, ORDER, TABLE,
    PM, PL, PACC, PBEST, PPOS,
    stride_qb, stride_qh, stride_kg, stride_kh, stride_kn, stride_vg, stride_vh, stride_vn, stride_tg,
    HQ, GQA, D, NS, CHUNK, sm_scale, win,
    HAS_KEEP: tl.constexpr, HAS_WINDOW: tl.constexpr, ARGMAX: tl.constexpr,
    GROUP_MAX: tl.constexpr, GQ_P: tl.constexpr, M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    PAGED: tl.constexpr, BS: tl.constexpr,
):
    # PAGED: SK/SV are block pools (stride_kg, stride_vg: per block) and TABLE (G, NBs) holds each segment's blocks
    split = tl.program_id(0)
    g = tl.program_id(1)
    hk = tl.program_id(2)
    count = tl.load(COUNTS + g)
    if count == 0:
        return
    start_row = tl.load(STARTS + g)
    seg_len = tl.load(SHLENS + g).to(tl.int32)
    offs_m = tl.arange(0, M)
    r = offs_m // GQ_P
    j = offs_m % GQ_P
    valid = (r < count) & (r < GROUP_MAX) & (j < GQA)
    row = tl.load(ORDER + start_row + r, mask=valid, other=0)
    head = hk * GQA + j
    kv_len = tl.load(LENS + row, mask=valid, other=0).to(tl.int32)
    on = valid
    if HAS_KEEP:
        on = on & (tl.load(KEEP + row * HQ + head, mask=valid, other=0) != 0)
    win_lo = tl.zeros([M], dtype=tl.int32)
    if HAS_WINDOW:
        win_lo = tl.maximum(seg_len + kv_len - win, 0)
    lo = tl.maximum(split * CHUNK, tl.min(tl.where(on, win_lo, seg_len), 0))
    hi = tl.minimum((split + 1) * CHUNK, seg_len)
    if tl.max(on.to(tl.int32), 0) == 0:
        return
    if hi <= lo:
        return
    offs_d = tl.arange(0, BLOCK_D)
    qmask = valid[:, None]
    if not EVEN_D:
        qmask = qmask & (offs_d[None, :] < D)
    q = tl.load(Q + row[:, None].to(tl.int64) * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=qmask, other=0.0)
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, BLOCK_D], dtype=tl.float32)
    best = tl.full([M], float("-inf"), dtype=tl.float32)
    best_pos = tl.full([M], -1, dtype=tl.int32)
    if PAGED:
        k_base = SK + hk * stride_kh
        v_base = SV + hk * stride_vh
    else:
        k_base = SK + g.to(tl.int64) * stride_kg + hk * stride_kh
        v_base = SV + g.to(tl.int64) * stride_vg + hk * stride_vh
    tbl = TABLE + g.to(tl.int64) * stride_tg  # (read only when PAGED)
    m_i, l_i, acc, best, best_pos = _tiles(
        q, k_base, v_base, tbl, stride_kg, stride_vg, stride_kn, stride_vn, offs_d, D, lo, hi, win_lo, 0, sm_scale,
        m_i, l_i, acc, best, best_pos, BLOCK_N, EVEN_D, ARGMAX, PREC, PAGED, BS,
    )
    slot = (row.to(tl.int64) * HQ + head) * NS + split  # (M,) index into the partial buffers
    tl.store(PM + slot, m_i, mask=valid)
    tl.store(PL + slot, l_i, mask=valid)
    tl.store(PACC + slot[:, None] * D + offs_d[None, :], acc, mask=qmask)
    if ARGMAX:
        tl.store(PBEST + slot, best, mask=valid)
        tl.store(PPOS + slot, best_pos, mask=valid)


@triton.jit
def _private_split(
    Q, K, V, LENS, KEEP, SEG, SHLENS, TABLE,
    PM, PL, PACC, PBEST, PPOS,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_tb,
    HQ, GQA, D, NS, NS_SH, CHUNK, sm_scale, win,
    HAS_KEEP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SHARED: tl.constexpr, ARGMAX: tl.constexpr,
    M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    PREC: tl.constexpr, PAGED: tl.constexpr, BS: tl.constexpr,
):
    # PAGED: K/V are block pools (stride_kb, stride_vb: per block) and TABLE (B, NBp) holds each row's blocks
    split = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    kv_len = tl.load(LENS + b).to(tl.int32)
    seg_len = 0
    if HAS_SHARED:
        seg = tl.load(SEG + b)
        if seg >= 0:
            seg_len = tl.load(SHLENS + seg).to(tl.int32)
    offs_m = tl.arange(0, M)
    valid = offs_m < GQA
    head = hk * GQA + offs_m
    on = valid
    if HAS_KEEP:
        on = on & (tl.load(KEEP + b * HQ + head, mask=valid, other=0) != 0)
    win_lo = 0
    if HAS_WINDOW:
        win_lo = tl.maximum(kv_len - win, 0)
    lo = tl.maximum(split * CHUNK, win_lo)
    hi = tl.minimum((split + 1) * CHUNK, kv_len)
    if tl.max(on.to(tl.int32), 0) == 0:
        return
    if hi <= lo:
        return
    offs_d = tl.arange(0, BLOCK_D)
    qmask = valid[:, None]
    if not EVEN_D:
        qmask = qmask & (offs_d[None, :] < D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=qmask, other=0.0)
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, BLOCK_D], dtype=tl.float32)
    best = tl.full([M], float("-inf"), dtype=tl.float32)
    best_pos = tl.full([M], -1, dtype=tl.int32)
    if PAGED:
        k_base = K + hk * stride_kh
        v_base = V + hk * stride_vh
    else:
        k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    tbl = TABLE + b.to(tl.int64) * stride_tb  # (read only when PAGED)
    m_i, l_i, acc, best, best_pos = _tiles(
        q, k_base, v_base, tbl, stride_kb, stride_vb, stride_kn, stride_vn, offs_d, D, lo, hi,
        tl.zeros([M], dtype=tl.int32) + win_lo, seg_len, sm_scale, m_i, l_i, acc, best, best_pos,
        BLOCK_N, EVEN_D, ARGMAX, PREC, PAGED, BS,
    )
    slot = (b.to(tl.int64) * HQ + head) * NS + NS_SH + split  # (M,)
    tl.store(PM + slot, m_i, mask=valid)
    tl.store(PL + slot, l_i, mask=valid)
    tl.store(PACC + slot[:, None] * D + offs_d[None, :], acc, mask=qmask)
    if ARGMAX:
        tl.store(PBEST + slot, best, mask=valid)
        tl.store(PPOS + slot, best_pos, mask=valid)


@triton.jit
def _combine(
    Out, OPOS, OSCORE, LENS, KEEP, SEG, SHLENS,
    PM, PL, PACC, PBEST, PPOS,
    stride_ob, stride_oh, HQ, D, NS, NS_SH, CHUNK, CHUNK_SH, win,
    HAS_KEEP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SHARED: tl.constexpr, ARGMAX: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HQ
    h = bh % HQ
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kv_len = tl.load(LENS + b).to(tl.int32)
    seg = -1
    seg_len = 0
    if HAS_SHARED:
        seg = tl.load(SEG + b)
        if seg >= 0:
            seg_len = tl.load(SHLENS + seg).to(tl.int32)
    on = 1
    if HAS_KEEP:
        on = tl.load(KEEP + bh).to(tl.int32)
    # chunks that hold visible keys of this row, as the split kernels cut them
    p_lo = 0
    if HAS_WINDOW:
        p_lo = tl.maximum(seg_len + kv_len - win, 0)  # first visible position
    pv_first = tl.maximum(p_lo - seg_len, 0) // CHUNK
    pv_last = tl.cdiv(kv_len, CHUNK)
    sh_first = 0
    sh_last = 0
    if seg >= 0:
        sh_first = tl.minimum(p_lo, seg_len) // CHUNK_SH
        sh_last = tl.cdiv(seg_len, CHUNK_SH)
        if p_lo >= seg_len:
            sh_last = sh_first
    if on == 0:
        pv_last = pv_first
        sh_last = sh_first
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    best = float("-inf")
    best_pos = -1
    base = bh.to(tl.int64) * NS
    for s in range(sh_first, sh_last):
        m_i, l_i, acc, best, best_pos = _merge(PM, PL, PACC, PBEST, PPOS, base + s, D, offs_d, dmask,
                                               m_i, l_i, acc, best, best_pos, ARGMAX)
    for s in range(NS_SH + pv_first, NS_SH + pv_last):
        m_i, l_i, acc, best, best_pos = _merge(PM, PL, PACC, PBEST, PPOS, base + s, D, offs_d, dmask,
                                               m_i, l_i, acc, best, best_pos, ARGMAX)
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=dmask)
    if ARGMAX:
        tl.store(OPOS + bh, best_pos.to(tl.int64))
        tl.store(OSCORE + bh, best)


@triton.jit
def _merge(PM, PL, PACC, PBEST, PPOS, slot, D, offs_d, dmask, m_i, l_i, acc, best, best_pos, ARGMAX: tl.constexpr):
    m_s = tl.load(PM + slot)
    l_s = tl.load(PL + slot)
    a_s = tl.load(PACC + slot * D + offs_d, mask=dmask, other=0.0)
    m_new = tl.maximum(m_i, m_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    c_old = tl.math.exp2(m_i - m_safe)
    c_new = tl.math.exp2(m_s - m_safe)
    l_i = l_i * c_old + l_s * c_new
    acc = acc * c_old + a_s * c_new
    if ARGMAX:
        b_s = tl.load(PBEST + slot)
        p_s = tl.load(PPOS + slot)
        upd = b_s > best  # chunks come in position order: ties keep the earlier one
        best = tl.where(upd, b_s, best)
        best_pos = tl.where(upd, p_s, best_pos)
    return m_new, l_i, acc, best, best_pos


def _num_splits(n_keys: int, n_programs_other: int, device: torch.device, block_n: int) -> tuple[int, int]:
    """Chunks per segment and keys per chunk: enough programs to fill the GPU, few enough to merge."""
    if n_keys <= 0:
        return 1, block_n
    if device.type == "cuda":
        want = triton.cdiv(2 * sm_count(device), max(1, n_programs_other))
        ns = max(1, min(want, triton.cdiv(n_keys, _MIN_SPLIT_KEYS)))
    else:
        ns = triton.cdiv(n_keys, 2 * block_n)  # interpreter: small chunks, so tests cross boundaries
    chunk = triton.cdiv(triton.cdiv(n_keys, ns), block_n) * block_n
    return triton.cdiv(n_keys, chunk), chunk


def masked_decode_triton(
    q, k_cache, v_cache, kv_lens, keep=None, *, window=None, scale=None, return_argmax=False,
    shared_k=None, shared_v=None, shared_lens=None, row_seg=None, max_group_rows=None, seg_layout=None,
    check_values=True, block_table=None, shared_table=None,
):
    """Triton launcher of `retmask.kernels.masked_decode`; inputs as there."""
    a = check_decode(q, k_cache, v_cache, kv_lens, keep, window, scale, shared_k, shared_v, shared_lens,
                     row_seg, check_values, seg_layout, block_table, shared_table)
    check_interpreter_dtype(q)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    dev = q.device
    gqa = a.hq // a.hkv
    gq_p = next_pow2(gqa)
    block_d = next_pow2(a.d)
    interp = interpreting(q)
    block_n = 16 if interp else 64
    warps = 4
    sh = a.shared
    ns_pv, chunk_pv = _num_splits(a.smax, a.b * a.hkv, dev, block_n)
    ns_sh, chunk_sh = (0, block_n)
    if sh is not None:
        ns_sh, chunk_sh = _num_splits(sh.ssh, sh.n_seg * a.hkv, dev, block_n)
    ns = ns_sh + ns_pv
    pm = alloc(a.b, a.hq, ns, dtype=torch.float32, device=dev)
    pl = alloc(a.b, a.hq, ns, dtype=torch.float32, device=dev)
    pacc = alloc(a.b, a.hq, ns, a.d, dtype=torch.float32, device=dev)
    pbest = alloc(a.b, a.hq, ns, dtype=torch.float32, device=dev) if return_argmax else pm
    ppos = alloc(a.b, a.hq, ns, dtype=torch.int32, device=dev) if return_argmax else pm
    out = alloc(a.b, a.hq, a.d, dtype=q.dtype, device=dev)  # (B, Hq, D)
    opos = alloc(a.b, a.hq, dtype=torch.int64, device=dev) if return_argmax else out
    oscore = alloc(a.b, a.hq, dtype=torch.float32, device=dev) if return_argmax else out
    keep_t = a.keep.to(torch.uint8) if a.keep is not None else out
    common = dict(HAS_KEEP=a.keep is not None, HAS_WINDOW=a.window is not None, ARGMAX=return_argmax,
                  BLOCK_D=block_d, EVEN_D=block_d == a.d)
    prec = dot_precision(q.dtype)
    win = a.window or 0
    seg_t = sh.seg if sh is not None else a.kv_lens
    shlens_t = sh.lens if sh is not None else a.kv_lens
    ptab = a.table if a.table is not None else a.kv_lens  # (B, NBp) when paged; a placeholder never read otherwise
    if sh is not None and sh.n_seg:  # (an empty pool launches nothing: every row reads its private cache alone)
        order, starts, counts = seg_layout if seg_layout is not None else segment_layout(sh.seg, sh.n_seg)
        if max_group_rows is None:
            max_group_rows = int(counts.max())  # one host sync; pass it to avoid
        elif check_values and int(counts.max()) > max_group_rows:
            raise ValueError(f"max_group_rows: {max_group_rows} is less than the largest group "
                             f"({int(counts.max())} rows share one segment); pass at least that")
        group_max = next_pow2(max(1, max_group_rows))
        m_sh = max(16, group_max * gq_p)
        stab = sh.table if sh.table is not None else sh.lens  # (G, NBs) when paged; a placeholder otherwise
        _shared_split[(ns_sh, sh.n_seg, a.hkv)](
            q, sh.k, sh.v, sh.lens, a.kv_lens, keep_t, starts, counts, order, stab,
            pm, pl, pacc, pbest, ppos,
            q.stride(0), q.stride(1), sh.k.stride(0), sh.k.stride(1), sh.k.stride(2),
            sh.v.stride(0), sh.v.stride(1), sh.v.stride(2), stab.stride(0),
            a.hq, gqa, a.d, ns, chunk_sh, a.scale, win,
            GROUP_MAX=group_max, GQ_P=gq_p, M=m_sh, BLOCK_N=block_n, PREC=prec, num_warps=warps,
            PAGED=sh.table is not None, BS=max(sh.bs, 1), **common,
        )
    _private_split[(ns_pv, a.b, a.hkv)](
        q, k_cache, v_cache, a.kv_lens, keep_t, seg_t, shlens_t, ptab,
        pm, pl, pacc, pbest, ppos,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), ptab.stride(0),
        a.hq, gqa, a.d, ns, ns_sh, chunk_pv, a.scale, win,
        HAS_SHARED=sh is not None, M=max(16, gq_p), BLOCK_N=block_n, PREC=prec, num_warps=warps,
        PAGED=a.table is not None, BS=max(a.bs, 1), **common,
    )
    _combine[(a.b * a.hq,)](
        out, opos, oscore, a.kv_lens, keep_t, seg_t, shlens_t,
        pm, pl, pacc, pbest, ppos,
        out.stride(0), out.stride(1), a.hq, a.d, ns, ns_sh, chunk_pv, chunk_sh, win,
        HAS_SHARED=sh is not None, num_warps=1 if block_d <= 64 else 2, **common,
    )
    return (out, opos, oscore) if return_argmax else out
