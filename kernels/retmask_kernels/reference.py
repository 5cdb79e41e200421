"""Pure-PyTorch references of the masked attention kernels and of the sampling kernel.

Same signatures and semantics as the Triton launchers: they are the CPU backend and the test
oracle. They compute in float32 (upcast) and return the input dtype. Nothing here is tuned: the
prefill reference works on query chunks so that its memory stays bounded on long prompts, and the
decode reference loops over rows.
"""

from __future__ import annotations

import torch

from ._checks import check_attention, check_decode, check_sampling
from ._launch import alloc

_Q_CHUNK = 1024  # queries per step of the prefill reference: bounds the (chunk, Skv) score tile


def masked_attention_reference(
    q, k, v, keep=None, *, kv_lens=None, window=None, scale=None, check_values=True
):
    """Causal masked attention, bottom-right aligned; see `retmask.kernels.masked_attention`."""
    a = check_attention(q, k, v, keep, kv_lens, window, scale, check_values)
    g = a.hq // a.hkv
    out = alloc(a.b, a.sq, a.hq, a.d, dtype=q.dtype, device=q.device)  # (B, Sq, Hq, D)
    qf = q.float().view(a.b, a.hkv, g, a.sq, a.d)  # (B, Hkv, G, Sq, D)
    kf = k.float().unsqueeze(2)  # (B, Hkv, 1, Skv, D)
    vf = v.float().unsqueeze(2)
    lens = (
        a.kv_lens.to(device=q.device, dtype=torch.int64)
        if a.kv_lens is not None
        else torch.full((a.b,), a.skv, dtype=torch.int64, device=q.device)
    )  # (B,)
    kpos = torch.arange(a.skv, device=q.device)  # (Skv,)
    if a.kv_lens is not None:  # values past a row's length get weight 0, but 0 * NaN is NaN: clear them
        vf = vf.masked_fill((kpos[None, :] >= lens[:, None])[:, None, None, :, None], 0.0)  # (B, Hkv, 1, Skv, D)
    for i0 in range(0, a.sq, _Q_CHUNK):
        i1 = min(a.sq, i0 + _Q_CHUNK)
        qpos = lens[:, None] - a.sq + torch.arange(i0, i1, device=q.device)  # (B, c)
        vis = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < lens[:, None, None])
        if a.window is not None:
            vis &= kpos[None, None, :] > qpos[:, :, None] - a.window  # (B, c, Skv)
        vis = vis[:, None, None]  # (B, 1, 1, c, Skv)
        s = torch.matmul(qf[:, :, :, i0:i1], kf.transpose(-1, -2)) * a.scale  # (B, Hkv, G, c, Skv)
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.where(vis.any(-1, keepdim=True), p, 0.0)  # a query with no visible key gives 0
        o = torch.matmul(p, vf)  # (B, Hkv, G, c, D)
        out[:, i0:i1] = o.reshape(a.b, a.hq, i1 - i0, a.d).transpose(1, 2).to(q.dtype)
    if a.keep is not None:
        out.masked_fill_(~a.keep[:, None, :, None], 0.0)
    return out.transpose(1, 2)  # (B, Hq, Sq, D) view of (B, Sq, Hq, D)


def masked_decode_reference(
    q,
    k_cache,
    v_cache,
    kv_lens,
    keep=None,
    *,
    window=None,
    scale=None,
    return_argmax=False,
    shared_k=None,
    shared_v=None,
    shared_lens=None,
    row_seg=None,
    seg_layout=None,
    check_values=True,
    block_table=None,
    shared_table=None,
):
    """One query per row over [shared segment] + private cache; see `retmask.kernels.masked_decode`.
    `seg_layout` is checked like the kernel's, then unused: the reference reads row_seg directly.
    A paged cache (block_table / shared_table given) is first gathered into each row's contiguous keys."""
    a = check_decode(
        q, k_cache, v_cache, kv_lens, keep, window, scale, shared_k, shared_v, shared_lens, row_seg,
        check_values, seg_layout, block_table, shared_table,
    )
    g = a.hq // a.hkv
    out = torch.zeros(a.b, a.hq, a.d, dtype=q.dtype, device=q.device)  # (B, Hq, D)
    pos = torch.full((a.b, a.hq), -1, dtype=torch.int64, device=q.device)  # (B, Hq)
    score = torch.full((a.b, a.hq), float("-inf"), dtype=torch.float32, device=q.device)
    lens = a.kv_lens.tolist()
    segs = a.shared.seg.tolist() if a.shared is not None else [-1] * a.b
    seg_lens = a.shared.lens.tolist() if a.shared is not None else []
    for b in range(a.b):
        ks, vs = [_keys(k_cache, b, lens[b], a.table)], [_keys(v_cache, b, lens[b], a.table)]  # (Hkv, L, D)
        if segs[b] >= 0:
            n = seg_lens[segs[b]]
            ks.insert(0, _keys(a.shared.k, segs[b], n, a.shared.table))
            vs.insert(0, _keys(a.shared.v, segs[b], n, a.shared.table))
        kb = torch.cat(ks, dim=1).float()  # (Hkv, T, D)
        vb = torch.cat(vs, dim=1).float()
        t = kb.shape[1]
        if t == 0:
            continue
        s = torch.matmul(q[b].float().view(a.hkv, g, a.d), kb.transpose(-1, -2)) * a.scale  # (Hkv, G, T)
        if a.window is not None:
            s[..., : max(0, t - a.window)] = float("-inf")
        p = torch.softmax(s, dim=-1)
        out[b] = torch.matmul(p, vb).reshape(a.hq, a.d).to(q.dtype)
        best, arg = s.reshape(a.hq, t).max(dim=-1)  # first maximum: ties go to the lowest position
        pos[b], score[b] = arg, best
    if a.keep is not None:
        out.masked_fill_(~a.keep[:, :, None], 0.0)
        pos.masked_fill_(~a.keep, -1)
        score.masked_fill_(~a.keep, float("-inf"))
    return (out, pos, score) if return_argmax else out


def _keys(cache, i: int, n: int, table=None):
    """(Hkv, n, D): the first n keys (or values) of row or segment i of a contiguous `(rows, Hkv, S, D)` cache,
    or, with a block table, of a block pool `(NB, Hkv, Bs, D)`: key t at block `table[i, t // Bs]`, offset
    `t % Bs`."""
    if table is None:
        return cache[i, :, :n]
    bs = cache.shape[2]
    blocks = table[i, : -(-n // bs)].long()  # (ceil(n / Bs),) the blocks holding keys [0, n), in order
    hkv, d = cache.shape[1], cache.shape[3]
    return cache[blocks].transpose(0, 1).reshape(hkv, -1, d)[:, :n]  # (nb, Hkv, Bs, D) -> (Hkv, nb * Bs, D)


# splitmix64 constants (uint64)
C1 = 0x9E3779B97F4A7C15
C2 = 0xBF58476D1CE4E5B9
C3 = 0x94D049BB133111EB


# The sampler's noise: splitmix64 of (seed, step, token id), computed in int64 (wrapping) here and
# in uint64 in the Triton kernel, which give the same bits.
def _s64(x: int) -> int:  # a uint64 constant as the int64 torch holds
    return x - (1 << 64) if x >= 1 << 63 else x


def _lsr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def uniform(seed: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) float64 strictly inside (0, 1): splitmix64 of (seed, step, index); seed, step: (B,) int64."""
    idx = torch.arange(n, device=seed.device, dtype=torch.int64)
    x = seed[:, None] * _s64(C1) + step[:, None] * _s64(C2) + idx[None, :] * _s64(C3)  # wraps mod 2**64
    x = x + _s64(C1)
    x = (x ^ _lsr(x, 30)) * _s64(C2)
    x = (x ^ _lsr(x, 27)) * _s64(C3)
    x = x ^ _lsr(x, 31)
    return (_lsr(x, 12).double() + 0.5) / float(1 << 52)  # 52 bits: the largest value is 1 - 2**-53 < 1


def gumbel_argmax_reference(logits, seed, step, inv_t: float, floor=None) -> torch.Tensor:
    """(B,) int64 tokens; see the module docstring. logits (B, V); seed, step (B,) int; floor (B,) or None."""
    check_sampling(logits, seed, step, inv_t, floor)
    dev = logits.device
    scores = logits.double() * inv_t
    if floor is not None:
        scores = scores.masked_fill(~(scores >= floor.to(dev, torch.float64)[:, None]), float("-inf"))  # as the kernel
    u = uniform(seed.to(dev, torch.int64), step.to(dev, torch.int64), logits.shape[1])
    key = scores - torch.log(-torch.log(u))
    return key.nan_to_num(nan=float("-inf")).argmax(-1)  # a NaN logit is never drawn (as in the kernel)
