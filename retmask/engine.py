"""The engine: several policies of one Hugging Face causal LM in one batched pass over one copy of
the weights, with the KV cache shared wherever the sharing rule proves it identical.

A *group* is one prompt and its rows, one row per *policy* (heads off + mask scope). The prompt,
minus its last token, is prefilled in chunks: layers below the group's *shared depth* `Lsh` run once
per group and their KV is stored once in a pool segment; from layer `Lsh` on, the hidden states are
expanded to one per *prefill stream*, a distinct prompt bitmap (rows that read the prompt alike, such
as the original and scope-`generated` rows, compute it once). `Lsh` is the lowest layer holding a head
that is off over the prompt in any row of the group (all layers when every row leaves the prompt
intact: the original policy, or scope `generated`). The engine *pools* the first `pool_layers`
layers: there the prompt's KV lives in the group's segments (from `Lsh` on, one segment per stream)
and each row keeps only its new tokens; above them each row keeps its stream's prompt KV privately.
Decoding starts from the last prompt token, so every generated token has its step (and its per-head
argmax when asked), and rows of all groups decode together in fixed slots; a finished row frees its
slot for the next waiting group.

*Prefix reuse*: a pool segment keeps its prompt's KV after its group finishes, and so does a slot (its
row's own prompt KV above the pooled layers). A group whose prompt starts with tokens held for every
layer it computes (at least `reuse_prefix` of them: below `Lsh` the intact model's KV, in a segment;
from `Lsh` on each stream's, in a segment and a slot that held KV computed with the same heads off)
copies that KV instead of computing it, and prefills only the rest. NIAH tests of one haystack share
everything before their needle; `prefix_order` puts such prompts next to each other.
"""

from __future__ import annotations

import bisect
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from retmask.kernels import SegmentLayout, masked_attention, masked_decode, segment_layout
from retmask.kernels._launch import next_pow2, on_device

from . import hf
from .heads import HeadSet
from .sampling import Sampling, next_tokens

SCOPES = ("all", "generated")
DECODE_MODES = ("auto", "eager", "static", "graph")


@dataclass(frozen=True)
class Policy:
    """Heads to switch off (None: the original) and where: scope `all` (every position, the
    paper's zeroed-column checkpoint) or `generated` (generated positions only; the prompt is read
    by the intact model)."""

    heads: HeadSet | None = None
    scope: str = "all"
    name: str = ""

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}: use 'all' or 'generated'")
        if self.heads is not None and len(self.heads) == 0:
            object.__setattr__(self, "heads", None)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return "original" if self.heads is None else f"off{len(self.heads)}-{self.scope}"

    @property
    def prompt_heads(self) -> tuple:
        """The heads this policy switches off over the prompt, sorted (empty: it reads the prompt intact);
        rows with equal values compute the same prompt KV."""
        return () if self.heads is None or self.scope == "generated" else tuple(sorted(self.heads))

    def prompt_depth(self, n_layers: int) -> int:
        """Layers whose prompt KV this policy leaves identical to the original's."""
        if self.heads is None or self.scope == "generated":
            return n_layers
        return self.heads.lowest_layer


ORIGINAL = Policy(None, "all", "original")


@dataclass
class Group:
    prompt: Sequence[int]
    policies: Sequence[Policy]
    # one per row; default: GenConfig.seed + the row's index among all rows of the generate() call, so
    # no two rows of a call draw the same noise
    seeds: Sequence[int] | None = None
    key: Any = None


@dataclass
class RowResult:
    policy: str
    tokens: list[int]
    finish: str  # "eos", "stop", "length"
    argmax: torch.Tensor | None = None  # (T, layers, heads) key positions, -1 for heads off
    logits: torch.Tensor | None = None  # (T, vocab) when GenConfig.keep_logits


@dataclass
class GroupResult:
    key: Any
    prompt_len: int
    rows: list[RowResult]
    reused: int = 0  # prompt tokens whose KV was copied from a segment or slot holding them (prefix reuse)


@dataclass(frozen=True)
class GenConfig:
    max_new_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    eos_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    return_argmax: bool = False
    keep_logits: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")


class _Prefill:
    """Attention context of one prefill batch: staging KV, chunk geometry, the expansion point."""

    owns_masks = True

    def __init__(self, eng: "Engine", n_groups: int, rows: int, lsh: int, plen: int, keep: torch.Tensor,
                 row2group: torch.Tensor, hi: int = 0, segs: list[int] | None = None):
        # rows: the streams computed from layer `lsh` on (a group's rows with the same prompt bitmap are one)
        d, dev = eng.d, eng.device
        self.eng, self.lsh, self.plen = eng, lsh, plen
        self.n_groups, self.rows, self.row2group = n_groups, rows, row2group
        self.keep = keep  # (R, L, Hq)
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


class _Decode:
    """Attention context of one decode step over all slots.

    Eager (`static=False`): built for one step from the host state; layers where every head is on
    skip the keep bitmap and layers with no shared segment skip the pool. Static: built once over
    fixed buffers and used for every step; each layer always gets the bitmap and the pool (a row
    with segment -1 reads none), so the launches never depend on the step and a CUDA graph can
    replay them."""

    owns_masks = True

    def __init__(self, eng: "Engine", keep: torch.Tensor, layer_all_on: list[bool] | None, want_argmax: bool,
                 max_group_rows: int, static: bool = False):
        self.eng, self.keep, self.layer_all_on, self.static = eng, keep, layer_all_on, static
        self.max_group_rows = max_group_rows
        self.argmax = torch.full((eng.slots, eng.d.n_layers, eng.d.n_heads), -1, dtype=torch.int64,
                                 device=eng.device) if want_argmax else None

    def attend(self, module, q, k, v, scaling, window):
        e, l = self.eng, module.layer_idx
        ar = e._slot_ids
        # the new token's K/V at each row's private end; an idle slot's in its spare last column, so the
        # prompt KV a finished row leaves (prefix reuse) stays whole
        at = torch.where(e._idle, e.private_cap[l], e.kv_len[l]).long()
        e.k[l][ar, :, at] = k[:, :, 0]
        e.v[l][ar, :, at] = v[:, :, 0]
        keep = self.keep[:, l] if self.static or not self.layer_all_on[l] else None
        shared = {}
        if l < e.pool_layers and (self.static or e.layer_shared[l]):
            shared = dict(shared_k=e.pk[l], shared_v=e.pv[l], shared_lens=e.pool_len, row_seg=e.row_seg[l],
                          max_group_rows=self.max_group_rows, seg_layout=e.seg_layout.select(l))
        res = masked_decode(q[:, :, 0], e.k[l], e.v[l], e.kv_len[l] + 1, keep, window=window, scale=scaling,
                            return_argmax=self.argmax is not None, check_values=False, **shared)
        if self.argmax is not None:
            res, pos, _ = res
            self.argmax[:, l] = pos
        return res[:, None]  # (S, 1, Hq, D)

    def expand(self, layer, t):
        return t


class _StaticStep:
    """The decode step over fixed device buffers (input ids, positions, keep bitmap in; logits and
    argmax out): the same launches every step and no host sync, so on CUDA it is captured once as a
    CUDA graph and replayed. A capture that fails warns and leaves the step running eagerly."""

    def __init__(self, eng: "Engine", want_argmax: bool, max_group_rows: int, capture: bool):
        d, s, dev = eng.d, eng.slots, eng.device
        self.eng = eng
        self.ids = torch.zeros(s, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(s, 1, dtype=torch.long, device=dev)
        self.keep = torch.zeros(s, d.n_layers, d.n_heads, dtype=torch.bool, device=dev)
        self.ctx = _Decode(eng, self.keep, None, want_argmax, max_group_rows, static=True)
        self.logits: torch.Tensor | None = None
        self.graph = None
        self.error: str | None = None
        if capture:
            self._capture()

    def _forward(self) -> torch.Tensor:
        with hf.active(self.ctx):
            self.logits = self.eng.model(input_ids=self.ids, position_ids=self.pos, use_cache=False).logits[:, -1]
        return self.logits

    def _capture(self):
        # The buffers hold all heads off, so warm-up reads nothing; its K/V writes land at each row's
        # next free position, which the next real step overwrites before any read.
        dev = self.eng.device  # the current device already (Engine._step runs under on_device)
        try:
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # compile the Triton kernels, let cuBLAS pick, outside the capture
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._forward()
            self.graph = graph
        except Exception as e:  # noqa: BLE001  (any capture failure falls back to running the same step)
            self.graph = None
            self.error = f"{type(e).__name__}: {e}"
            warnings.warn(f"retmask engine: CUDA graph capture of the decode step failed ({self.error}); "
                          "decoding without a graph (Engine(decode='static') avoids the attempt)", stacklevel=3)

    def run(self, ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        self.keep.copy_(keep)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


def default_size(model, rows: int, cpu_slots: int, fraction: float = 0.7) -> dict:
    """Engine sizing when the user gave neither `slots` nor `kv_budget_gb`. On CUDA: a KV budget of
    `fraction` of the memory free after loading the model (including what PyTorch's allocator holds
    unused), capped at the `rows` the job has (a 128K detection gets the slots that fit, a short one
    no more than it needs). Elsewhere: `cpu_slots`."""
    p = next(model.parameters())
    if p.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(p.device)
        # memory PyTorch freed but its caching allocator still holds (e.g. an earlier engine's cache,
        # closed in this process) is free for this one too: the device query alone does not count it
        cached = torch.cuda.memory_reserved(p.device) - torch.cuda.memory_allocated(p.device)
        return {"kv_budget_gb": fraction * (free + cached) / 1e9, "max_slots": max(1, rows)}
    return {"slots": max(1, min(cpu_slots, rows))}


class Engine:
    """Batched multi-policy generation over one Hugging Face causal LM (Llama, Qwen3, OLMo-3).

    Args:
        model: a loaded causal LM; it is switched to retmask attention (`hf.attach`).
        tokenizer: needed only for stop strings.
            A model on the meta device (built from its config alone) gets no cache: such an engine
            only answers sizing questions (`slots`, `n_segments`, `bytes_per_slot`, `staging_bytes`).
        slots: rows decoded together. Or give `kv_budget_gb` and the engine sizes it (at most
            `max_slots`, when given): the cache plus the K/V one prefill pass stages
            (`staging_bytes`) fit the budget. `default_size` picks one of them for a job.
        max_len: per-row context capacity (prompt + new tokens).
        policies: the policies of the groups this engine will run (a sizing hint; other groups still
            run when they fit). The engine pools either the prompt layers such a group shares (below
            its shared depth; one segment per group) or every layer (one segment per prefill stream),
            whichever costs less per group at max_len; unpooled layers get full-length private KV. For
            a RetMask pair whose heads start at layer 2 of 32, the cache per row is then about half of
            what it is without the hint; for NIAH's 7 policies (4 streams) with private_len = its
            decode steps, the prompt is stored 4 times instead of 7. Default: every layer has a pool,
            one segment per slot.
        segments: pool segments. A group takes a run of consecutive free ones (one per prefill stream
            when it shares fewer layers than the pool holds, else one) and keeps them until its last
            row finishes, so with one segment per group of slots the early-finished
            rows of a group leave their slots idle until then (for rows of independent lengths, about
            a third of the slot-steps). Default: one per slot when a segment costs at most half a
            row's private KV (a pair whose heads start low: a few pooled layers), so the slots freed
            by rows of different groups take the next group at once, without waiting for their
            partners; else one per prefill stream of the hint's group, per `len(policies)` slots.
        private_len: private KV capacity at the layers that have a pool (default max_len). A row
            keeps only its new tokens there, so `private_len = max_new_tokens` saves the most.
            Detection is the extreme case: every row leaves the prompt intact, so every layer is
            shared and the prompt's KV is stored once.
        chunk: prefill chunk length (tokens).
        prefill_tokens: most tokens one prefill pass holds (rows x padded prompt length, where a group's
            rows with the same prompt bitmap count once: they compute the prompt together), which bounds
            its staging KV and activations: the groups admitted together are prefilled in batches
            under it (similar lengths together, so little padding), and the chunk is cut so that
            rows x chunk stays under it. A group over it on its own is prefilled alone.
        sharing: store identical prompt KV once per group (off: every row has its own, for checks).
        on_too_long: "error" (default) or "skip" for a prompt that cannot fit `max_len`.
        admit_rows: rows that must be admissible (free slots, and free pool segments for their
            groups) before waiting groups are admitted while other rows decode (default
            `max(rows per group, slots // 16)`; also when the whole queue fits, or nothing decodes).
            Each admission runs prefill passes between two decode steps (one per sharing depth and
            per `prefill_tokens`), each with a fixed cost (its
            launches, about a decode step's time on a GPU). With many slots and rows of mixed
            lengths a row ends nearly every step, so admitting at every free slot would pay that
            cost nearly every step; waiting for a few slots leaves them idle a few steps instead.
        reuse_prefix: shortest prompt prefix (tokens) worth reusing: a group copies the KV of the
            longest prefix of its prompt held for every layer it computes (pool segments and slots keep
            their prompt's KV after their group finished, and serve streams whose bitmaps agree with
            theirs below each layer) and prefills only the rest. 0 turns it off (so does sharing=False).
            Groups with the same prefill streams, admitted together, that share a longer prefix with
            each other than with what is held are prefilled in two passes, so the later ones reuse the
            earlier ones'. The copied KV is what the same tokens at the same positions compute, so
            only float rounding can differ.
        decode: how each decode step runs. "eager": the attention context is rebuilt from the host
            state every step. "static": every step runs the same launches over fixed buffers (what
            a CUDA graph captures). "graph": the static step captured once as a CUDA graph per
            (argmax on/off, largest group) and replayed (CUDA only). "auto" (default): "graph" on
            CUDA, "eager" elsewhere. All give the same tokens.
    """

    def __init__(self, model, tokenizer=None, *, slots: int | None = None, kv_budget_gb: float | None = None,
                 max_len: int = 4096, chunk: int = 1024, sharing: bool = True, on_too_long: str = "error",
                 private_len: int | None = None, decode: str = "auto", policies: Sequence[Policy] | None = None,
                 max_slots: int | None = None, segments: int | None = None, prefill_tokens: int = 32768,
                 admit_rows: int | None = None, reuse_prefix: int = 128):
        hf.attach(model)
        self.model, self.tokenizer = model, tokenizer
        self.d = hf.dims(model)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if on_too_long not in ("error", "skip"):
            raise ValueError(f"on_too_long={on_too_long!r}: use 'error' or 'skip'")
        if chunk < 1 or max_len < 2 or prefill_tokens < 1:
            raise ValueError(f"chunk={chunk}, max_len={max_len}, prefill_tokens={prefill_tokens}: need chunk >= 1, "
                             "max_len >= 2 and prefill_tokens >= 1")
        self.max_len, self.chunk, self.sharing, self.on_too_long = max_len, chunk, sharing, on_too_long
        self.prefill_tokens = prefill_tokens
        if reuse_prefix < 0:
            raise ValueError(f"reuse_prefix={reuse_prefix}: must be >= 0 (0 turns prefix reuse off)")
        self.private_len = max_len if private_len is None else private_len
        if decode not in DECODE_MODES:
            raise ValueError(f"decode={decode!r}: use one of {', '.join(DECODE_MODES)}")
        if decode == "graph" and self.device.type != "cuda":
            raise ValueError(f"decode='graph' needs a CUDA model (this one is on {self.device}); use 'auto'")
        self.decode = ("graph" if self.device.type == "cuda" else "eager") if decode == "auto" else decode
        self._steps: dict[tuple[bool, int], _StaticStep] = {}
        self._group_max = 1
        self._busy = False
        self._closed = False
        if not 1 <= self.private_len <= max_len:
            raise ValueError(f"private_len={private_len}: must lie in [1, max_len={max_len}]")
        L = self.d.n_layers
        if policies is not None and not policies:
            raise ValueError("policies: give at least one (the rows of a typical group), or None")
        for p in policies or ():
            if p.heads is not None:
                p.heads.validate(L, self.d.n_heads)
        self.group_rows = len(policies) if policies else 1
        self.group_streams = self._streams(policies) if policies else 1  # rows a group's prefill computes
        # layers with a pool (prompt KV in segments; a row keeps only its new tokens there) and the private
        # capacity of each layer: the hint's shared depth, or every layer when storing each stream's prompt
        # KV once (one segment per stream) costs less than a full private prompt per row
        self.pool_layers = self._pool_depth(policies, L, self.private_len, max_len) if sharing else 0
        self.private_cap = [self.private_len if l < self.pool_layers else max_len for l in range(L)]
        # segments a group of the hint takes: one per prefill stream when it shares fewer layers than the pool
        self.group_segs = (self._streams(policies) if policies and self._shared_depth(policies) < self.pool_layers
                           else 1)
        self.reuse_prefix = min(reuse_prefix, max_len) if sharing else 0  # no prefix is longer than max_len
        if segments is not None and segments < 1:
            raise ValueError(f"segments={segments}: must be >= 1 (or None: sized with the slots)")
        cheap = 2 * self.pool_layers * max_len <= sum(self.private_cap)  # a segment vs a row's private KV
        self._seg_per_slot = cheap or self.group_rows == 1  # else group_segs per group of slots
        if slots is not None and slots < 1:
            raise ValueError(f"slots={slots}: must be >= 1")
        if kv_budget_gb is not None and not kv_budget_gb > 0:
            raise ValueError(f"kv_budget_gb={kv_budget_gb}: must be > 0")
        if slots is None:
            if kv_budget_gb is None:
                raise ValueError("give slots (rows decoded together) or kv_budget_gb (KV memory to use)")
            budget = kv_budget_gb * 1e9 - (segments or 0) * self.bytes_per_segment()
            per_slot = self.bytes_per_slot(with_pool=segments is None)
            hi = int(budget // per_slot) if budget > 0 else 0
            if max_slots is not None:
                hi = min(hi, max_slots)
            lo = 0  # the most slots whose cache plus one prefill pass's staging fit the budget
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if mid * per_slot + self.staging_bytes(mid) <= budget else (lo, mid - 1)
            slots = lo
            if 1 <= slots < self.group_rows:
                if max_slots is not None and slots == max_slots:
                    raise ValueError(f"max_slots={max_slots}: a group of the given policies has {self.group_rows} "
                                     "rows; allow at least that many")
                raise ValueError(f"kv_budget_gb={kv_budget_gb:.3g}: {slots} row(s) fit (a row needs "
                                 f"{per_slot / 1e9:.3f} GB at max_len={max_len}), but a group of the given policies "
                                 f"has {self.group_rows}; raise the budget or lower max_len")
            if slots < 1:
                raise ValueError(f"kv_budget_gb={kv_budget_gb:.3g}: one row needs {per_slot / 1e9:.3f} GB at "
                                 f"max_len={max_len}, and a prefill pass stages up to "
                                 f"{self.staging_bytes(1) / 1e9:.3f} GB" +
                                 (f", besides {segments} pool segments" if segments else "")
                                 + "; raise the budget or lower max_len")
        self.slots = slots
        self.n_segments = segments or (slots if self._seg_per_slot else
                                       max(1, slots // self.group_rows) * self.group_segs)
        if admit_rows is not None and admit_rows < 1:
            raise ValueError(f"admit_rows={admit_rows}: must be >= 1 (or None: max(rows per group, slots // 16))")
        self.admit_rows = min(slots, admit_rows or max(self.group_rows, slots // 16))
        # over the engine's life: decode steps, rows and slots over them, prefill passes
        # and prompt tokens computed / reused from a segment (prefix reuse)
        self.stats = {"steps": 0, "row_steps": 0, "slot_steps": 0, "prefills": 0, "prompt_tokens": 0,
                      "reused_tokens": 0}
        self.skipped = 0
        self._ctx = None
        self._hooks = [layer.register_forward_pre_hook(self._make_hook(i), with_kwargs=True)
                       for i, layer in enumerate(model.model.layers)]
        if self.device.type == "meta":  # a model without weights: the engine sizes its cache and holds none
            self._closed = True
            return
        self._alloc()

    @staticmethod
    def _pool_depth(policies, n_layers: int, private_len: int, max_len: int) -> int:
        """Layers with a pool. Without a hint: every layer. With one: the layers its groups share (below
        their shared depth: one copy per group, the rows' prompt KV above kept privately), or every layer
        (one segment per prefill stream: rows that read the prompt alike, such as NIAH's original and
        scope-`generated` rows, store it once), whichever costs less per group at max_len."""
        if not policies:
            return n_layers
        depth = min(p.prompt_depth(n_layers) for p in policies)
        rows, streams = len(policies), Engine._streams(policies)
        per_row = depth * private_len + (n_layers - depth) * max_len
        by_stream = streams * n_layers * max_len + rows * n_layers * private_len
        return n_layers if by_stream < depth * max_len + rows * per_row else depth

    def _token_bytes(self) -> int:
        """K/V bytes of one token at one layer."""
        elt = torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 4
        return 2 * self.d.n_kv_heads * self.d.head_dim * elt

    def bytes_per_segment(self) -> int:
        """K/V bytes of one pool segment (the prompt layers a group shares, at max_len)."""
        return self._token_bytes() * self.pool_layers * self.max_len

    def staging_bytes(self, slots: int) -> int:
        """Most K/V bytes one prefill pass stages besides the cache (part of `kv_budget_gb`): a pass
        of several groups holds at most `prefill_tokens` rows x tokens (every layer, bounded by the
        slots); a single group over that holds its rows' prompt at the layers it does not share."""
        many = min(self.prefill_tokens, slots * self.max_len) * self.d.n_layers
        one = self.group_streams * self.max_len * (self.d.n_layers - self.pool_layers)
        return self._token_bytes() * max(many, one)

    def bytes_per_slot(self, with_pool: bool = True) -> int:
        """K/V bytes per row: its private cache at every layer plus (`with_pool`) its share of the
        pool segments, as sized by default."""
        share = 1 if self._seg_per_slot else self.group_segs / self.group_rows  # segments per slot
        pool = self.bytes_per_segment() * share if with_pool else 0
        return int(self._token_bytes() * sum(c + 1 for c in self.private_cap) + pool)  # + 1: the spare column

    @property
    def slot_utilization(self) -> float | None:
        """Share of decoded slot-steps that produced a token (idle slots still run in the batch), over
        every generate() of this engine (`stats` holds the counts)."""
        st = self.stats
        return st["row_steps"] / st["slot_steps"] if st["slot_steps"] else None

    # ---- storage -------------------------------------------------------------------------
    def _alloc(self):
        d, s, g, dev = self.d, self.slots, self.n_segments, self.device
        kv = lambda n, length: torch.zeros(n, d.n_kv_heads, length, d.head_dim, dtype=self.dtype, device=dev)  # noqa: E731
        self.k = [kv(s, self.private_cap[l] + 1) for l in range(d.n_layers)]  # + 1: idle slots write there
        self.v = [kv(s, self.private_cap[l] + 1) for l in range(d.n_layers)]
        self._idle = torch.ones(s, dtype=torch.bool, device=dev)  # slots without a row
        pool = [self.max_len if l < self.pool_layers else 0 for l in range(d.n_layers)]  # no pool: 0 keys
        self.pk = [kv(g, pool[l]) for l in range(d.n_layers)]
        self.pv = [kv(g, pool[l]) for l in range(d.n_layers)]
        self.pool_len = torch.zeros(g, dtype=torch.int32, device=dev)
        self.kv_len = torch.zeros(d.n_layers, s, dtype=torch.int32, device=dev)  # private keys per layer, row
        self.row_seg = torch.full((d.n_layers, s), -1, dtype=torch.int32, device=dev)
        # rows grouped by segment per layer, kept in step with row_seg (fixed buffers: a CUDA graph reads them)
        self.seg_layout = SegmentLayout(*(torch.zeros(d.n_layers, n, dtype=torch.int32, device=dev) for n in (s, g, g)))
        self._refresh_layout()
        self._slot_ids = torch.arange(s, device=dev)
        # for prefix reuse: the prompt whose KV each segment holds (below its depth) and each slot holds
        # (its private prompt KV, from its group's depth on, under its prompt bitmap)
        self._segs = _Held(g, self.reuse_prefix)
        self._slots_held = _Held(s, self.reuse_prefix)

    def _make_hook(self, layer: int):
        def hook(module, args, kwargs):
            ctx = self._ctx
            if ctx is None:
                return None
            if args:
                args = (ctx.expand(layer, args[0]),) + tuple(args[1:])
            elif "hidden_states" in kwargs:
                kwargs["hidden_states"] = ctx.expand(layer, kwargs["hidden_states"])
            pe = kwargs.get("position_embeddings")
            if isinstance(pe, tuple):
                kwargs["position_embeddings"] = tuple(ctx.expand(layer, t) for t in pe)
            return args, kwargs

        return hook

    def close(self):
        """Remove the engine's hooks from the model (the model stays attached to retmask attention),
        drop its captured decode steps and free its KV cache, so a later engine in the same process
        gets the memory even while this object is still referenced. A closed engine cannot generate."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._steps.clear()
        self.k, self.v, self.pk, self.pv = [], [], [], []
        self._closed = True

    @property
    def graph_errors(self) -> list[str]:
        """Why each failed CUDA graph capture failed (empty when every capture worked)."""
        return [s.error for s in self._steps.values() if s.error]

    def _static_step(self, want_argmax: bool) -> _StaticStep:
        key = (want_argmax, self._group_max)
        if key not in self._steps:
            self._steps[key] = _StaticStep(self, want_argmax, self._group_max, capture=self.decode == "graph")
        return self._steps[key]

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- generation ------------------------------------------------------------------------
    def generate(self, groups: Sequence[Group], cfg: GenConfig, progress=None) -> Iterator[GroupResult]:
        """Yield each group's result as soon as all its rows finish (not in input order).

        `progress(n_tokens)` is called after each step with the tokens it produced."""
        if self._closed:
            if self.device.type == "meta":
                raise RuntimeError("Engine.generate: the model is on the meta device (no weights): such an engine "
                                   "only sizes its cache (slots, bytes_per_slot, ...); load the model to generate")
            raise RuntimeError("Engine.generate: this engine is closed (its KV cache is freed); make a new one")
        if self._busy:
            raise RuntimeError("Engine.generate: an earlier generate() on this engine is still running (its "
                               "iterator is not exhausted); finish it or call its .close() first")
        groups = list(groups)
        self._check(groups, cfg)
        self._busy = True
        try:
            yield from self._run(groups, cfg, progress)
        finally:  # also when the caller stops early: no stale row may stay in the cache or a segment
            self._busy = False
            self.kv_len.zero_()
            self._idle.fill_(True)
            self.row_seg.fill_(-1)
            self._refresh_layout()

    def _run(self, groups: list[Group], cfg: GenConfig, progress) -> Iterator[GroupResult]:
        # rows of one group in the decode kernel's shared-segment tile: fixed per call so the static step
        # (and its CUDA graph) serves every step; a power of two, as the kernel rounds it
        self._group_max = next_pow2(max((len(g.policies) for g in groups), default=1))
        queue = deque(groups)
        self._row0, n = {}, 0  # each group's first row among the call's rows: the default seeds
        for g in groups:
            self._row0.setdefault(id(g), n)
            n += len(g.policies)
        d, S = self.d, self.slots
        st = _Slots(S, d.n_layers, d.n_heads, self.n_segments, cfg.max_new_tokens, self.device)
        results: dict[int, list] = {}
        queued_rows = sum(len(g.policies) for g in queue if not self._too_long(g, cfg))  # rows still to admit
        while queue or st.active_count:
            admitted = []
            # Admit when enough rows can be taken to make the prefill pass worth its fixed cost (or the
            # queue's rows all fit, or nothing decodes). A group needs its rows' slots and one pool
            # segment (taken when it is prefilled), so free segments bound the rows as well as slots.
            room = (min(len(st.free_slots), len(st.free_segs) // self._layout(queue[0], cfg)[2]
                        * len(queue[0].policies)) if queue else 0)
            ready = not st.active_count or room >= min(self.admit_rows, queued_rows)
            while ready and queue:
                g = queue[0]
                if self._too_long(g, cfg):
                    queue.popleft()
                    self.skipped += 1
                    continue
                if len(g.policies) > len(st.free_slots):
                    break
                segs = self._take_segments(g, st, cfg)  # a run of free segments, or None: wait for one
                if segs is None:
                    break
                queue.popleft()
                queued_rows -= len(g.policies)
                admitted.append((g, st.take(len(g.policies)), segs))
            if admitted:
                with on_device(self.device):
                    self._prefill(admitted, st, cfg)
                for g, rows, _ in admitted:
                    results[id(g)] = [None] * len(rows)
            if not st.active_count:
                continue
            produced = st.active_count  # every active row gets one token this step
            with on_device(self.device):  # the graph replays and kernels launch on the model's GPU
                done = self._step(st, cfg)
            self.stats["steps"] += 1
            self.stats["row_steps"] += produced
            self.stats["slot_steps"] += self.slots
            if progress is not None:
                progress(produced)
            for slot, res in done:
                gid, row = st.group[slot], st.row[slot]
                results[gid][row] = res
                g = st.groups[gid]
                st.release(slot)
                if all(r is not None for r in results[gid]):
                    self._free_group(st, gid)
                    yield GroupResult(g.key, len(g.prompt), results.pop(gid), st.reused.pop(gid))

    def _check(self, groups, cfg):
        if self.pool_layers and cfg.max_new_tokens > self.private_len:
            raise ValueError(f"max_new_tokens={cfg.max_new_tokens} does not fit private_len={self.private_len} (a "
                             f"row's new tokens at the {self.pool_layers} layers with a pool); raise private_len")
        for i, g in enumerate(groups):
            if len(g.prompt) < 1:
                raise ValueError(f"group {i} (key {g.key!r}): empty prompt")
            if not g.policies:
                raise ValueError(f"group {i} (key {g.key!r}): no policies (rows)")
            if len(g.policies) > self.slots:
                raise ValueError(f"group {i}: {len(g.policies)} rows but the engine has {self.slots} slots")
            if self.on_too_long == "error" and self._too_long(g, cfg):
                raise ValueError(f"group {i} (key {g.key!r}): prompt of {len(g.prompt)} tokens + max_new_tokens="
                                 f"{cfg.max_new_tokens} does not fit max_len={self.max_len}; raise max_len, or use "
                                 "on_too_long='skip'")
            if not self._too_long(g, cfg) and self._layout(g, cfg)[2] > self.n_segments:
                raise ValueError(f"group {i}: its {self._streams(g.policies)} prompt bitmaps need "
                                 f"{self._layout(g, cfg)[2]} pool segments (its prompt does not fit private_len="
                                 f"{self.private_len}) but the engine has {self.n_segments}; give policies= "
                                 "matching the groups, or more segments")
            if g.seeds is not None and len(g.seeds) != len(g.policies):
                raise ValueError(f"group {i}: {len(g.seeds)} seeds for {len(g.policies)} rows")
            for p in g.policies:
                if p.heads is not None:
                    p.heads.validate(self.d.n_layers, self.d.n_heads)
        if cfg.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: Engine(model, tokenizer, ...)")

    def _shared_depth(self, policies) -> int:
        """Layers whose prompt KV is stored once for the whole group: the sharing rule, within the pool."""
        return min(min(p.prompt_depth(self.d.n_layers) for p in policies), self.pool_layers)

    def _too_long(self, g, cfg) -> bool:
        # segments and private caches hold max_len; a row's new tokens fit private_len (checked per call)
        return len(g.prompt) - 1 + cfg.max_new_tokens > self.max_len

    def _layout(self, g: Group, cfg: GenConfig) -> tuple[int, int, int]:
        """Where a group's prompt KV lives, as (lsh, hi, segments): below its shared depth lsh in its first
        segment; in [lsh, hi) in one segment per prefill stream; from hi on privately in its rows' slots. A
        group that shares fewer layers than the pool holds keeps [lsh, pool_layers) privately when its
        rows' private caches there hold its prompt and new tokens (hi = lsh; no more segments), else in
        segments (hi = pool_layers)."""
        lsh, P = self._shared_depth(g.policies), self.pool_layers
        if lsh == P or len(g.prompt) - 1 + cfg.max_new_tokens <= self.private_len:
            return lsh, lsh, 1
        return lsh, P, self._streams(g.policies)

    def _take_segments(self, g: Group, st: "_Slots", cfg: GenConfig) -> list[int] | None:
        """Reserve the pool segments of a group: a run of consecutive free ones (its prefill writes its
        streams' KV there in place), preferring a run whose first segment holds the longest prefix of its
        prompt for its first stream, so the pass fills it without copying. None: no run is free yet."""
        lsh, hi, k = self._layout(g, cfg)
        starts = st.run_starts(k)
        if not starts:
            return None
        s0 = starts[0]
        if self.reuse_prefix and hi:
            first = g.policies[0].prompt_heads
            _, h = self._segs.lookup(_prefix_ids(g), self._seg_tags(0, hi, first if lsh < hi else ()), starts)
            s0 = h if h in starts else s0
        return st.take_run(s0, k)

    def _prefill(self, admitted, st: "_Slots", cfg: GenConfig):
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
        want = _below(heads, hi)
        return [t for t in self._segs.index if t[0] <= lo and t[1] >= hi and _below(t[2], hi) == want]

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
            classes.setdefault(tuple(sorted(_stream_keys(g.policies))), []).append(i)
        later = set()
        for members in classes.values():
            arrs = [_prefix_ids(batch[i][0]) for i in members]
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
                        if i != root and gain >= m and gain > self._lookup(ids, segs, _stream_keys(g.policies), lsh,
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
        (`_streams`) x padded length, shortest prompts first (a batch pads to its longest)."""
        parts, cur, rows, longest = [], [], 0, 0
        for item in sorted(batch, key=lambda gs: len(gs[0].prompt)):
            g = item[0]
            k = self._streams(g.policies)
            r, n = rows + k, max(longest, len(g.prompt) - 1)
            if cur and r * n > self.prefill_tokens:
                parts.append(cur)
                cur, r, n = [], k, len(g.prompt) - 1
            cur.append(item)
            rows, longest = r, n
        return parts + [cur] if cur else parts

    @torch.no_grad()
    def _prefill_batch(self, batch, lsh: int, hi: int, st: "_Slots", cfg: GenConfig):
        d, dev = self.d, self.device
        L = d.n_layers
        full = [_prefix_ids(g) for g, _, _ in batch]  # the last prompt token is the first decode input
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
            c, src, segs, slots_ = self._lookup(a, batch[gi][2], _stream_keys(batch[gi][0].policies), lsh, hi)
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
            ctx = _Prefill(self, len(batch), len(streams), lsh, plen, keep.to(dev),
                           torch.tensor(stream2group, device=dev), hi, segs=batch[0][2] if len(batch) == 1 else None)
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
            pads = torch.tensor([slen - n for n in todo], device=dev)
            pre_t = torch.tensor(pre, device=dev)
            ids = torch.zeros(len(batch), slen, dtype=torch.long, device=dev)
            for gi, (a, c) in enumerate(zip(full, pre)):
                if len(a) > c:
                    ids[gi, slen - (len(a) - c):] = torch.as_tensor(a[c:], dtype=torch.long, device=dev)
            pos = (pre_t[:, None] + torch.arange(slen, device=dev)[None, :] - pads[:, None]).clamp(min=0)
            self._ctx = ctx
            chunk = max(1, min(self.chunk, self.prefill_tokens // len(streams)))  # streams x chunk within the budget
            try:
                with hf.active(ctx):
                    for start in range(0, slen, chunk):
                        size = min(chunk, slen - start)
                        ctx.set_chunk(start, size, pads, pre_t)
                        self.model.model(input_ids=ids[:, start : start + size],
                                         position_ids=pos[:, start : start + size], use_cache=False)
            finally:
                self._ctx = None
            base_t = torch.tensor([segs[0] for _, _, segs in batch], device=dev)
            seg_t = torch.tensor(stream_seg, device=dev)
            slot_t = torch.tensor(slots, device=dev)
            # each stream's KV to the slots of its rows (broadcast: no rows x prompt temporary)
            by_stream = [] if len(streams) == len(slots) else [
                (s, slot_t[torch.tensor([r == s for r in row_stream], device=dev)]) for s in range(len(streams))]
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
                self.kv_len[:, slot] = torch.tensor([0 if l < hi else n for l in range(L)], dtype=torch.int32)
                self._idle[slot] = False
                self.row_seg[:, slot] = torch.tensor([(segs[0] if l < lsh else stream_seg[si]) if l < hi and n > 0
                                                      else -1 for l in range(L)], dtype=torch.int32)
            r0 += len(rows)
        self._refresh_layout()

    @staticmethod
    def _streams(policies) -> int:
        """Distinct prompt bitmaps among `policies`: the rows a group's prefill computes above its shared depth."""
        return len(_stream_keys(policies))

    def _keep_row(self, p: Policy, prompt: bool) -> torch.Tensor:
        """(L, Hq) keep bitmap of a policy at a prompt position or a generated one."""
        d = self.d
        keep = torch.ones(d.n_layers, d.n_heads, dtype=torch.bool)
        if p.heads is not None and (not prompt or p.scope == "all"):
            for layer, h in p.heads:
                keep[layer, h] = False
        return keep

    def _refresh_layout(self):
        """After row_seg changed (rows joined or left): the per-layer segment layout, in its fixed
        buffers, and which layers have a row on a segment (eager steps skip the pool elsewhere)."""
        for buf, val in zip(self.seg_layout, segment_layout(self.row_seg, self.n_segments)):
            buf.copy_(val)
        self.layer_shared = (self.row_seg >= 0).any(1).tolist()

    def _free_group(self, st: "_Slots", gid: int):
        st.free_segs = sorted(st.free_segs + st.group_seg.pop(gid))
        st.groups.pop(gid)

    @torch.no_grad()
    def _step(self, st: "_Slots", cfg: GenConfig):
        dev = self.device
        if st.changed:  # rows that joined, left or take their first step: only their bitmap rows change
            idx = sorted(st.changed)
            rows = [st.keep_prompt[i] if st.in_prompt[i] else st.keep_gen[i] for i in idx if st.active[i]]
            new = torch.zeros(len(idx), *st.keep.shape[1:], dtype=torch.bool)  # idle slots: every head off
            if rows:
                new[torch.from_numpy(st.active[idx])] = torch.stack(rows)
            st.keep[torch.tensor(idx, device=dev)] = new.to(dev)
            st.keep_all_on = None
            st.changed = set(np.flatnonzero(st.in_prompt).tolist())  # their generated-token bitmap comes next
        ids = torch.from_numpy(st.next_in)[:, None]
        pos = torch.from_numpy(st.pos)[:, None]
        if self.decode == "eager":
            if st.keep_all_on is None:
                st.keep_all_on = st.keep.all(-1).all(0).tolist()  # layers whose launches skip the bitmap
            ctx = _Decode(self, st.keep, st.keep_all_on, cfg.return_argmax, self._group_max)
            with hf.active(ctx):
                logits = self.model(input_ids=ids.to(dev), position_ids=pos.to(dev),
                                    use_cache=False).logits[:, -1]  # (S, V)
        else:
            step = self._static_step(cfg.return_argmax)
            logits = step.run(ids, pos, st.keep)
            ctx = step.ctx
        self.kv_len += torch.from_numpy(st.active).to(dev, torch.int32)[None, :]
        tok = next_tokens(logits, cfg.sampling, torch.from_numpy(st.seed), torch.from_numpy(st.n_gen)).cpu().numpy()
        # one transfer per step; a copy even on CPU, where the static step reuses its output buffers
        am = ctx.argmax.to("cpu", copy=True) if cfg.return_argmax else None
        lg = logits.to("cpu", torch.float32, copy=True) if cfg.keep_logits else None
        rows = np.flatnonzero(st.active)
        t = tok[rows]
        st.tokens[rows, st.n_gen[rows]] = t
        st.n_gen[rows] += 1
        st.next_in[rows] = t
        st.pos[rows] += 1
        st.in_prompt[rows] = False
        for slot in rows.tolist() if (cfg.return_argmax or cfg.keep_logits) else ():
            if cfg.return_argmax:
                st.argmax[slot].append(am[slot])
            if cfg.keep_logits:
                st.logits[slot].append(lg[slot])
        eos = np.isin(t, cfg.eos_ids)
        length = st.n_gen[rows] >= cfg.max_new_tokens
        done = []
        # the rows that may end: EOS or length (vectorized), or any row when a stop string can match
        for i in (range(len(rows)) if cfg.stop_strings else np.flatnonzero(eos | length).tolist()):
            slot, n = int(rows[i]), int(st.n_gen[rows[i]])
            finish = None
            if eos[i]:
                finish = "eos"
            elif cfg.stop_strings and self._hit_stop(st.tokens[slot, max(0, n - 16):n].tolist(), cfg.stop_strings):
                finish = "stop"
            elif length[i]:
                finish = "length"
            if finish:
                res = RowResult(st.policy[slot].label, st.tokens[slot, :n].tolist(), finish,
                                torch.stack(st.argmax[slot]) if cfg.return_argmax else None,
                                torch.stack(st.logits[slot]) if cfg.keep_logits else None)
                done.append((slot, res))
        for slot, _ in done:
            self.kv_len[:, slot] = 0
            self._idle[slot] = True
            self.row_seg[:, slot] = -1
        if done:
            self._refresh_layout()
        return done

    def _hit_stop(self, tail_tokens: list[int], stops: tuple[str, ...]) -> bool:
        """Whether the text of a row's last tokens (16 are given) contains a stop string."""
        tail = self.tokenizer.decode(tail_tokens, skip_special_tokens=False)
        return any(s in tail for s in stops)


class _Held:
    """Prompts whose KV numbered holders (pool segments, or slots) keep, each under a tag (what it holds:
    a segment's depth, a slot's prompt bitmap and depth), in lexicographic order of their tokens per tag:
    the longest common prefix of a new prompt with any of them is with a neighbour of its place."""

    def __init__(self, n: int, at_least: int):
        self.at_least = at_least
        self.ids: list[np.ndarray | None] = [None] * n
        self.key: list[bytes | None] = [None] * n
        self.tag: list[Any] = [None] * n
        self.index: dict[Any, list[tuple[bytes, int]]] = {}

    def hold(self, i: int, ids: np.ndarray | None, tag: Any = None) -> None:
        """Holder `i` now keeps the KV of `ids` (None: nothing reusable)."""
        if not self.at_least:
            return
        if self.key[i] is not None:
            self.index[self.tag[i]].remove((self.key[i], i))
        ok = ids is not None and len(ids) >= self.at_least
        self.ids[i], self.key[i], self.tag[i] = (ids, _key(ids), tag) if ok else (None, None, None)
        if ok:
            bisect.insort(self.index.setdefault(tag, []), (self.key[i], i))

    def lookup(self, a: np.ndarray, tags, prefer=()) -> tuple[int, int]:
        """Longest prefix of `a` held under one of `tags`, as (tokens, holder); (0, -1) under `at_least`.
        A tie goes to a holder in `prefer` among the 16 nearest on each side."""
        if not self.at_least or len(a) < self.at_least:
            return 0, -1
        k, best, who = _key(a), 0, -1
        for t in tags:
            idx = self.index.get(t, ())
            i = bisect.bisect_left(idx, (k, -1))
            for rng in (range(i - 1, max(i - 17, -1), -1), range(i, min(i + 16, len(idx)))):
                top = None
                for j in rng:
                    h = idx[j][1]
                    n = common_prefix(a, self.ids[h])
                    if n < best or (top is not None and n < top):
                        break
                    top = n if top is None else top
                    if n > best or (h in prefer and who not in prefer):
                        best, who = n, h
                    elif who in prefer:
                        break
        return (best, who) if best >= self.at_least else (0, -1)


def _stream_keys(policies) -> list[tuple]:
    """The prompt bitmaps of a group's prefill streams (heads off over the prompt; () for intact), in the
    order of their first rows."""
    return list(dict.fromkeys(p.prompt_heads for p in policies))


def _below(heads: tuple, layer: int) -> tuple:
    """The (layer, head) pairs of `heads` below `layer`: what decides the KV of layers up to `layer`."""
    return tuple(x for x in heads if x[0] < layer)


def _key(ids) -> bytes:
    """Big-endian bytes of token ids: they compare as the id sequences do (a prefix first), in C."""
    return np.asarray(ids, dtype=">u4").tobytes()


def _prefix_ids(g: Group) -> np.ndarray:
    """The prompt tokens a group prefills (all but the last), as an int64 copy (a segment keeps it: the
    caller may refill its own buffer)."""
    return np.array(g.prompt[:-1], dtype=np.int64)


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token arrays (compared in growing blocks, so prompts
    that differ early cost little)."""
    a, b = np.asarray(a), np.asarray(b)
    k = min(len(a), len(b))
    start, step = 0, 256
    while start < k:
        end = min(k, start + step)
        diff = np.flatnonzero(a[start:end] != b[start:end])
        if diff.size:
            return start + int(diff[0])
        start, step = end, step * 4
    return k


def prefix_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Indices of `prompts` in lexicographic order of their tokens: a prompt's longest common prefix
    with any other is then shared with a neighbour, so an engine fed in this order (one slot, or a few)
    finds each prefix still held in a segment, and computes only what the prompts' prefix tree holds."""
    keys = [_key(p) for p in prompts]
    return sorted(range(len(keys)), key=keys.__getitem__)


class _Slots:
    """Host-side state of the decode slots: per-slot numpy arrays, so a step's bookkeeping is a few
    vector operations whatever the slot count (a Python loop runs only over the rows that end)."""

    def __init__(self, n: int, n_layers: int, n_heads: int, n_segments: int, max_new: int, device):
        self.n = n
        self.active = np.zeros(n, dtype=bool)
        self.group = [None] * n
        self.row = [0] * n
        self.policy = [None] * n
        self.seed = np.zeros(n, dtype=np.int64)
        self.next_in = np.zeros(n, dtype=np.int64)
        self.pos = np.zeros(n, dtype=np.int64)
        self.n_gen = np.zeros(n, dtype=np.int64)
        self.in_prompt = np.zeros(n, dtype=bool)
        self.tokens = np.zeros((n, max(1, max_new)), dtype=np.int32)  # row's tokens: tokens[slot, :n_gen[slot]]
        self.argmax = [[] for _ in range(n)]
        self.logits = [[] for _ in range(n)]
        self.keep_prompt = torch.ones(n, n_layers, n_heads, dtype=torch.bool)  # at the last prompt token
        self.keep_gen = torch.ones(n, n_layers, n_heads, dtype=torch.bool)  # at generated tokens
        self.keep = torch.zeros(n, n_layers, n_heads, dtype=torch.bool, device=device)  # the step's bitmap
        self.keep_all_on: list[bool] | None = None  # per layer: every head of every slot on (eager steps)
        self.changed: set[int] = set()  # slots whose row of `keep` must be rewritten before the next step
        self.free_segs = list(range(n_segments))
        self.groups, self.group_seg, self.reused = {}, {}, {}
        self.free_slots = list(range(n))

    @property
    def active_count(self) -> int:
        return int(self.active.sum())

    def take(self, k: int) -> list[int]:
        out, self.free_slots = self.free_slots[:k], self.free_slots[k:]
        return out

    def run_starts(self, k: int) -> list[int]:
        """Free segments that begin a run of `k` consecutive free ones."""
        free = set(self.free_segs)
        return [s for s in self.free_segs if all(s + i in free for i in range(1, k))]

    def take_run(self, s0: int, k: int) -> list[int]:
        run = list(range(s0, s0 + k))
        self.free_segs = [s for s in self.free_segs if not s0 <= s < s0 + k]
        return run

    def start(self, slot, gid, row, policy, seed, first_in, pos):
        self.active[slot], self.group[slot], self.row[slot], self.policy[slot] = True, gid, row, policy
        self.seed[slot], self.next_in[slot], self.pos[slot], self.n_gen[slot] = seed, int(first_in), pos, 0
        self.in_prompt[slot] = True
        self.argmax[slot], self.logits[slot] = [], []
        self.changed.add(slot)

    def release(self, slot):
        self.active[slot] = False
        self.group[slot] = None
        self.free_slots.append(slot)
        self.free_slots.sort()
        self.changed.add(slot)
