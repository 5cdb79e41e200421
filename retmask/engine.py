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

The engine's parts: `policy` (what it is asked), `prefill` (the prompt passes and their order),
`decoding` (the decode step and the slots' state), `prefix` (which KV is held where). This module
re-exports the public names, so `from retmask.engine import Engine, Group, Policy` is the one import.
"""

from __future__ import annotations

import numbers
from collections import deque
from contextlib import ExitStack
from collections.abc import Iterable
from typing import Iterator, Sequence

import numpy as np
import torch

from retmask.kernels import SegmentLayout, segment_layout
from retmask.kernels._launch import next_pow2, on_device

from . import hf
from .decoding import DecodeMixin, Flight, Launched, Slots, StaticStep, to_device
from .policy import (ORIGINAL, SCOPES, GenConfig, Group, GroupResult, Policy, RowResult, check_request, is_int,
                     n_streams)
from .prefill import PrefillMixin
from .prefix import Held, common_prefix, prefix_ids, prefix_order

__all__ = ["DECODE_MODES", "ORIGINAL", "SCOPES", "Engine", "Flight", "GenConfig", "Group", "GroupResult", "Policy",
           "RowResult", "common_prefix", "default_size", "prefix_order"]

DECODE_MODES = ("auto", "eager", "static", "graph")


def _gb(n: float) -> str:
    """Bytes as GB, or MB when under 0.1 GB (so a toy size does not read 0.000 GB)."""
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


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


class Engine(PrefillMixin, DecodeMixin):
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
        chunk: prefill chunk length (tokens). Default: 4096 on CUDA; elsewhere the whole prompt (up to
            `prefill_tokens`), since on a CPU torch's causal SDPA kernel over a whole prompt beats a
            masked call per chunk (1.7x at 16K on the toy; `benchmarks/bench_cpu.py`).
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
        overlap: collect each step's tokens after launching the next one, so that the host's work on
            them (stop rules, finished rows, admitting waiting groups) runs while the GPU computes. A
            launch needs no token on the host: positions and bitmaps follow from the steps launched, and
            each row's input is the token the step before left on the device. A row that ends rides
            along one more step (its output dropped) and its slot is refilled a step later; every
            row's tokens are the same. None (default): on for CUDA, off elsewhere (on a CPU the host
            is the device, so there is nothing to hide).
    """

    def __init__(self, model, tokenizer=None, *, slots: int | None = None, kv_budget_gb: float | None = None,
                 max_len: int = 4096, chunk: int | None = None, sharing: bool = True, on_too_long: str = "error",
                 private_len: int | None = None, decode: str = "auto", policies: Sequence[Policy] | None = None,
                 max_slots: int | None = None, segments: int | None = None, prefill_tokens: int = 32768,
                 admit_rows: int | None = None, reuse_prefix: int = 128, overlap: bool | None = None):
        hf.check_supported(model)  # attached (hf.attach) only once every argument is checked
        for name, v in (("slots", slots), ("max_len", max_len), ("chunk", chunk), ("private_len", private_len),
                        ("max_slots", max_slots), ("segments", segments), ("prefill_tokens", prefill_tokens),
                        ("admit_rows", admit_rows), ("reuse_prefix", reuse_prefix)):
            if v is not None and not is_int(v):
                raise ValueError(f"{name}={v!r}: expected an int")
        if kv_budget_gb is not None and (isinstance(kv_budget_gb, bool) or not isinstance(kv_budget_gb, numbers.Real)
                                         or not 0 < kv_budget_gb < float("inf")):
            raise ValueError(f"kv_budget_gb={kv_budget_gb!r}: must be a finite number > 0")
        if max_slots is not None and max_slots < 1:
            raise ValueError(f"max_slots={max_slots}: must be >= 1 (or None: as many as the budget holds)")
        if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"tokenizer: expected a transformers tokenizer (with .decode) or None, got "
                             f"{type(tokenizer).__name__}")
        if policies is not None and (not isinstance(policies, (list, tuple))
                                     or not all(isinstance(p, Policy) for p in policies)):
            raise ValueError("policies: expected a list of Policy (the rows of a typical group), or None")
        self.model, self.tokenizer = model, tokenizer
        self.d = hf.dims(model)
        self.vocab = model.get_input_embeddings().num_embeddings  # token ids a prompt may hold
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if chunk is None:
            chunk = 4096 if self.device.type == "cuda" else max_len
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
        if overlap is not None and not isinstance(overlap, bool):
            raise ValueError(f"overlap={overlap!r}: expected True, False or None (on for CUDA)")
        if overlap and self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"overlap=True: runs on CUDA (or CPU, for checks), not on {self.device.type}; use None")
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._steps: dict[tuple[bool, int], StaticStep] = {}
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
        self.group_streams = n_streams(policies) if policies else 1  # rows a group's prefill computes
        # layers with a pool (prompt KV in segments; a row keeps only its new tokens there) and the private
        # capacity of each layer: the hint's shared depth, or every layer when storing each stream's prompt
        # KV once (one segment per stream) costs less than a full private prompt per row
        self.pool_layers = self._pool_depth(policies, L, self.private_len, max_len) if sharing else 0
        self.private_cap = [self.private_len if l < self.pool_layers else max_len for l in range(L)]
        # segments a group of the hint takes: one per prefill stream when it shares fewer layers than the pool
        self.group_segs = (n_streams(policies) if policies and self._shared_depth(policies) < self.pool_layers
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
                                 f"{_gb(per_slot)} at max_len={max_len}), but a group of the given policies "
                                 f"has {self.group_rows}; raise the budget or lower max_len")
            if slots < 1:
                raise ValueError(f"kv_budget_gb={kv_budget_gb:.3g}: one row needs {_gb(per_slot)} at "
                                 f"max_len={max_len}, and a prefill pass stages up to "
                                 f"{_gb(self.staging_bytes(1))}" +
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
        self.flight = Flight()  # the latest generate() call's rows decoding, longest row, rows at the cap
        self._ctx = None
        # the CUDA stream of the cache's allocation, then of the latest generate() call
        self._stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        hf.attach(model)
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
        rows, streams = len(policies), n_streams(policies)
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
        # + 1: idle slots write there, and so does a row's step past its last (overlap: it rides along one)
        self.k = [kv(s, self.private_cap[l] + 1) for l in range(d.n_layers)]
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
        self._row_seg_host = np.full((d.n_layers, s), -1, dtype=np.int32)  # row_seg is written from this copy
        self._refresh_layout()
        self._slot_ids = torch.arange(s, device=dev)
        self._mask = hf.engine_mask(dev)  # every forward's attention_mask: transformers prepares none
        # for prefix reuse: the prompt whose KV each segment holds (below its depth) and each slot holds
        # (its private prompt KV, from its group's depth on, under its prompt bitmap)
        self._segs = Held(g, self.reuse_prefix)
        self._slots_held = Held(s, self.reuse_prefix)

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
        if self._stream is not None and not self._closed:
            self._stream.synchronize()  # a step of an abandoned call may still write the cache about to be freed
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._steps.clear()
        self.k, self.v, self.pk, self.pv = [], [], [], []
        self._closed = True

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- generation ------------------------------------------------------------------------
    def generate(self, groups: Sequence[Group], cfg: GenConfig, progress=None) -> Iterator[GroupResult]:
        """Yield each group's result as soon as all its rows finish (not in input order).

        The groups and `cfg` are checked at the call (a ValueError names what is wrong); the work runs as
        the iterator is consumed. `progress(n_tokens)` is called after each step with the tokens it produced;
        `self.flight` then holds the call's rows decoding, its longest row so far and its rows ended at
        max_new_tokens (host bookkeeping: reading it costs no device sync)."""
        self._usable()
        if isinstance(groups, Group) or not isinstance(groups, Iterable):
            raise ValueError(f"groups: expected a list of Group, got {type(groups).__name__} (one group: [group])")
        groups = list(groups)
        self._check(groups, cfg)
        return self._generate(groups, cfg, progress)

    def _usable(self) -> None:
        if self._closed:
            if self.device.type == "meta":
                raise RuntimeError("Engine.generate: the model is on the meta device (no weights): such an engine "
                                   "only sizes its cache (slots, bytes_per_slot, ...); load the model to generate")
            raise RuntimeError("Engine.generate: this engine is closed (its KV cache is freed); make a new one")
        if self._busy:
            raise RuntimeError("Engine.generate: an earlier generate() on this engine is still running (its "
                               "iterator is not exhausted); finish it or call its .close() first")

    def _generate(self, groups: list[Group], cfg: GenConfig, progress) -> Iterator[GroupResult]:
        self._usable()  # again when the work starts: another generate() may have started since the call
        self._busy = True
        # every launch, collection and prefill of the call on the stream current at its start, whichever
        # stream is current when the caller resumes the iterator: a step may be in flight at each yield;
        # after what an earlier call (or the allocation) queued on its own stream
        if self.device.type == "cuda":
            s = torch.cuda.current_stream(self.device)
            if self._stream is not None and self._stream != s:
                s.wait_stream(self._stream)
            self._stream = s
        try:
            yield from self._run(groups, cfg, progress)
        finally:  # also when the caller stops early: no stale row may stay in the cache or a segment
            self._busy = False
            with self._on_stream():
                self.kv_len.zero_()
                self._idle.fill_(True)
                self._row_seg_host.fill(-1)
                self._refresh_layout()

    def _on_stream(self):
        """The model's GPU and the call's stream current (Triton launches, graph replays and copies use the
        current ones); a no-op on CPU."""
        if self._stream is None:
            return on_device(self.device)
        stack = ExitStack()
        stack.enter_context(on_device(self.device))
        stack.enter_context(torch.cuda.stream(self._stream))
        return stack

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
        st = Slots(S, d.n_layers, d.n_heads, self.n_segments, cfg.max_new_tokens, self.device)
        results: dict[int, list] = {}
        fl = self.flight = Flight()
        queued_rows = sum(len(g.policies) for g in queue if not self._too_long(g, cfg))  # rows still to admit
        # With `overlap`, step k's tokens are collected after step k+1 is launched, so the host's work on
        # them (and on the admissions they allow) runs while the GPU computes step k+1.
        pending: Launched | None = None  # launched, not collected
        prev: Launched | None = None  # the latest launch (its tokens are the next launch's inputs)
        while queue or st.active_count or pending is not None:
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
                with self._on_stream():
                    self._prefill(admitted, st, cfg)
                for g, rows, _ in admitted:
                    results[id(g)] = [None] * len(rows)
            launched = None
            # launch unless every running row has had its last step (it then only waits to be collected)
            if (st.active & (st.n_run < cfg.max_new_tokens)).any():
                with self._on_stream():  # the graph replays and kernels launch on the model's GPU
                    launched = prev = self._launch(st, cfg, prev)
                self.stats["steps"] += 1
                self.stats["slot_steps"] += self.slots
            step, pending = (pending, launched) if self.overlap else (launched, None)
            if step is None:
                continue
            with self._on_stream():
                done, produced = self._collect(step, st, cfg)
            self.stats["row_steps"] += produced
            fl.note(st, done)
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
        check_request(groups, cfg, self.vocab)
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
                raise ValueError(f"group {i}: its {n_streams(g.policies)} prompt bitmaps need "
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
        return lsh, P, n_streams(g.policies)

    def _take_segments(self, g: Group, st: "Slots", cfg: GenConfig) -> list[int] | None:
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
            _, h = self._segs.lookup(prefix_ids(g), self._seg_tags(0, hi, first if lsh < hi else ()), starts)
            s0 = h if h in starts else s0
        return st.take_run(s0, k)


    def _keep_row(self, p: Policy, prompt: bool) -> torch.Tensor:
        """(L, Hq) keep bitmap of a policy at a prompt position or a generated one."""
        d = self.d
        keep = torch.ones(d.n_layers, d.n_heads, dtype=torch.bool)
        if p.heads is not None and (not prompt or p.scope == "all"):
            for layer, h in p.heads:
                keep[layer, h] = False
        return keep

    def _refresh_layout(self):
        """After rows joined or left (their segments in `_row_seg_host`): row_seg and the per-layer
        segment layout, in their fixed buffers, and which layers have a row on a segment (eager steps
        skip the pool elsewhere). No host sync: this runs while a launched step may still be running."""
        self.row_seg.copy_(to_device(self._row_seg_host, self.device))
        for buf, val in zip(self.seg_layout, segment_layout(self.row_seg, self.n_segments)):
            buf.copy_(val)
        self.layer_shared = (self._row_seg_host >= 0).any(1).tolist()

    def _free_group(self, st: "Slots", gid: int):
        st.free_segs = sorted(st.free_segs + st.group_seg.pop(gid))
        st.groups.pop(gid)
