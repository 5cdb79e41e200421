"""Masked attention kernels: several policies of one model in one batched pass.

Public functions (`masked_attention`, `masked_decode`, `gumbel_argmax`) check their inputs, then run the Triton
kernel for CUDA tensors; otherwise the CPU backend (`masked_attention_cpu`: torch's fused SDPA per row;
`masked_decode_cpu`: one batched product over all rows) and the PyTorch reference sampler.
`RETMASK_BACKEND=triton|cpu|reference` forces one (Triton on CPU tensors needs `TRITON_INTERPRET=1`, set
before import). This package imports only torch and triton, and never touches CUDA at import.
"""

from __future__ import annotations

import torch

from ._checks import check_decode_flags
from ._launch import on_device
from .backend import BACKEND_ENV, backend_choice, resolve_backend
from .cpu import masked_attention_cpu, masked_decode_cpu
from .reference import gumbel_argmax_reference, masked_attention_reference, masked_decode_reference
from .segments import SegmentLayout, segment_layout

__all__ = [
    "BACKEND_ENV",
    "backend_choice",
    "gumbel_argmax",
    "gumbel_argmax_reference",
    "masked_attention",
    "masked_attention_cpu",
    "masked_attention_reference",
    "masked_decode",
    "masked_decode_cpu",
    "masked_decode_reference",
    "resolve_backend",
    "SegmentLayout",
    "segment_layout",
]


def masked_attention(q, k, v, keep=None, *, kv_lens=None, window=None, scale=None, check_values=True):
    """Causal attention of `Sq` queries over `Skv` keys with a per-(row, head) keep bitmap.

    Args:
        q: `(B, Hq, Sq, D)` queries; k, v: `(B, Hkv, Skv, D)`, `Hq % Hkv == 0` (query head h reads
            KV head `h // (Hq // Hkv)`). float16, bfloat16 or float32; D a multiple of 8 in [16, 256].
        keep: `(B, Hq)` bool, False = the head is off for that row: its output is exactly zero and
            the kernel loads nothing for it. None = every head on.
        kv_lens: `(B,)` int, valid keys per row (keys `[0, kv_lens[b])`); None = all `Skv`.
            Queries are bottom-right aligned: query i of row b sits at position
            `kv_lens[b] - Sq + i` and sees keys at positions `<=` its own. A query whose position
            is negative (left padding of a short row) sees nothing and gets zeros.
        window: sliding window; a query at position p sees keys in `(p - window, p]`.
        scale: softmax scale, default `D ** -0.5`.
        check_values: check the values of `kv_lens` (one host sync); turn off in hot loops.

    Returns:
        `(B, Hq, Sq, D)` in q's dtype: a view of a contiguous `(B, Sq, Hq, D)` buffer, so
        `.transpose(1, 2)` gives the layout a Hugging Face attention function returns, free.
    """
    fn = _pick("masked_attention", q)
    with on_device(q):
        return fn(q, k, v, keep, kv_lens=kv_lens, window=window, scale=scale, check_values=check_values)


def masked_decode(
    q, k_cache, v_cache, kv_lens, keep=None, *, window=None, scale=None, return_argmax=False,
    shared_k=None, shared_v=None, shared_lens=None, row_seg=None, max_group_rows=None, seg_layout=None,
    check_values=True, block_table=None, shared_table=None,
):
    """One new query per row over its KV cache (flash-decoding), optionally after a shared segment.

    The caches are contiguous (one slab per row, one per segment) or paged (block pools read through block
    tables, as a paged KV cache keeps them); either both the private caches and the shared segments of a
    call are paged or neither. The two modes give the same results for the same keys.

    Args:
        q: `(B, Hq, D)`, the new token's queries.
        k_cache, v_cache: `(B, Hkv, Smax, D)` private caches; row b's valid keys are
            `[0, kv_lens[b])`, the new token's K/V already written. With `block_table`: block pools
            `(NB, Hkv, Bs, D)`, see there.
        kv_lens: `(B,)` int.
        keep: `(B, Hq)` bool as in `masked_attention`.
        window: the query (the row's last position p) sees keys in `(p - window, p]`.
        return_argmax: also return, per (row, query head), the key position with the largest
            attention score and that score (`q.k * scale`, float32), from the same pass. Ties go to
            the lowest position; a head that is off gives position -1 and score -inf.
        shared_k, shared_v: `(G, Hkv, Ssh, D)` pool of shared segments, each stored once (e.g. the
            prompt KV that every policy of a group shares); with `shared_table`, block pools (see there).
        shared_lens: `(G,)` int, valid keys per segment.
        row_seg: `(B,)` int, the segment row b reads first (-1: none). Row b's keys are
            `shared[row_seg[b], :, :shared_lens[g]]` followed by its private cache, with positions
            counted from the segment's start. Rows of one group read a segment tile once for all.
        max_group_rows: an upper bound on the rows that share one segment; giving it saves a
            host sync (the kernel is then graph-capturable).
        seg_layout: `segment_layout(row_seg, G)`, the rows grouped by segment; computed here when
            absent. A caller whose row_seg changes only when rows join or leave passes it to save
            a sort per call.
        check_values: check lengths, segment ids and the block ids a row reads (host syncs); turn off
            in hot loops.
        block_table: `(B, NBp)` int32 (int64 accepted), or None for contiguous caches. Given, k_cache and
            v_cache are block pools `(NB, Hkv, Bs, D)` (the block size Bs, read from their shape, a power of
            two from 16 to 256), and row b's private key t (`t < kv_lens[b]`) is
            `k_cache[block_table[b, t // Bs], :, t % Bs]`. Only the first `ceil(kv_lens[b] / Bs)` entries of
            a row are read (the rest may be -1 or garbage), and nothing past a row's last key in its last
            block; `kv_lens[b] <= NBp * Bs`.
        shared_table: `(G, NBs)` int32, the segments' block table, required with block_table when shared
            segments are read (and only then). shared_k, shared_v are then block pools `(NB, Hkv, Bs, D)`
            (typically the very tensors k_cache, v_cache) and segment g's key t is
            `shared_k[shared_table[g, t // Bs], :, t % Bs]`; `shared_lens[g] <= NBs * Bs` need not be a
            multiple of Bs. Rows read their segment then their private keys, with positions (window,
            argmax) counted from the segment's start, as in the contiguous mode.

    Returns:
        `out (B, Hq, D)`, or `(out, pos (B, Hq) int64, score (B, Hq) float32)` with return_argmax.
    """
    check_decode_flags(return_argmax, max_group_rows)
    fn = _pick("masked_decode", q)
    kw = dict(window=window, scale=scale, return_argmax=return_argmax, shared_k=shared_k, shared_v=shared_v,
              shared_lens=shared_lens, row_seg=row_seg, seg_layout=seg_layout, check_values=check_values,
              block_table=block_table, shared_table=shared_table)
    if fn is not masked_decode_reference:
        kw["max_group_rows"] = max_group_rows
    with on_device(q):
        return fn(q, k_cache, v_cache, kv_lens, keep, **kw)


def gumbel_argmax(logits, seed, step, inv_t: float, floor=None):
    """Sample one token per row by Gumbel-max with counter-based noise, reading the logits once.

    Row b's token is the argmax over v of `logits[b, v] * inv_t - log(-log(u(seed[b], step[b], v)))`
    among the tokens whose score `logits[b, v] * inv_t` is at least `floor[b]`, in float64, where
    `u` is splitmix64 of (seed, step, v) mapped to (0, 1). That is a draw from
    `softmax(logits * inv_t)` restricted to the kept tokens, which depends on the row's own seed,
    step and logits only (not on the batch, nor on the device). Ties go to the lowest token id.

    Args:
        logits: `(B, V)` float tensor (any float dtype; read once).
        seed, step: `(B,)` int tensors (any device; moved to the logits').
        inv_t: 1 / temperature, > 0.
        floor: `(B,)` per-row score floor (a top-k or top-p cut, in units of `logits * inv_t`), or
            None for every token.

    Returns:
        `(B,)` int64 token ids on the logits' device.
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits: expected a (B, V) float tensor, got {type(logits).__name__}")
    if resolve_backend(logits) != "triton":
        return gumbel_argmax_reference(logits, seed, step, inv_t, floor)
    from .sampling import gumbel_argmax_triton

    with on_device(logits):
        return gumbel_argmax_triton(logits, seed, step, inv_t, floor)


def _pick(name: str, q):
    if not isinstance(q, torch.Tensor):  # the backend follows q's device: check that it is a tensor first
        layout = "(B, Hq, Sq, D)" if name == "masked_attention" else "(B, Hq, D)"
        raise ValueError(f"q: expected a torch.Tensor shaped {layout}, got {type(q).__name__}")
    backend = resolve_backend(q)
    if backend == "cpu":
        return masked_attention_cpu if name == "masked_attention" else masked_decode_cpu
    if backend != "triton":
        return masked_attention_reference if name == "masked_attention" else masked_decode_reference
    if name == "masked_attention":
        from .attention import masked_attention_triton

        return masked_attention_triton
    from .decode import masked_decode_triton

    return masked_decode_triton
