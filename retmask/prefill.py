"""The engine's prefill: which admitted groups are computed together and in what order (prefix reuse),
and the pass that computes their prompts' KV into the pool segments and the rows' slots.

`PrefillMixin` is part of `Engine` (it reads the engine's cache and settings); `PrefillPass` is the
attention context one pass installs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from retmask.kernels import masked_attention

from . import hf
from .decoding import to_device
from .policy import GenConfig, n_streams, stream_keys
from .prefix import common_prefix, heads_below, prefix_ids, prefix_order

if TYPE_CHECKING:
    from .decoding import Slots
    from .engine import Engine


class PrefillPass:
    """Attention context of one prefill batch: staging KV, chunk geometry, the expansion point."""

    owns_masks = True

    def __init__(self, eng: "Engine", n_groups: int, rows: int, lsh: int, plen: int, keep: torch.Tensor,
                 row2group: list[int], hi: int = 0, segs: list[int] | None = None):
        # rows: the streams computed from layer `lsh` on (a group's rows with the same prompt bitmap are one);
        # keep (R, L, Hq) on the host
        d, dev = eng.d, eng.device
        self.eng, self.lsh, self.plen = eng, lsh, plen
        self.n_groups, self.rows = n_groups, rows
        self.row2group = to_device(np.asarray(row2group, dtype=np.int64), dev)
        self.keep = to_device(keep, dev)  # (R, L, Hq)
        self.layer_all_on = keep.all(-1).all(0).tolist()  # (L,)
        shape = lambda n: (n, d.n_kv_heads, plen + 1, d.head_dim)  # noqa: E731  (+1: a trash slot for pads)
        # One group (`segs`, a run of consecutive segments): the layers below `hi` its segments hold are
        # prefilled straight into them, below lsh into the first, from lsh on one per stream (no staging copy).
        self.in_place = segs is not None and plen + 1 <= eng.max_len
        self.k, self.v = [], []
        for l in range(d.n_layers):
            if self.in_place and l < hi:
                n = 1 if l < lsh else rows
                self.k.append(eng.pk[l][segs[0]: segs[0] + n, :, : plen + 1])  # (n, Hkv, plen+1, D) view
                self.v.append(eng.pv[l][segs[0]: segs[0] + n, :, : plen + 1])
            else:
                self.k.append(torch.zeros(shape(n_groups if l < lsh else rows), dtype=eng.dtype, device=dev))
                self.v.append(torch.zeros_like(self.k[-1]))
        self.dest = {}  # batch size -> (N, C) destination index of each chunk position
        self.kv_lens = {}

    def set_chunk(self, start: int, size: int, pads_g: torch.Tensor, pre_g: torch.Tensor):
        """Chunk covers padded indices [start, start + size) of the tokens to compute; pads_g (G,) left
        padding per group, pre_g (G,) tokens before them whose KV is already staged (a reused prefix)."""
        idx = torch.arange(start, start + size, device=pads_g.device)
        for n, pads, pre in ((self.n_groups, pads_g, pre_g),
                             (self.rows, pads_g[self.row2group], pre_g[self.row2group])):
            j = idx[None, :] - pads[:, None]  # (N, C) index of each chunk token among those computed
            self.dest[n] = torch.where(j >= 0, pre[:, None] + j, self.plen)  # its cache position, or the trash slot
            self.kv_lens[n] = (pre + start + size - pads).clamp(min=0).to(torch.int32)

    def attend(self, module, q, k, v, scaling, window):
        l = module.layer_idx
        n = q.shape[0]
        d = self.dest[n]  # (N, C)
        idx = d[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[l].scatter_(2, idx, k)
        self.v[l].scatter_(2, idx, v)
        keep = None if (l < self.lsh or self.layer_all_on[l]) else self.keep[:, l]
        out = masked_attention(q, self.k[l][:, :, : self.plen], self.v[l][:, :, : self.plen], keep,
                               kv_lens=self.kv_lens[n], window=window, scale=scaling, check_values=False)
        return out.transpose(1, 2)  # (N, C, Hq, D)

    def expand(self, layer: int, t: torch.Tensor) -> torch.Tensor:
        if layer >= self.lsh and t.shape[0] == self.n_groups and self.n_groups != self.rows:
            return t.index_select(0, self.row2group)
        return t


class PrefillMixin:
    """Prefill of admitted groups (mixed into `Engine`)."""

    def _prefill(self, admitted, st: "Slots", cfg: GenConfig):
        by_layout: dict[tuple[int, int], list] = {}
        for item in admitted:
            by_layout.setdefault(self._layout(item[0], cfg)[:2], []).append(item)
        for (lsh, hi), batch in by_layout.items():
            for phase in self._reuse_phases(batch, lsh, hi):
                for part in self._prefill_parts(phase):
                    self._prefill_batch(part, lsh, hi, st, cfg)

    def _held_prefix(self, a: np.ndarray, prefer=(), depth: int | None = None) -> tuple[int, int]:
        """Longest prefix of the tokens `a` whose KV, as the intact model computes it, a pool segment holds
        at every layer below `depth` (default: every layer), as (tokens, segment); (0, -1) under
        `reuse_prefix` tokens. A tie goes to a segment in `prefer` among the nearest in the index."""
        depth = self.d.n_layers if depth is None else depth
        return self._segs.lookup(a, self._seg_tags(0, depth, ()), prefer)

    def _seg_tags(self, lo: int, hi: int, heads: tuple) -> list:
        """Index tags of the segments holding layers [lo, hi) as computed with `heads` off over the prompt.
        A segment's tag is (first layer, end layer, heads) of what it holds. The KV at a layer depends only
        on the heads off below it, so the bitmaps must agree below `hi`."""
        want = heads_below(heads, hi)
        return [t for t in self._segs.index if t[0] <= lo and t[1] >= hi and heads_below(t[2], hi) == want]

    def _reuse_phases(self, batch, lsh: int, hi: int):
        """The groups of one admission (of layout `lsh`, `hi`: see `_layout`) in prefill order, for prefix reuse. Among
        groups with the same prefill streams, in each cluster whose prompts share at least `reuse_prefix`
        tokens, the group whose prefixes in common with the others add up the most (for NIAH tests of
        one haystack, the one whose needle comes last) is a root; a group that shares more with its root
        than it finds held now waits for a second pass, which reuses the root's KV."""
        m, n = self.reuse_prefix, len(batch)
        if not m or n < 2:
            return [batch]
        classes: dict[tuple, list[int]] = {}  # a root's KV serves the groups whose streams it computes
        for i, (g, _, _) in enumerate(batch):
            classes.setdefault(tuple(sorted(stream_keys(g.policies))), []).append(i)
        later = set()
        for members in classes.values():
            arrs = [prefix_ids(batch[i][0]) for i in members]
            order = prefix_order(arrs)  # a pair's common prefix is the least over the neighbours between them
            adj = np.array([common_prefix(arrs[a], arrs[b]) for a, b in zip(order, order[1:])], dtype=np.int64)
            k = 0
            while k < len(members):
                e = k
                while e < len(members) - 1 and adj[e] >= m:
                    e += 1
                if e > k:  # order[k..e] is a cluster
                    a, size = adj[k:e], e - k + 1
                    best, root = None, 0
                    for r in range(size):  # common prefix of member r with every other member
                        c = np.zeros(size, dtype=np.int64)
                        c[r + 1:] = np.minimum.accumulate(a[r:])
                        c[:r] = np.minimum.accumulate(a[:r][::-1])[::-1]
                        if best is None or c.sum() > best.sum():
                            best, root = c, r
                    for i in range(size):
                        gi = members[order[k + i]]
                        g, _, segs = batch[gi]
                        ids = arrs[order[k + i]]
                        gain = best[i] if lsh == self.d.n_layers else min(best[i], len(ids) - 1)
                        if i != root and gain >= m and gain > self._lookup(ids, segs, stream_keys(g.policies), lsh,
                                                                           hi)[0]:
                            later.add(gi)
                k = e + 1
        first = [b for gi, b in enumerate(batch) if gi not in later]
        second = [b for gi, b in enumerate(batch) if gi in later]
        return [p for p in (first, second) if p]

    def _lookup(self, a: np.ndarray, own: list[int], keys: list[tuple], lsh: int,
                hi: int) -> tuple[int, int, dict, dict]:
        """Prefix reuse for one group of layout `lsh`, `hi` (`_layout`), whose segments are `own` and whose
        prefill streams have the prompt bitmaps `keys`: the longest prefix of its tokens `a` held for every
        layer it computes (below lsh the intact model's KV, in a segment; from lsh on each stream's, in a
        segment below hi and in a slot from hi on), as (tokens, segment below lsh, {stream: segment},
        {stream: slot}); 0 tokens under `reuse_prefix`. Ties go to the group's own segments (no copy)."""
        L, m = self.d.n_layers, self.reuse_prefix
        c, src = self._segs.lookup(a, self._seg_tags(0, lsh, ()), own[:1]) if m and lsh else (len(a), -1)
        if lsh < L:
            c = min(c, len(a) - 1)  # a row's stream computes at least one token (its KV reaches the slots)
        segs, slots = {}, {}
        for j, hk in enumerate(keys):
            if lsh < hi and c >= m > 0:
                cs, segs[j] = self._segs.lookup(a, self._seg_tags(lsh, hi, hk), (own[j],))
                c = min(c, cs)
            if hi < L and c >= m > 0:  # a slot's tag: (first layer it holds, heads)
                cs, slots[j] = self._slots_held.lookup(a, [t for t in self._slots_held.index if t[0] <= hi and t[1] == hk])
                c = min(c, cs)
        return (c if m and c >= m else 0), src, segs, slots

    def _prefill_parts(self, batch):
        """Split admitted (group, slots) pairs into prefill batches of at most `prefill_tokens` streams
        (`n_streams`) x padded length, shortest prompts first (a batch pads to its longest)."""
        parts, cur, rows, longest = [], [], 0, 0
        for item in sorted(batch, key=lambda gs: len(gs[0].prompt)):
            g = item[0]
            k = n_streams(g.policies)
            r, n = rows + k, max(longest, len(g.prompt) - 1)
            if cur and r * n > self.prefill_tokens:
                parts.append(cur)
                cur, r, n = [], k, len(g.prompt) - 1
            cur.append(item)
            rows, longest = r, n
        return parts + [cur] if cur else parts

    @torch.no_grad()
    def _prefill_batch(self, batch, lsh: int, hi: int, st: "Slots", cfg: GenConfig):
        d, dev = self.d, self.device
        L = d.n_layers
        full = [prefix_ids(g) for g, _, _ in batch]  # the last prompt token is the first decode input
        plen = max(len(a) for a in full)
        slots = [s for _, rows, _ in batch for s in rows]
        # rows of a group whose prompt bitmaps agree (the original and scope-`generated` rows, say) compute the
        # prompt once, as one stream; from lsh on, each stream's KV goes to its own pool segment (below hi;
        # the group's first segment for its first stream) and to its rows' slots (from hi on)
        streams, stream_key, row_stream, stream2group, stream_seg = [], [], [], [], []
        for gi, (g, _, segs) in enumerate(batch):
            seen = {}
            for p in g.policies:
                hk = p.prompt_heads
                if hk not in seen:
                    seen[hk] = len(streams)
                    stream_seg.append(segs[len(seen) - 1] if lsh < hi else segs[0])
                    streams.append(self._keep_row(p, prompt=True))
                    stream_key.append(hk)
                    stream2group.append(gi)
                row_stream.append(seen[hk])
        keep = torch.stack(streams)  # (N, L, Hq)
        # prefix reuse: the longest prefix whose KV is held for every layer the group computes: below lsh as the
        # intact model computes it, in a segment; from lsh on under each stream's bitmap, in a segment (below
        # the pool's depth) and in a slot (above it)
        pre, base_src, seg_src, slot_src = [], [], {}, {}
        for gi, a in enumerate(full):
            first = stream2group.index(gi)  # the group's streams are numbered first.. in its order
            c, src, segs, slots_ = self._lookup(a, batch[gi][2], stream_keys(batch[gi][0].policies), lsh, hi)
            pre.append(c)
            base_src.append(src)
            seg_src.update({first + j: s for j, s in segs.items()})
            slot_src.update({first + j: s for j, s in slots_.items()})
        for _, _, segs in batch:  # their old content is about to be overwritten: held by nothing until this pass succeeds
            for s in segs:
                self._segs.hold(s, None)
        for s in slots:
            self._slots_held.hold(s, None)
        todo = [len(a) - c for a, c in zip(full, pre)]  # tokens to compute per group
        slen = max(todo)
        self.stats["prompt_tokens"] += sum(todo)
        self.stats["reused_tokens"] += sum(pre)
        ctx = None
        if slen > 0:
            self.stats["prefills"] += 1  # passes that run the model (a 1-token prompt runs none)
            ctx = PrefillPass(self, len(batch), len(streams), lsh, plen, keep, stream2group, hi,
                              segs=batch[0][2] if len(batch) == 1 else None)
        # the reused prefixes, into the staging or else into the group's own segments (unless already there)
        stage = ctx is not None and not ctx.in_place
        base_moves = [(gi, pre[gi], s, batch[gi][2][0]) for gi, s in enumerate(base_src) if pre[gi] and s >= 0]
        seg_moves = [(si, pre[stream2group[si]], s, stream_seg[si]) for si, s in seg_src.items() if pre[stream2group[si]]]
        for l in range(hi):
            moves = [mv for mv in (base_moves if l < lsh else seg_moves) if stage or mv[2] != mv[3]]
            srcs = [(self.pk[l][src, :, :c], self.pv[l][src, :, :c]) for _, c, src, _ in moves]
            if not stage and len(moves) > 1:  # one move's destination may be another's source
                srcs = [(k.clone(), v.clone()) for k, v in srcs]
            for (i, c, _, dst), (k, v) in zip(moves, srcs):
                dk, dv = (ctx.k[l][i], ctx.v[l][i]) if stage else (self.pk[l][dst], self.pv[l][dst])
                dk[:, :c] = k
                dv[:, :c] = v
        for si, slot in slot_src.items():  # each stream's prefix from its slot, into the staging (from hi on)
            c = pre[stream2group[si]]
            for l in range(hi, L) if c else ():
                ctx.k[l][si, :, :c] = self.k[l][slot, :, :c]
                ctx.v[l][si, :, :c] = self.v[l][slot, :, :c]
        if ctx is not None:
            # the host's inputs in one copy to the GPU (pinned; no wait for a decode step in flight)
            host = np.zeros((len(batch), slen + 2), dtype=np.int64)  # ids, then left pads and reused prefix
            for gi, (a, c) in enumerate(zip(full, pre)):
                if len(a) > c:
                    host[gi, slen - (len(a) - c): slen] = a[c:]
                host[gi, slen:] = slen - todo[gi], c
            host = to_device(host, dev)
            ids, pads, pre_t = host[:, :slen], host[:, slen], host[:, slen + 1]
            pos = (pre_t[:, None] + torch.arange(slen, device=dev)[None, :] - pads[:, None]).clamp(min=0)
            self._ctx = ctx
            chunk = max(1, min(self.chunk, self.prefill_tokens // len(streams)))  # streams x chunk within the budget
            try:
                with hf.active(ctx):
                    for start in range(0, slen, chunk):
                        size = min(chunk, slen - start)
                        ctx.set_chunk(start, size, pads, pre_t)
                        self.model.model(input_ids=ids[:, start : start + size],
                                         position_ids=pos[:, start : start + size], attention_mask=self._mask,
                                         use_cache=False)
            finally:
                self._ctx = None
            base_t = to_device(np.array([segs[0] for _, _, segs in batch], dtype=np.int64), dev)
            seg_t = to_device(np.array(stream_seg, dtype=np.int64), dev)
            slot_t = to_device(np.array(slots, dtype=np.int64), dev)
            # each stream's KV to the slots of its rows (broadcast: no rows x prompt temporary)
            by_stream = [] if len(streams) == len(slots) else [
                (s, to_device(np.array([slot for slot, r in zip(slots, row_stream) if r == s], dtype=np.int64), dev))
                for s in range(len(streams))]
            for l in range(L):
                if l < hi:
                    if not ctx.in_place:
                        dst = base_t if l < lsh else seg_t
                        self.pk[l][dst, :, :plen] = ctx.k[l][:, :, :plen]
                        self.pv[l][dst, :, :plen] = ctx.v[l][:, :, :plen]
                elif not by_stream:  # one row per stream, in order
                    self.k[l][slot_t, :, :plen] = ctx.k[l][:, :, :plen]
                    self.v[l][slot_t, :, :plen] = ctx.v[l][:, :, :plen]
                else:
                    for si, st_slots in by_stream:
                        self.k[l][st_slots, :, :plen] = ctx.k[l][si: si + 1, :, :plen]
                        self.v[l][st_slots, :, :plen] = ctx.v[l][si: si + 1, :, :plen]
        r0 = 0  # the group's first row among row_stream
        for gi, (g, rows, segs) in enumerate(batch):
            n = len(g.prompt) - 1
            gstreams = [si for si in range(len(streams)) if stream2group[si] == gi]
            for j, s in enumerate(segs):
                self.pool_len[s] = n
                # the first segment holds layers [0, hi) (its first stream's, the group's below lsh); the others
                # their stream's in [lsh, hi)
                self._segs.hold(s, full[gi] if hi else None, (0 if j == 0 else lsh, hi, stream_key[gstreams[j]]))
            gid = id(g)
            st.groups[gid] = g
            st.group_seg[gid] = list(segs)
            st.reused[gid] = pre[gi]
            for r, slot in enumerate(rows):
                pol, si = g.policies[r], row_stream[r0 + r]
                if hi < L:  # the row's own prompt KV from hi on: reusable by a later row with its bitmap
                    self._slots_held.hold(slot, full[gi], (hi, stream_key[si]))
                seed = g.seeds[r] if g.seeds is not None else cfg.seed + self._row0[id(g)] + r
                st.start(slot, gid, r, pol, seed, g.prompt[-1], n)
                st.keep_prompt[slot] = self._keep_row(pol, prompt=True)
                st.keep_gen[slot] = self._keep_row(pol, prompt=False)
                self.kv_len[:, slot] = to_device(np.array([0 if l < hi else n for l in range(L)], dtype=np.int32), dev)
                self._idle[slot] = False
                self._row_seg_host[:, slot] = [(segs[0] if l < lsh else stream_seg[si]) if l < hi and n > 0 else -1
                                               for l in range(L)]
            r0 += len(rows)
        self._refresh_layout()
