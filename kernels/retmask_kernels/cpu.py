"""The CPU backend: the prefill through torch's fused `scaled_dot_product_attention`, one row at a time, and
the decode as one batched product over all rows (`masked_decode_cpu`).

The prefill:

Same signature and semantics as `masked_attention` (bottom-right causal alignment, GQA, per-row valid
key lengths, sliding window, keep bitmap), built so that no work goes to what the output never shows:
- a row's queries at negative positions (the left padding of a short row) and its keys past
  `kv_lens[b]` are sliced away before the call, so padding is neither computed nor read: whatever it
  holds (NaN included) cannot reach the output;
- a row's switched-off heads are left out of its call (their output is zeros);
- a square causal block (`Sq == kv_lens[b]`, no window) takes SDPA's `is_causal` path; anything
  else passes a boolean mask of the row's own `(queries, keys)` only.
SDPA computes in the input dtype with float32 accumulation (its flash kernel on CPU), where the
reference upcasts everything to float32; the two agree to the inputs' precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_attention, check_decode
from ._launch import alloc


def masked_attention_cpu(q, k, v, keep=None, *, kv_lens=None, window=None, scale=None, check_values=True):
    """Causal masked attention on CPU tensors; see `retmask.kernels.masked_attention`."""
    a = check_attention(q, k, v, keep, kv_lens, window, scale, check_values)
    g = a.hq // a.hkv
    out = alloc(a.b, a.sq, a.hq, a.d, dtype=q.dtype, device=q.device)  # (B, Sq, Hq, D)
    lens = a.kv_lens.tolist() if a.kv_lens is not None else [a.skv] * a.b
    kept = a.keep.tolist() if a.keep is not None else None  # (B, Hq) as lists: one host read
    for b in range(a.b):
        n = int(lens[b])
        first = max(0, a.sq - n)  # queries [0, first) sit at negative positions: they see nothing
        out[b, :first] = 0
        heads = range(a.hq) if kept is None else [h for h in range(a.hq) if kept[b][h]]
        if n == 0 or first == a.sq or not heads:
            out[b, first:] = 0
            continue
        sq = a.sq - first
        qb = q[b, :, first:]  # (Hq, sq, D)
        kb, vb = k[b, :, :n], v[b, :, :n]  # (Hkv, n, D): the row's valid keys only
        if len(heads) < a.hq:
            idx = torch.tensor(heads, device=q.device)  # (h,)
            qb = qb.index_select(0, idx)  # (h, sq, D)
            kb, vb = kb.index_select(0, idx // g), vb.index_select(0, idx // g)  # (h, n, D), one per query head
            gqa = False
        else:
            gqa = g > 1
        qb, kb, vb = qb[None], kb[None], vb[None]  # 4-D: SDPA's fused CPU kernel (3-D inputs take its slow path)
        if a.window is None and sq == n:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=a.scale, enable_gqa=gqa)
        else:
            qpos = torch.arange(n - sq, n, device=q.device)[:, None]  # (sq, 1): bottom-right aligned
            kpos = torch.arange(n, device=q.device)[None, :]  # (1, n)
            vis = kpos <= qpos
            if a.window is not None:
                vis &= kpos > qpos - a.window  # (sq, n); every query sees at least itself
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=vis, scale=a.scale, enable_gqa=gqa)
        o = o[0]  # (h, sq, D)
        if len(heads) < a.hq:
            ob = out[b]  # (Sq, Hq, D) view
            ob[first:] = 0
            ob[first:, idx] = o.transpose(0, 1)  # (sq, h, D)
        else:
            out[b, first:] = o.transpose(0, 1)
    return out.transpose(1, 2)  # (B, Hq, Sq, D) view of (B, Sq, Hq, D)


def masked_decode_cpu(
    q, k_cache, v_cache, kv_lens, keep=None, *, window=None, scale=None, return_argmax=False,
    shared_k=None, shared_v=None, shared_lens=None, row_seg=None, max_group_rows=None, seg_layout=None,
    check_values=True, block_table=None, shared_table=None,
):
    """One query per row over [shared segment] + private cache, every row in one batched product per part;
    see `retmask.kernels.masked_decode`.

    No loop over rows and no concatenation of keys: the scores of the shared part (each row reads its
    segment through one gather of the pool) and of the private part are computed apart, masked to each row's
    lengths and window, and put through one softmax; the argmax comes from the same scores. Keys and values
    past a row's lengths are never weighted, and where a row reads any (a batch of unequal lengths) the
    values there are cleared first (0 * NaN is NaN), so whatever unused cache memory holds cannot reach
    the output. A paged part (block_table / shared_table) is read through one index operation per cache
    (`_gather_paged`), into the same `(B, Hkv, n, D)` layout as a contiguous part, then takes the same path.
    Works in float32; `max_group_rows` (a GPU launch hint) is accepted and unused."""
    a = check_decode(q, k_cache, v_cache, kv_lens, keep, window, scale, shared_k, shared_v, shared_lens, row_seg,
                     check_values, seg_layout, block_table, shared_table)
    g, dev = a.hq // a.hkv, q.device
    # lengths and segments on the host (CPU tensors: no sync), so masks are built only where rows differ
    lens_l = a.kv_lens.tolist()
    seg_l = a.shared.seg.tolist() if a.shared is not None else [-1] * a.b
    seg_len = a.shared.lens.tolist() if a.shared is not None else []
    sh_l = [seg_len[sg] if sg >= 0 else 0 for sg in seg_l]  # (B,) segment keys each row reads
    total_l = [x + y for x, y in zip(sh_l, lens_l)]  # keys per row; its query sits at position total - 1
    n_sh, n_priv = max(sh_l, default=0), max(lens_l, default=0)  # each part is read up to its longest row
    qf = q.float().view(a.b, a.hkv, g, a.d)  # (B, Hkv, G, D)
    parts = []  # (keys (B, Hkv, S, D), values, row lengths in the part, offset of its positions per row)
    if n_sh:
        first = max(seg_l)
        sh_tab = a.shared.table
        if all(sg == first for sg in seg_l):  # one segment for every row: read once, no per-row gather
            if sh_tab is None:  # a view
                ks = a.shared.k[first:first + 1, :, :n_sh]  # (1, Hkv, n_sh, D)
                vs = a.shared.v[first:first + 1, :, :n_sh]
            else:
                ks = _gather_paged(a.shared.k, sh_tab[first:first + 1], [n_sh], n_sh)  # (1, Hkv, n_sh, D)
                vs = _gather_paged(a.shared.v, sh_tab[first:first + 1], [n_sh], n_sh)
            ks, vs = ks.expand(a.b, -1, -1, -1), vs.expand(a.b, -1, -1, -1)  # (B, Hkv, n_sh, D)
        else:
            idx = torch.tensor([max(sg, 0) for sg in seg_l], device=dev)  # (B,)
            if sh_tab is None:
                ks = a.shared.k[:, :, :n_sh].index_select(0, idx)  # (B, Hkv, n_sh, D)
                vs = a.shared.v[:, :, :n_sh].index_select(0, idx)
            else:  # each row's segment's table row; a row without a segment reads no entry (sh_l = 0)
                rows_tab = sh_tab.index_select(0, idx)  # (B, NBs)
                ks = _gather_paged(a.shared.k, rows_tab, sh_l, n_sh)  # (B, Hkv, n_sh, D)
                vs = _gather_paged(a.shared.v, rows_tab, sh_l, n_sh)
        parts.append((ks.float(), vs.float(), sh_l, [0] * a.b))
    if n_priv:
        if a.table is None:
            kp, vp = k_cache[:, :, :n_priv], v_cache[:, :, :n_priv]  # (B, Hkv, n_priv, D) views
        else:
            kp = _gather_paged(k_cache, a.table, lens_l, n_priv)  # (B, Hkv, n_priv, D)
            vp = _gather_paged(v_cache, a.table, lens_l, n_priv)
        parts.append((kp.float(), vp.float(), lens_l, sh_l))
    out = torch.zeros(a.b, a.hq, a.d, dtype=q.dtype, device=dev)  # (B, Hq, D)
    pos = torch.full((a.b, a.hq), -1, dtype=torch.int64, device=dev)  # (B, Hq)
    score = torch.full((a.b, a.hq), float("-inf"), dtype=torch.float32, device=dev)
    if parts:
        scores, valids = [], []
        for kp, _, n_row, off in parts:
            n = kp.shape[2]
            s = torch.matmul(qf, kp.transpose(-1, -2)) * a.scale  # (B, Hkv, G, n)
            ragged = min(n_row) < n
            vis = None
            if ragged:
                vis = torch.arange(n, device=dev)[None, :] < torch.tensor(n_row, device=dev)[:, None]  # (B, n)
            if a.window is not None:  # key position: the segment's keys first, then the private ones
                lo = torch.tensor([t - 1 - a.window - o for t, o in zip(total_l, off)], device=dev)  # (B,)
                inw = torch.arange(n, device=dev)[None, :] > lo[:, None]  # (B, n)
                vis = inw if vis is None else vis & inw
            if vis is not None:
                s = s.masked_fill(~vis[:, None, None, :], float("-inf"))
            scores.append(s)
            valids.append(ragged)
        s_all = torch.cat(scores, dim=-1) if len(scores) > 1 else scores[0]  # (B, Hkv, G, n_sh + n_priv)
        p = torch.softmax(s_all, dim=-1)  # scores only were joined: no keys copied
        empty = [b for b in range(a.b) if total_l[b] == 0]  # a row with no key at all gets zeros
        acc, at = 0.0, 0
        for (kp, vp, n_row, _), ragged in zip(parts, valids):
            n = kp.shape[2]
            if ragged:  # only a row shorter than the part reads padding: clear its values (0 * NaN is NaN)
                keep_v = torch.arange(n, device=dev)[None, :] < torch.tensor(n_row, device=dev)[:, None]
                vp = vp.masked_fill(~keep_v[:, None, :, None], 0.0)  # (B, Hkv, n, D)
            acc = acc + torch.matmul(p[..., at:at + n], vp)  # (B, Hkv, G, D)
            at += n
        out = acc.reshape(a.b, a.hq, a.d).to(q.dtype)
        if empty:
            out[empty] = 0
        if return_argmax:
            best, arg = s_all.reshape(a.b, a.hq, -1).max(dim=-1)  # first maximum: ties to the lowest position
            if n_sh and n_priv:  # a private column's key sits after the row's own segment, not after n_sh
                shift = torch.tensor(sh_l, device=dev)[:, None] - n_sh  # (B, 1)
                arg = torch.where(arg >= n_sh, arg + shift, arg)
            pos, score = arg, best
            if empty:
                pos[empty], score[empty] = -1, float("-inf")
    if a.keep is not None:
        out.masked_fill_(~a.keep[:, :, None], 0.0)
        pos.masked_fill_(~a.keep, -1)
        score.masked_fill_(~a.keep, float("-inf"))
    return (out, pos, score) if return_argmax else out


def _gather_paged(pool: torch.Tensor, table: torch.Tensor, n_row: list[int], n: int) -> torch.Tensor:
    """`(rows, Hkv, n, D)`: keys [0, n) of each row of `table` read from a block pool `(NB, Hkv, Bs, D)` in one
    index operation; key t of row r lies at block `table[r, t // Bs]`, offset `t % Bs`. Past a row's own
    `n_row[r]` keys its table is not read (block 0 stands in): those keys are masked like any padding."""
    bs, dev = pool.shape[2], pool.device
    t = torch.arange(n, device=dev)  # (n,)
    own = t[None, :] < torch.tensor(n_row, device=dev)[:, None]  # (rows, n)
    blk = torch.where(own, table[:, t // bs].long(), 0)  # (rows, n) block of each key
    heads = torch.arange(pool.shape[1], device=dev)[None, :, None]  # (1, Hkv, 1)
    return pool[blk[:, None, :], heads, (t % bs)[None, None, :]]  # (rows, Hkv, n, D)
