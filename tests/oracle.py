"""Independent oracles: naive attention written from the definitions, in any dtype (float64 = truth).

They share no code with `retmask.kernels`: the visible-key sets are built query by query from the
stated rules, and each (row, head) is computed on its own.
"""

from __future__ import annotations

import torch


def visible(sq: int, kv_len: int, skv: int, window: int | None) -> torch.Tensor:
    """(Sq, Skv) bool: query i sits at position kv_len - Sq + i and sees keys (p - window, p] of [0, kv_len)."""
    m = torch.zeros(sq, skv, dtype=torch.bool)
    for i in range(sq):
        p = kv_len - sq + i
        if p < 0:
            continue
        lo = 0 if window is None else max(0, p - window + 1)
        m[i, lo : p + 1] = True
    return m


def attention(q, k, v, keep=None, kv_lens=None, window=None, scale=None, dtype=torch.float64):
    """Naive causal attention computed in `dtype`; returns (B, Hq, Sq, D) float64."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, hq, sq, d, dtype=torch.float64, device=q.device)
    for bi in range(b):
        n = skv if kv_lens is None else int(kv_lens[bi])
        vis = visible(sq, n, skv, window).to(q.device)
        for h in range(hq):
            if keep is not None and not bool(keep[bi, h]):
                continue
            hk = h // (hq // hkv)
            s = (q[bi, h].to(dtype) @ k[bi, hk].to(dtype).T) * scale
            s = s.masked_fill(~vis, float("-inf"))
            p = torch.softmax(s, dim=-1)
            p = torch.where(vis.any(-1, keepdim=True), p, torch.zeros((), dtype=dtype, device=q.device))
            out[bi, h] = (p @ v[bi, hk].to(dtype)).double()
    return out


def decode(q, keys, values, keep=None, window=None, scale=None, dtype=torch.float64):
    """Naive decode over explicit per-row key lists. keys[b], values[b]: (Hkv, T_b, D).

    Returns out (B, Hq, D) float64, pos (B, Hq) (first maximum, -1 for off heads) and the float64
    scaled scores per row, (Hq, T_b) each, for near-tie checks.
    """
    b, hq, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    pos = torch.full((b, hq), -1, dtype=torch.int64)
    scores = []
    for bi in range(b):
        kb, vb = keys[bi], values[bi]
        hkv, t = kb.shape[0], kb.shape[1]
        row = torch.full((hq, t), float("-inf"), dtype=torch.float64)
        for h in range(hq):
            hk = h // (hq // hkv)
            s = (kb[hk].to(dtype) @ q[bi, h].to(dtype)) * scale  # (T,)
            if window is not None:
                s[: max(0, t - window)] = float("-inf")
            row[h] = s.double()
            if keep is not None and not bool(keep[bi, h]):
                continue
            out[bi, h] = (torch.softmax(s, dim=0) @ vb[hk].to(dtype)).double()
            pos[bi, h] = int(torch.argmax(row[h]))  # torch.argmax returns the first maximum
        scores.append(row)
    return out, pos, scores


def assert_close_to_truth(got, same_dtype, truth, floor: float, what: str):
    """The flash-attention rule: |got - truth| <= 2 |same-dtype PyTorch - truth| + floor, everywhere."""
    got = got.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    err = (got - truth).abs().max().item()
    base = (same_dtype.double() - truth).abs().max().item()
    assert err <= 2 * base + floor, f"{what}: max error {err:.3e} > 2 x {base:.3e} + {floor:.1e}"


def paged_keys(pool, table_row, n: int):
    """(Hkv, n, D): keys [0, n) of one row of a paged cache, key t at block `table_row[t // Bs]`, offset
    `t % Bs` of the block pool `(NB, Hkv, Bs, D)`, read one key at a time by plain indexing."""
    bs = pool.shape[2]
    if n == 0:
        return pool.new_zeros(pool.shape[1], 0, pool.shape[3])
    return torch.stack([pool[int(table_row[t // bs]), :, t % bs] for t in range(n)], dim=1)
