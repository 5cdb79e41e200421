"""The engine's prefill: where a group's prompt KV lives (its layout), which admitted groups are computed
together and in what order (prefix reuse), and the pass that computes their prompts' KV into blocks.

A group's prompt KV is one set of blocks per *segment*: below its shared depth `lsh` every row reads
the intact model's KV (the *base*); from `lsh` on each prefill stream (a distinct prompt bitmap) has
its own. A stream that reads the prompt intact doubles as the base (its blocks hold every layer);
otherwise the base is a segment of its own. Each full block is cached under the hash of the tokens
up to its end, so a later prompt with the same prefix takes the blocks instead of computing them.

`PrefillRunner` holds the engine; `PrefillPass` is the attention context one pass installs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from retmask.kernels import masked_attention

from . import hf
from .blocks import BlockTag, chain_hashes
from .cache_plan import blocks_for
from .decoding import to_device
from .policy import GenConfig, Group
from .prefix import common_prefix, prefix_ids, prefix_order

if TYPE_CHECKING:
    from .decoding import Slots
    from .engine import Engine


@dataclass(frozen=True)
class Layout:
    """Where a group's prompt KV lives. `streams`: each prefill stream's prompt bitmap (heads off over the
    prompt, () for intact); `row_stream[r]`: row r's stream; `lsh`: the shared depth; `base`: the stream
    that doubles as the base, or -1 when the base is a segment of its own (segment `len(streams)`)."""

    lsh: int
    streams: tuple
    row_stream: tuple
    base: int
    n_layers: int

    @property
    def n_segs(self) -> int:
        return len(self.streams) + (1 if self.base < 0 and self.lsh > 0 else 0)

    def base_seg(self) -> int:
        """The segment index (within the group's) holding the layers below lsh."""
        return self.base if self.base >= 0 else len(self.streams)

    def tag(self, j: int) -> BlockTag:
        """What segment j's blocks hold."""
        if j == len(self.streams):
            return BlockTag(0, self.lsh, ())
        heads = self.streams[j]
        return BlockTag(0, self.n_layers, ()) if not heads else BlockTag(self.lsh, self.n_layers, heads)


def layout(policies, n_layers: int, sharing: bool) -> Layout:
    """The layout of a group of `policies`. Without sharing, every row is a stream of its own and nothing
    is shared below any depth."""
    if sharing:
        keys = list(dict.fromkeys(p.prompt_heads for p in policies))
        row_stream = tuple(keys.index(p.prompt_heads) for p in policies)
        lsh = min(p.prompt_depth(n_layers) for p in policies)
    else:
        keys = [p.prompt_heads for p in policies]
        row_stream = tuple(range(len(policies)))
        lsh = 0
    base = keys.index(()) if () in keys else -1
    return Layout(lsh, tuple(keys), row_stream, base, n_layers)


class PrefillPass:
    """Attention context of one prefill batch: staging KV (every layer, padded to whole blocks, plus a
    trash column for left padding), chunk geometry, the expansion point."""

    owns_masks = True

    def __init__(self, eng: "Engine", n_groups: int, rows: int, lsh: int, plen: int, keep: torch.Tensor,
                 row2group: list[int]):
        # rows: the streams computed from layer `lsh` on; keep (R, L, Hq) on the host
        d, dev = eng.d, eng.device
        self.eng, self.lsh, self.plen = eng, lsh, plen
        self.cap = blocks_for(plen, eng.block_size) * eng.block_size  # staged positions, whole blocks
        self.n_groups, self.rows = n_groups, rows
        self.row2group = to_device(np.asarray(row2group, dtype=np.int64), dev)
        self.keep = to_device(keep, dev)  # (R, L, Hq)
        self.layer_all_on = keep.all(-1).all(0).tolist()  # (L,)
        shape = lambda n: (n, d.n_kv_heads, self.cap + 1, d.head_dim)  # noqa: E731  (+1: the trash column)
        self.k = [torch.zeros(shape(n_groups if l < lsh else rows), dtype=eng.dtype, device=dev)
                  for l in range(d.n_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.dest = {}  # batch size -> (N, C) destination index of each chunk position
        self.kv_lens = {}

    def blocks(self, l: int, which: str) -> torch.Tensor:
        """Layer l's staging as whole blocks: (N, Hkv, nb, Bs, D) view."""
        t = (self.k if which == "k" else self.v)[l][:, :, : self.cap]
        n, h, _, dh = t.shape
        return t.view(n, h, self.cap // self.eng.block_size, self.eng.block_size, dh)

    def set_chunk(self, start: int, size: int, pads_g: torch.Tensor, pre_g: torch.Tensor):
        """Chunk covers padded indices [start, start + size) of the tokens to compute; pads_g (G,) left
        padding per group, pre_g (G,) tokens before them whose KV is already staged (a reused prefix)."""
        idx = torch.arange(start, start + size, device=pads_g.device)
        for n, pads, pre in ((self.n_groups, pads_g, pre_g),
                             (self.rows, pads_g[self.row2group], pre_g[self.row2group])):
            j = idx[None, :] - pads[:, None]  # (N, C) index of each chunk token among those computed
            self.dest[n] = torch.where(j >= 0, pre[:, None] + j, self.cap)  # its position, or the trash column
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


class PrefillRunner:
    """Prefill of admitted groups: layouts, prefix lookups, block tables and the passes."""

    def __init__(self, eng: "Engine"):
        self.eng = eng

    def layout(self, g: Group) -> Layout:
        e = self.eng
        return layout(g.policies, e.d.n_layers, e.sharing)

    def run(self, admitted, st: "Slots", cfg: GenConfig):
        """Prefill `admitted` (group, slots, segments) items and start their rows."""
        by_lsh: dict[int, list] = {}
        for item in admitted:
            by_lsh.setdefault(self.layout(item[0]).lsh, []).append(item)
        for lsh, batch in by_lsh.items():
            for phase in self._reuse_phases(batch):
                for part in self._parts(phase):
                    self._batch(part, lsh, st, cfg)

    # ---- prefix reuse ------------------------------------------------------------------------
    def cached(self, ids: np.ndarray, lay: Layout) -> tuple[int, list[list[int]]]:
        """Prefix reuse for one group: the leading full blocks of its prompt `ids` that the cache holds for
        every segment of its layout, as (blocks, [each segment's cached block ids]); 0 blocks when under
        `reuse_prefix` tokens."""
        e = self.eng
        if not e.reuse_prefix or len(ids) < e.reuse_prefix:
            return 0, [[] for _ in range(lay.n_segs)]
        digests = chain_hashes(ids, e.block_size)
        found = []
        for j in range(lay.n_segs):
            t = lay.tag(j)
            found.append(e.blocks.match(digests, t.lo, t.hi, t.heads))
        c = min(len(f) for f in found)
        if c * e.block_size < e.reuse_prefix:
            c = 0
        return c, [f[:c] for f in found]

    def _reuse_phases(self, batch):
        """The groups of one admission in prefill order, for prefix reuse. Among groups with the same
        prefill streams, in each cluster whose prompts share at least `reuse_prefix` tokens, the group whose
        prefixes in common with the others add up the most (for NIAH tests of one haystack, the one whose
        needle comes last) is a root; a group that shares more with its root than the cache holds now
        waits for a second pass, which finds the root's blocks cached."""
        m, n = self.eng.reuse_prefix, len(batch)
        if not m or n < 2:
            return [batch]
        classes: dict[tuple, list[int]] = {}  # a root's KV serves the groups whose streams it computes
        for i, (g, _, _) in enumerate(batch):
            classes.setdefault(tuple(sorted(self.layout(g).streams)), []).append(i)
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
                    bs = self.eng.block_size
                    for i in range(size):
                        gi = members[order[k + i]]
                        ids = arrs[order[k + i]]
                        gain = best[i] // bs * bs  # whole blocks
                        now = self.cached(ids, self.layout(batch[gi][0]))[0] * bs
                        if i != root and gain >= m and gain > now:
                            later.add(gi)
                k = e + 1
        first = [b for gi, b in enumerate(batch) if gi not in later]
        second = [b for gi, b in enumerate(batch) if gi in later]
        return [p for p in (first, second) if p]

    def _parts(self, batch):
        """Split admitted items into prefill batches of at most `prefill_tokens` streams x padded length,
        shortest prompts first (a batch pads to its longest)."""
        parts, cur, rows, longest = [], [], 0, 0
        for item in sorted(batch, key=lambda gs: len(gs[0].prompt)):
            g = item[0]
            k = len(self.layout(g).streams)
            r, n = rows + k, max(longest, len(g.prompt) - 1)
            if cur and r * n > self.eng.prefill_tokens:
                parts.append(cur)
                cur, r, n = [], k, len(g.prompt) - 1
            cur.append(item)
            rows, longest = r, n
        return parts + [cur] if cur else parts

    # ---- one pass ------------------------------------------------------------------------------
    @torch.no_grad()
    def _batch(self, batch, lsh: int, st: "Slots", cfg: GenConfig):
        e = self.eng
        d, dev, bs, bm = e.d, e.device, e.block_size, e.blocks
        L = d.n_layers
        full = [prefix_ids(g) for g, _, _ in batch]  # the last prompt token is the first decode input
        lays = [self.layout(g) for g, _, _ in batch]
        plen = max(len(a) for a in full)
        # the streams of the pass: rows of a group whose prompt bitmaps agree compute the prompt once
        streams, stream2group, stream_seg = [], [], []
        for gi, ((g, _, segs), lay) in enumerate(zip(batch, lays)):
            for j, heads in enumerate(lay.streams):
                pol = g.policies[lay.row_stream.index(j)]
                streams.append(e._keep_row(pol, prompt=True))
                stream2group.append(gi)
                stream_seg.append(segs[j])
        # each segment's blocks: the cached prefix (a reference more) and new ones
        pre, tables = [], []  # per group: reused tokens; per group, per segment: block ids
        try:
            for gi, (a, lay) in enumerate(zip(full, lays)):
                c, hits = self.cached(a, lay)
                pre.append(c * bs)
                nb = blocks_for(len(a), bs)
                segs_tables = []
                for j in range(lay.n_segs):
                    bm.ref(hits[j], reused=True)
                    segs_tables.append(hits[j] + bm.allocate(nb - c))
                tables.append(segs_tables)
        except MemoryError:  # admission counted these blocks: only a bookkeeping error gets here
            for t in tables:
                for ids in t:
                    bm.free(ids)
            raise
        for gi, (g, rows, segs) in enumerate(batch):  # held by the run from here: freed if the pass fails
            st.groups[id(g)], st.group_seg[id(g)], st.group_slots[id(g)] = g, list(segs), list(rows)
            for j, s in enumerate(segs):
                e._set_segment(s, tables[gi][j], len(full[gi]))
        todo = [len(a) - c for a, c in zip(full, pre)]  # tokens to compute per group
        slen = max(todo)
        e.stats["prompt_tokens"] += sum(todo)
        e.stats["reused_tokens"] += sum(pre)
        if slen > 0:
            e.stats["prefills"] += 1  # passes that run the model (a 1-token prompt runs none)
            ctx = PrefillPass(e, len(batch), len(streams), lsh, plen, torch.stack(streams), stream2group)
            # base rows (below lsh: one per group) and stream rows (from lsh on): (staging row, segment table)
            base = [(gi, tables[gi][lays[gi].base_seg()]) for gi in range(len(batch))] if lsh else []
            upper, si = [], 0
            for gi, lay in enumerate(lays):
                for j in range(len(lay.streams)):
                    upper.append((si, tables[gi][j]))
                    si += 1

            def index(rows, first, last):
                """(staging row, block slot, block id) of blocks [first(gi), last(gi)) of each row's table."""
                out = [(r, j, t[j]) for r, t in rows for j in range(first(r), last(r))]
                a = np.array(out, dtype=np.int64).reshape(-1, 3).T
                return [to_device(x, dev) for x in a] if len(out) else None

            g_of = lambda r, rows: r if rows is base else stream2group[r]  # noqa: E731
            # the reused prefixes, from their blocks into the staging
            for rows in (base, upper):
                idx = index(rows, lambda r, rows=rows: 0, lambda r, rows=rows: pre[g_of(r, rows)] // bs)
                if idx is None:
                    continue
                r_t, j_t, b_t = idx
                for l in (range(lsh) if rows is base else range(lsh, L)):
                    for w in ("k", "v"):
                        ctx.blocks(l, w)[r_t, :, j_t] = (e.k if w == "k" else e.v)[l][b_t]  # (M, Hkv, Bs, D)
            # the host's inputs in one copy (pinned on a GPU; no wait for a decode step in flight)
            host = np.zeros((len(batch), slen + 2), dtype=np.int64)  # ids, then left pads and reused prefix
            for gi, (a, c) in enumerate(zip(full, pre)):
                if len(a) > c:
                    host[gi, slen - (len(a) - c): slen] = a[c:]
                host[gi, slen:] = slen - todo[gi], c
            host = to_device(host, dev)
            ids, pads, pre_t = host[:, :slen], host[:, slen], host[:, slen + 1]
            pos = (pre_t[:, None] + torch.arange(slen, device=dev)[None, :] - pads[:, None]).clamp(min=0)
            chunk = max(1, min(e.chunk, e.prefill_tokens // len(streams)))  # streams x chunk within the budget
            e._ctx = ctx
            try:
                with hf.active(ctx):
                    for start in range(0, slen, chunk):
                        size = min(chunk, slen - start)
                        ctx.set_chunk(start, size, pads, pre_t)
                        e.model.model(input_ids=ids[:, start: start + size],
                                      position_ids=pos[:, start: start + size], attention_mask=e._mask,
                                      use_cache=False)
            finally:
                e._ctx = None
            # the computed blocks, from the staging into the pool (one copy per layer)
            for rows in (base, upper):
                idx = index(rows, lambda r, rows=rows: pre[g_of(r, rows)] // bs,
                            lambda r, rows=rows: blocks_for(len(full[g_of(r, rows)]), bs))
                if idx is None:
                    continue
                r_t, j_t, b_t = idx
                for l in (range(lsh) if rows is base else range(lsh, L)):
                    for w in ("k", "v"):
                        (e.k if w == "k" else e.v)[l][b_t] = ctx.blocks(l, w)[r_t, :, j_t]
        if e.reuse_prefix:  # the new full blocks, findable by a later prompt with the same prefix
            for gi, (a, lay) in enumerate(zip(full, lays)):
                digests = chain_hashes(a, bs)
                for j in range(lay.n_segs):
                    for b in range(pre[gi] // bs, len(digests)):
                        bm.cache(tables[gi][j][b], digests[b], lay.tag(j))
        for gi, ((g, rows, segs), lay) in enumerate(zip(batch, lays)):
            n = len(g.prompt) - 1
            gid = id(g)
            st.reused[gid] = pre[gi]
            for r, slot in enumerate(rows):
                pol = g.policies[r]
                seed = g.seeds[r] if g.seeds is not None else cfg.seed + e._row0[gid] + r
                st.start(slot, gid, r, pol, seed, g.prompt[-1], n)
                st.keep_prompt[slot] = e._keep_row(pol, prompt=True)
                st.keep_gen[slot] = e._keep_row(pol, prompt=False)
                base_s, own_s = segs[lay.base_seg()] if lay.lsh else -1, segs[lay.row_stream[r]]
                e._row_seg_host[:, slot] = [(base_s if l < lay.lsh else own_s) if n > 0 else -1 for l in range(L)]
                e._idle[slot] = False
        e._refresh_layout()
