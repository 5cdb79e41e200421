"""Masked prefill attention in Triton: causal (bottom-right), GQA, ragged lengths, window, keep bitmap.

One program computes BLOCK_M queries of one (row, query head) against the keys they can see, in
the online-softmax form of the Triton fused-attention tutorial. The keys a block can see are cut
into three ranges: a masked stage at the window's edge, an unmasked middle whose tiles every
query of the block sees whole, and a masked stage at the diagonal and the row's end. A head that is
off for its row gets an empty key range: it loads no K/V, does no math and writes zeros.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._checks import check_attention
from ._launch import alloc, check_interpreter_dtype, dot_precision, interpreting, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m_pos, offs_d, D, kv_len, win, lo, hi,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, MASK: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, qk_scale,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # key positions of this tile
        kmask = cols[:, None] < kv_len
        if not EVEN_D:
            kmask = kmask & (offs_d[None, :] < D)
        k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :]
        if MASK or not EVEN_D:
            k = tl.load(k_ptrs, mask=kmask, other=0.0)
        else:  # the unmasked middle lies below kv_len: no key compare on its loads
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            vis = (cols[None, :] <= offs_m_pos[:, None]) & (cols[None, :] < kv_len)
            if HAS_WINDOW:
                vis = vis & (cols[None, :] > offs_m_pos[:, None] - win)
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a query row with no visible key so far keeps m = -inf; shift by 0 there to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
        if MASK or not EVEN_D:
            v = tl.load(v_ptrs, mask=kmask, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, Out, KEEP, LENS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    HQ, GQA, SQ, SKV, D, qk_scale, win, SQ_BUCKET, SKV_BUCKET,
    HAS_KEEP: tl.constexpr, HAS_LENS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    PREC: tl.constexpr,
):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest key ranges first
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GQA
    b64 = b.to(tl.int64)  # row offsets in int64: a batch of long rows passes 2**31 elements
    kv_len = SKV
    if HAS_LENS:
        kv_len = tl.load(LENS + b).to(tl.int32)
    offs_m = start_m + tl.arange(0, BLOCK_M)  # query indices in [0, SQ)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m_pos = kv_len - SQ + offs_m  # key position each query sits at (bottom-right)

    # keys some query of this block sees: [vis_lo, vis_hi); keys every query sees: [all_lo, all_hi)
    p_first = kv_len - SQ + start_m
    p_last = tl.minimum(p_first + BLOCK_M - 1, kv_len - 1)
    vis_hi = tl.minimum(kv_len, p_last + 1)
    vis_lo = 0
    all_lo = 0
    if HAS_WINDOW:
        vis_lo = tl.maximum(0, p_first - win + 1)
        all_lo = tl.maximum(0, p_last - win + 1)
    all_hi = tl.minimum(kv_len, p_first + 1)
    lo = (vis_lo // BLOCK_N) * BLOCK_N
    hi = vis_hi
    if HAS_KEEP:
        if tl.load(KEEP + bh) == 0:
            hi = lo  # switched-off head: empty key range, no loads, zeros written
    mid_lo = tl.cdiv(all_lo, BLOCK_N) * BLOCK_N
    mid_hi = (all_hi // BLOCK_N) * BLOCK_N
    if (mid_hi <= mid_lo) | (hi <= lo):
        mid_lo = lo
        mid_hi = lo
    mid_hi = tl.minimum(mid_hi, hi)

    qmask = offs_m[:, None] < SQ
    if not EVEN_D:
        qmask = qmask & (offs_d[None, :] < D)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=qmask, other=0.0)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m_pos, offs_d, D, kv_len,
                                win, lo, mid_lo, BLOCK_N, BLOCK_D, EVEN_D, True, HAS_WINDOW, PREC, qk_scale)
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m_pos, offs_d, D, kv_len,
                                win, mid_lo, mid_hi, BLOCK_N, BLOCK_D, EVEN_D, False, HAS_WINDOW, PREC, qk_scale)
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m_pos, offs_d, D, kv_len,
                                win, mid_hi, hi, BLOCK_N, BLOCK_D, EVEN_D, True, HAS_WINDOW, PREC, qk_scale)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows with no visible key (or an off head) have acc = 0
    tl.store(Out + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=qmask)


def _configs():
    """Every autotune config of the prefill kernel (the compile check lowers them all)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
            (64, 128, 4, 3), (128, 128, 8, 2),
        ]
    ]


def _tuning_configs():
    """The configs the autotuner tries: all, or with RETMASK_AUTOTUNE=0 (the CUDA tests) the first
    only, which skips the tuning (7 compiles and timings per new shape bucket)."""
    cfgs = _configs()
    return cfgs[:1] if os.environ.get("RETMASK_AUTOTUNE", "1") == "0" else cfgs


_attn_fwd_tuned = triton.autotune(
    configs=_tuning_configs(),
    key=["HQ", "GQA", "SQ_BUCKET", "SKV_BUCKET", "D", "HAS_KEEP", "HAS_LENS", "HAS_WINDOW", "PREC"],
)(_attn_fwd)


def masked_attention_triton(q, k, v, keep=None, *, kv_lens=None, window=None, scale=None, check_values=True):
    """Triton launcher of `retmask.kernels.masked_attention`; inputs as there."""
    a = check_attention(q, k, v, keep, kv_lens, window, scale, check_values)
    check_interpreter_dtype(q)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    out = alloc(a.b, a.sq, a.hq, a.d, dtype=q.dtype, device=q.device)  # (B, Sq, Hq, D)
    keep_t = a.keep.to(torch.uint8) if a.keep is not None else out  # dummy pointer when absent
    lens_t = a.kv_lens if a.kv_lens is not None else out
    block_d = next_pow2(a.d)
    args = (
        q, k, v, out, keep_t, lens_t,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        a.hq, a.hq // a.hkv, a.sq, a.skv, a.d, a.scale * LOG2E, a.window or 0,
        next_pow2(a.sq), next_pow2(a.skv),  # autotune buckets: one tuning per power of two
    )
    flags = dict(
        HAS_KEEP=a.keep is not None, HAS_LENS=a.kv_lens is not None, HAS_WINDOW=a.window is not None,
        BLOCK_D=block_d, EVEN_D=block_d == a.d, PREC=dot_precision(q.dtype),
    )
    if interpreting(q):
        bm = 16 if a.sq <= 16 else 32
        _attn_fwd[(triton.cdiv(a.sq, bm), a.b * a.hq)](*args, BLOCK_M=bm, BLOCK_N=16, **flags)
    else:
        grid = lambda meta: (triton.cdiv(a.sq, meta["BLOCK_M"]), a.b * a.hq)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **flags)
    return out.transpose(1, 2)  # (B, Hq, Sq, D) view of (B, Sq, Hq, D)
