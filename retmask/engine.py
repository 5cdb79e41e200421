"""The engine: several policies of one Hugging Face causal LM in one batched pass over one copy of
the weights, with the KV cache shared wherever the sharing rule proves it identical.

A *group* is one prompt and its rows, one row per *policy* (heads off + mask scope). Every layer's K/V
lives in one pool of fixed-size blocks (`cache_plan` sizes it, `blocks.BlockManager` hands out ids).
The prompt, minus its last token, is prefilled in chunks: layers below the group's *shared depth*
`Lsh` run once per group, and from layer `Lsh` on the hidden states are expanded to one per *prefill
stream*, a distinct prompt bitmap (rows that read the prompt alike, such as the original and
scope-`generated` rows, compute it once). `Lsh` is the lowest layer holding a head that is off over
the prompt in any row of the group (all layers when every row leaves the prompt intact). The prompt's
KV is one set of blocks per stream (and one for the layers below `Lsh`, unless a stream reads the
prompt intact), referenced by every row that reads it; each row's generated tokens go in blocks of its
own, taken a block at a time as it grows. Decoding starts from the last prompt token, so every
generated token has its step (and its per-head argmax when asked).

*Prefix caching*: full prompt blocks stay cached after their group ends, found by a hash of the tokens
up to their end, the layers they hold and the heads off below them; a group whose prompt starts with
cached blocks takes them instead of computing them. NIAH tests of one haystack share everything
before their needle; `prefix_order` puts such prompts next to each other.

*Scheduling*: groups are admitted while free blocks hold their prompts, and each step takes the
blocks its rows write. When the pool runs dry mid-decode, the most recently admitted group is
preempted: its blocks are freed, it goes back to the front of the queue and is recomputed when it
returns (its greedy tokens are the same; sampled rows replay their seeds' draws).

The engine's parts: `policy` (what it is asked), `cache_plan` (memory), `blocks` (block ids and the
prefix cache), `prefill` (the prompt passes), `decoding` (the decode step and the rows' state),
`prefix` (prompt order), `scheduler` (admission and preemption rules). This module re-exports the public names, so
`from retmask.engine import Engine, Group, Policy` is the one import.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import replace
from typing import Iterator, Sequence

import numpy as np
import torch

from retmask.kernels import SegmentLayout, segment_layout
from retmask.kernels._launch import next_pow2, on_device

from . import hf
from .blocks import BlockManager
from .cache_plan import blocks_for, group_blocks, plan_cache
from .decoding import DecodeMixin, Flight, Launched, Slots, StaticStep, to_device
from .engine_config import DECODE_MODES, EngineConfig
from .policy import ORIGINAL, SCOPES, GenConfig, Group, GroupResult, Policy, RowResult, check_request
from .prefill import PrefillRunner, layout
from .prefix import common_prefix, prefix_order
from .scheduler import admission_room, group_need, rows_needing_blocks

__all__ = ["DECODE_MODES", "ORIGINAL", "SCOPES", "Engine", "EngineConfig", "Flight", "GenConfig", "Group",
           "GroupResult", "Policy",
           "RowResult", "common_prefix", "default_size", "prefix_order", "stats_line"]

def default_size(model, rows: int, cpu_slots: int, fraction: float = 0.7) -> dict:
    """Engine sizing when the user gave neither `slots` nor `kv_budget_gb`. On CUDA: a KV budget of
    `fraction` of the memory free after loading the model (including what PyTorch's allocator holds
    unused), with at most `rows` rows decoded together (a short job no more than it has). Elsewhere:
    `cpu_slots` rows (at most `rows`)."""
    p = next(model.parameters())
    if p.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(p.device)
        # memory PyTorch freed but its caching allocator still holds (e.g. an earlier engine's cache,
        # closed in this process) is free for this one too: the device query alone does not count it
        cached = torch.cuda.memory_reserved(p.device) - torch.cuda.memory_allocated(p.device)
        return {"kv_budget_gb": fraction * (free + cached) / 1e9, "max_slots": max(1, rows)}
    return {"slots": max(1, min(cpu_slots, rows))}


def stats_line(stats: dict) -> str:
    """The KV part of an engine's `stats` in one line, for the jobs to print."""
    total, peak = stats.get("kv_blocks_total", 0), stats.get("kv_blocks_peak", 0)
    return (f"KV blocks: peak {peak:,} of {total:,} ({peak / total:.0%}), up to {stats.get('peak_rows', 0):,} rows "
            f"decoding at once, {stats.get('preemptions', 0):,} preemptions, "
            f"{stats.get('prefix_blocks_reused', 0):,} prompt blocks taken from the prefix cache") if total else ""


class Engine(DecodeMixin):
    """Batched multi-policy generation over one Hugging Face causal LM (Llama, Qwen3, OLMo-3).

    Args:
        model: a loaded causal LM; it is switched to retmask attention (`hf.attach`). A model on the
            meta device (built from its config alone) gets no cache: such an engine only answers
            sizing questions (`plan`).
        tokenizer: needed only for stop strings.
        slots: rows decoded together. Alone, it also sizes the pool: every row can hold `max_len`
            tokens of its own, so nothing ever waits for memory. Or give `kv_budget_gb`: the pool is
            the blocks that fit the budget after one prefill pass's staging (`cache_plan.plan_cache`),
            with `max_slots` rows at most (default: what the blocks could hold, at most 512).
            `default_size` picks one of them for a job.
        max_len: longest row (prompt + new tokens).
        block_size: tokens per KV block (16-256, a power of two; default 32, see `cache_plan`).
        chunk: prefill chunk length (tokens). Default: 4096 on CUDA; elsewhere the whole prompt (up to
            `prefill_tokens`), since on a CPU torch's causal SDPA kernel over a whole prompt beats a
            masked call per chunk (1.7x at 16K on the toy; `benchmarks/bench_cpu.py`).
        prefill_tokens: most tokens one prefill pass holds (streams x padded prompt length), which bounds
            its staging KV and activations: the groups admitted together are prefilled in batches
            under it (similar lengths together, so little padding), and the chunk is cut so that
            streams x chunk stays under it. A group over it on its own is prefilled alone.
        sharing: store identical prompt KV once per group (off: every row has its own, for checks).
        on_too_long: "error" (default) or "skip" for a prompt that cannot fit `max_len`.
        admit_rows: rows that must be admissible (free slots and blocks) before waiting groups are
            admitted while other rows decode (default `max(rows per group, slots // 16)`; also when
            the whole queue fits, or nothing decodes). Each admission runs prefill passes between two
            decode steps, each with a fixed cost (its launches, about a decode step's time on a GPU);
            waiting for a few free slots leaves them idle a few steps instead of paying it every step.
        reuse_prefix: shortest prompt prefix (tokens) worth taking from the prefix cache (in whole blocks;
            0 turns prefix caching off, and so does sharing=False). Groups with the same prefill
            streams, admitted together, that share a longer prefix with each other than with what is
            cached are prefilled in two passes, so the later ones reuse the earlier ones' blocks. The
            cached KV is what the same tokens at the same positions compute, so only float rounding can
            differ.
        decode: how each decode step runs. "eager": the attention context is rebuilt from the host
            state every step. "static": every step runs the same launches over fixed buffers (what
            a CUDA graph captures). "graph": the static step captured once as a CUDA graph per
            (argmax on/off, largest group) and replayed (CUDA only). "auto" (default): "graph" on
            CUDA, "eager" elsewhere. All give the same tokens.
        overlap: collect each step's tokens after launching the next one, so that the host's work on
            them (stop rules, finished rows, admitting waiting groups) runs while the GPU computes. A
            launch needs no token on the host: positions and bitmaps follow from the steps launched, and
            each row's input is the token the step before left on the device. A row that ends rides
            along one more step (its output dropped); every row's tokens are the same. None (default):
            on for CUDA, off elsewhere (on a CPU the host is the device, so there is nothing to hide).
    """

    # tests: a value every pool block starts with (NaN proves that unwritten KV is never read)
    FILL = 0.0

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, **settings):
        hf.check_supported(model)  # attached (hf.attach) only once every argument is checked
        if config is not None and not isinstance(config, EngineConfig):
            raise ValueError(f"config: expected an EngineConfig, got {type(config).__name__}")
        unknown = sorted(set(settings) - set(EngineConfig.names()))
        if unknown:
            raise TypeError(f"Engine: unknown setting(s) {', '.join(unknown)}; the settings are EngineConfig's "
                            f"fields: {', '.join(EngineConfig.names())}")
        cfg = replace(config or EngineConfig(), **settings)  # checked here, once
        if cfg.max_len is None:
            cfg = replace(cfg, max_len=4096)
        if not cfg.sized:
            raise ValueError("give slots (rows decoded together) or kv_budget_gb (KV memory to use)")
        if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"tokenizer: expected a transformers tokenizer (with .decode) or None, got "
                             f"{type(tokenizer).__name__}")
        self.model, self.tokenizer = model, tokenizer
        self.d = hf.dims(model)
        self.vocab = model.get_input_embeddings().num_embeddings  # token ids a prompt may hold
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if cfg.decode == "graph" and self.device.type != "cuda":
            raise ValueError(f"decode='graph' needs a CUDA model (this one is on {self.device}); use 'auto'")
        if cfg.overlap and self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"overlap=True: runs on CUDA (or CPU, for checks), not on {self.device.type}; use None")
        # what "auto" and None mean on this device
        cfg = replace(cfg, chunk=cfg.chunk or (4096 if self.device.type == "cuda" else cfg.max_len),
                      decode=("graph" if self.device.type == "cuda" else "eager") if cfg.decode == "auto"
                      else cfg.decode,
                      overlap=self.device.type == "cuda" if cfg.overlap is None else cfg.overlap)
        self.config = cfg
        self.block_size, self.max_len, self.chunk, self.sharing = cfg.block_size, cfg.max_len, cfg.chunk, cfg.sharing
        self.on_too_long, self.prefill_tokens, self.decode, self.overlap = (cfg.on_too_long, cfg.prefill_tokens,
                                                                            cfg.decode, cfg.overlap)
        self.reuse_prefix = max(min(cfg.reuse_prefix, cfg.max_len), 1) if cfg.sharing and cfg.reuse_prefix else 0
        self.plan = plan_cache(self.d.n_layers, self.d.n_kv_heads, self.d.head_dim, self.dtype, max_len=cfg.max_len,
                               block_size=cfg.block_size, slots=cfg.slots, kv_budget_gb=cfg.kv_budget_gb,
                               max_slots=cfg.max_slots, prefill_tokens=cfg.prefill_tokens)
        self.slots = self.plan.slots
        self.n_segments = 2 * self.slots  # shared block tables: a group's streams and base, at most 2 per row
        self.admit_rows = min(self.slots, cfg.admit_rows or max(1, self.slots // 16))
        self._steps: dict[tuple[bool, int], StaticStep] = {}
        self._group_max = 1
        self._busy = False
        self._closed = False
        # over the engine's life: decode steps, rows and slots over them, prefill passes, prompt tokens
        # computed / taken from the prefix cache, most rows decoding at once, preemptions
        self.stats = {"steps": 0, "row_steps": 0, "slot_steps": 0, "prefills": 0, "prompt_tokens": 0,
                      "reused_tokens": 0, "peak_rows": 0, "preemptions": 0, "kv_blocks_total": self.plan.usable_blocks,
                      "kv_blocks_peak": 0, "prefix_blocks_reused": 0}
        self.skipped = 0
        self.flight = Flight()  # the latest generate() call's rows decoding, longest row, rows at the cap
        self._ctx = None
        self._run_state = None
        # the CUDA stream of the cache's allocation, then of the latest generate() call
        self._stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self.prefiller = PrefillRunner(self)
        hf.attach(model)
        self._hooks = [layer.register_forward_pre_hook(self._make_hook(i), with_kwargs=True)
                       for i, layer in enumerate(model.model.layers)]
        if self.device.type == "meta":  # a model without weights: the engine sizes its cache and holds none
            self._closed = True
            return
        self._alloc()

    @property
    def slot_utilization(self) -> float | None:
        """Share of decoded slot-steps that produced a token (idle slots still run in the batch), over
        every generate() of this engine (`stats` holds the counts)."""
        st = self.stats
        return st["row_steps"] / st["slot_steps"] if st["slot_steps"] else None

    # ---- storage -------------------------------------------------------------------------
    def _alloc(self):
        d, s, g, dev, bs = self.d, self.slots, self.n_segments, self.device, self.block_size
        nb = self.plan.n_blocks
        shape = (nb, d.n_kv_heads, bs, d.head_dim)  # (blocks, Hkv, Bs, D): block b of every layer's pool
        self.k = [torch.full(shape, self.FILL, dtype=self.dtype, device=dev) for _ in range(d.n_layers)]
        self.v = [torch.full(shape, self.FILL, dtype=self.dtype, device=dev) for _ in range(d.n_layers)]
        self.trash = nb - 1  # idle rows, and a row's step past its last, write here; nothing reads it
        self.blocks = BlockManager(nb - 1)
        # private block tables (a row's generated tokens; + 1: the step past the last) and shared ones (a
        # segment: one stream's, or the base's, prompt KV), with their host copies
        self.ptab = torch.full((s, blocks_for(self.max_len + 1, bs)), self.trash, dtype=torch.int32, device=dev)
        self._ptab_host = np.full(tuple(self.ptab.shape), self.trash, dtype=np.int32)
        self.stab = torch.full((g, blocks_for(self.max_len, bs)), self.trash, dtype=torch.int32, device=dev)
        self._stab_host = np.full(tuple(self.stab.shape), self.trash, dtype=np.int32)
        self.pool_len = torch.zeros(g, dtype=torch.int32, device=dev)
        self._seg_len = np.zeros(g, dtype=np.int64)  # its host copy
        self._idle = torch.ones(s, dtype=torch.bool, device=dev)  # slots without a row
        self.kv_len = torch.zeros(s, dtype=torch.int32, device=dev)  # private keys per row
        self.row_seg = torch.full((d.n_layers, s), -1, dtype=torch.int32, device=dev)
        # rows grouped by segment per layer, kept in step with row_seg (fixed buffers: a CUDA graph reads them)
        self.seg_layout = SegmentLayout(*(torch.zeros(d.n_layers, n, dtype=torch.int32, device=dev) for n in (s, g, g)))
        self._row_seg_host = np.full((d.n_layers, s), -1, dtype=np.int32)  # row_seg is written from this copy
        self._refresh_layout()
        self._mask = hf.engine_mask(dev)  # every forward's attention_mask: transformers prepares none

    def _set_segment(self, s: int, table: list[int], n: int) -> None:
        """Segment `s` now reads `n` prompt tokens from blocks `table` (no host sync)."""
        row = np.full(self._stab_host.shape[1], self.trash, dtype=np.int32)
        row[: len(table)] = table
        self._stab_host[s] = row
        self.stab[s] = to_device(row, self.device)
        self.pool_len[s] = n
        self._seg_len[s] = n

    def _set_private(self, slots: list[int]) -> None:
        """Upload the private tables of `slots` from their host copies."""
        if slots:
            idx = np.asarray(slots, dtype=np.int64)
            self.ptab.index_copy_(0, to_device(idx, self.device), to_device(self._ptab_host[idx], self.device))

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
        self.k, self.v = [], []
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
                                   "only sizes its cache (plan, slots); load the model to generate")
            raise RuntimeError("Engine.generate: this engine is closed (its KV cache is freed); make a new one")
        if self._busy:
            raise RuntimeError("Engine.generate: an earlier generate() on this engine is still running (its "
                               "iterator is not exhausted); finish it or call its .close() first")

    def _generate(self, groups: list[Group], cfg: GenConfig, progress) -> Iterator[GroupResult]:
        self.start(cfg, max_group_rows=max((len(g.policies) for g in groups), default=1))
        try:
            for g in groups:
                self.add(g)
            while self.busy:
                yield from self.step(progress)
        finally:  # also when the caller stops early: no stale row may stay in the cache or a segment
            self.finish()

    # ---- the incremental core: start, add, step, abort, finish ------------------------------------
    def start(self, cfg: GenConfig, max_group_rows: int = 1) -> None:
        """Begin a run under `cfg`: groups join it with `add`, `step` advances it, `finish` ends it.
        `max_group_rows`: the most rows a group of this run will have (it sizes the decode kernel's
        shared tile: fixed per run so the static step and its CUDA graph serve every step)."""
        self._usable()
        self._busy = True
        # every launch, collection and prefill of the run on the stream current at its start, whichever
        # stream is current when the caller resumes: a step may be in flight between calls; after what an
        # earlier run (or the allocation) queued on its own stream
        if self.device.type == "cuda":
            s = torch.cuda.current_stream(self.device)
            if self._stream is not None and self._stream != s:
                s.wait_stream(self._stream)
            self._stream = s
        self._group_max = next_pow2(max(1, max_group_rows))
        d = self.d
        self._run_state = _Run(Slots(self.slots, d.n_layers, d.n_heads, self.n_segments, cfg.max_new_tokens,
                                     self.device), cfg)
        self._row0, self._rows_added = {}, 0
        self.flight = self._run_state.flight

    def add(self, g: Group) -> None:
        """Queue group `g` in the current run (checked as `generate` checks its groups)."""
        run = self._run_state
        if run is None:
            raise RuntimeError("Engine.add: no run started (Engine.start(cfg) first, or use generate)")
        if len(g.policies) > self._group_max:
            raise ValueError(f"group {g.key!r}: {len(g.policies)} rows, over the run's max_group_rows="
                             f"{self._group_max}; start the run with a larger one")
        self._check([g], run.cfg)
        self._row0.setdefault(id(g), self._rows_added)
        self._rows_added += len(g.policies)
        run.queue.append(g)
        if not self._too_long(g, run.cfg):
            run.queued_rows += len(g.policies)

    @property
    def busy(self) -> bool:
        """Whether the current run has groups queued, rows decoding or a step to collect."""
        run = self._run_state
        return run is not None and bool(run.queue or run.st.active_count or run.pending is not None)

    def abort(self, key) -> bool:
        """Drop the group with key `key` from the current run, queued or running: its rows stop and its
        blocks are freed at once. Returns whether a group had that key."""
        run = self._run_state
        if run is None:
            return False
        for g in list(run.queue):
            if g.key == key:
                run.queue.remove(g)
                if not self._too_long(g, run.cfg):
                    run.queued_rows -= len(g.policies)
                return True
        for gid, g in list(run.st.groups.items()):
            if g.key == key:
                with self._on_stream():
                    self._drop_group(run, gid)
                return True
        return False

    def step(self, progress=None) -> list[GroupResult]:
        """One round of the run: admit waiting groups (prefill), reserve the blocks this step writes
        (preempting when the pool runs dry), launch a decode step, collect a step's tokens. Returns the
        groups that finished in it."""
        run = self._run_state
        st, cfg = run.st, run.cfg
        self._admit(run)
        launched = None
        # launch unless every running row has had its last step (it then only waits to be collected)
        if (st.active & (st.n_run < cfg.max_new_tokens)).any():
            with self._on_stream():  # the graph replays and kernels launch on the model's GPU
                self._reserve(run)
                launched = run.prev = self._launch(st, cfg, run.prev)
            self.stats["steps"] += 1
            self.stats["slot_steps"] += self.slots
            self.stats["peak_rows"] = max(self.stats["peak_rows"], st.active_count)
        step, run.pending = (run.pending, launched) if self.overlap else (launched, None)
        if step is None:
            return []
        with self._on_stream():
            done, produced = self._collect(step, st, cfg)
        self.stats["row_steps"] += produced
        run.flight.note(st, done)
        if progress is not None:
            progress(produced)
        out = []
        for slot, res in done:
            gid, row = st.group[slot], st.row[slot]
            run.results[gid][row] = res
            st.release(slot)
            if all(r is not None for r in run.results[gid]):
                g, reused = st.groups[gid], st.reused[gid]
                self._free_group(st, gid)
                run.admitted.remove(gid)
                out.append(GroupResult(g.key, len(g.prompt), run.results.pop(gid), reused))
        return out

    def finish(self) -> None:
        """End the current run: every row and block it holds is freed (cached prompt blocks stay cached)."""
        run, self._run_state = self._run_state, None
        self._busy = False
        if run is None:
            return
        with self._on_stream():
            for gid in list(run.st.groups):
                self._drop_group(run, gid)
            self.kv_len.zero_()
            self._idle.fill_(True)
            self._row_seg_host.fill(-1)
            self._refresh_layout()
        self.stats["kv_blocks_peak"] = max(self.stats["kv_blocks_peak"], self.blocks.peak_used)
        self.stats["prefix_blocks_reused"] = self.blocks.reused

    # ---- scheduling by blocks (the rules: `scheduler`) ------------------------------------------
    def _admit(self, run: "_Run") -> None:
        st, queue = run.st, run.queue
        free = admission_room(self.blocks.n_free, st.active_count,
                              len(rows_needing_blocks(st.active, st.n_run, st.max_new, self.block_size)))
        room = len(st.free_slots) if queue else 0
        ready = not st.active_count or room >= min(self.admit_rows, run.queued_rows)
        admitted = []
        while ready and queue:
            g = queue[0]
            if self._too_long(g, run.cfg):
                queue.popleft()
                self.skipped += 1
                continue
            lay = layout(g.policies, self.d.n_layers, self.sharing)
            need = group_need(len(g.prompt), lay.n_segs, len(g.policies), self.block_size)
            if len(g.policies) > len(st.free_slots) or lay.n_segs > len(st.free_segs):
                break
            if need > free and (st.active_count or admitted):  # wait for blocks (alone, it always fits)
                break
            queue.popleft()
            run.queued_rows -= len(g.policies)
            free -= need
            admitted.append((g, st.take(len(g.policies)), st.take_segs(lay.n_segs)))
        if admitted:
            with self._on_stream():
                self.prefiller.run(admitted, st, run.cfg)
            for g, rows, _ in admitted:
                run.results[id(g)] = [None] * len(rows)
                run.admitted.append(id(g))

    def _reserve(self, run: "_Run") -> None:
        """Take the blocks this step writes; when too few are free, preempt the most recently admitted
        groups (never the last one running)."""
        st, bs = run.st, self.block_size
        while True:
            rows = rows_needing_blocks(st.active, st.n_run, st.max_new, bs)  # a row's private keys: its steps
            if len(rows) <= self.blocks.n_free:
                break
            if len(run.admitted) <= 1:
                raise RuntimeError(f"KV pool exhausted by one group ({self.blocks.n_free} blocks free, "
                                   f"{len(rows)} needed): raise kv_budget_gb or lower max_new_tokens")
            self._preempt(run, run.admitted[-1])
        if len(rows):
            ids = self.blocks.allocate(len(rows))
            for slot, b in zip(rows.tolist(), ids):
                self._ptab_host[slot, st.n_run[slot] // bs] = b
                st.pblocks[slot].append(b)
            self._set_private(rows.tolist())
        self.stats["kv_blocks_peak"] = max(self.stats["kv_blocks_peak"], self.blocks.peak_used)

    def _preempt(self, run: "_Run", gid: int) -> None:
        """Free a running group's rows and blocks and put it back at the front of the queue: it is
        recomputed from its prompt when it returns."""
        g = run.st.groups[gid]
        self._drop_group(run, gid)
        run.queue.appendleft(g)
        run.queued_rows += len(g.policies)
        self.stats["preemptions"] += 1

    def _drop_group(self, run: "_Run", gid: int) -> None:
        """Stop a running group's rows and free its blocks and segments."""
        st = run.st
        for slot in st.group_slots.get(gid, []):
            if st.active[slot] and st.group[slot] == gid:
                self._vacate(st, slot)
                st.release(slot)
        self._free_group(st, gid)
        run.results.pop(gid, None)
        if gid in run.admitted:
            run.admitted.remove(gid)
        self._refresh_layout()

    def _vacate(self, st: "Slots", slot: int) -> None:
        """A row left `slot`: its private blocks are freed and the slot reads and writes nothing."""
        self.blocks.free(st.pblocks[slot])
        st.pblocks[slot] = []
        self._ptab_host[slot] = self.trash
        self._set_private([slot])
        self.kv_len[slot] = 0
        self._idle[slot] = True
        self._row_seg_host[:, slot] = -1

    def _free_group(self, st: "Slots", gid: int):
        for s in st.group_seg.pop(gid, []):
            n = blocks_for(int(self._seg_len[s]), self.block_size)
            self.blocks.free([int(b) for b in self._stab_host[s, :n]])
            self._stab_host[s] = self.trash
            self._seg_len[s] = 0
            self.pool_len[s] = 0
            st.free_segs.append(s)
        st.free_segs.sort()
        st.groups.pop(gid, None)
        st.group_slots.pop(gid, None)
        st.reused.pop(gid, None)

    # ---- checks and helpers ----------------------------------------------------------------
    def _check(self, groups, cfg):
        check_request(groups, cfg, self.vocab)
        usable = self.plan.usable_blocks
        for i, g in enumerate(groups):
            if len(g.prompt) < 1:
                raise ValueError(f"group {i} (key {g.key!r}): empty prompt")
            if not g.policies:
                raise ValueError(f"group {i} (key {g.key!r}): no policies (rows)")
            if len(g.policies) > self.slots:
                raise ValueError(f"group {i}: {len(g.policies)} rows but the engine decodes {self.slots} rows "
                                 "together (slots); raise slots")
            if self.on_too_long == "error" and self._too_long(g, cfg):
                raise ValueError(f"group {i} (key {g.key!r}): prompt of {len(g.prompt)} tokens + max_new_tokens="
                                 f"{cfg.max_new_tokens} does not fit max_len={self.max_len}; raise max_len, or use "
                                 "on_too_long='skip'")
            if g.seeds is not None and len(g.seeds) != len(g.policies):
                raise ValueError(f"group {i}: {len(g.seeds)} seeds for {len(g.policies)} rows")
            for p in g.policies:
                if p.heads is not None:
                    p.heads.validate(self.d.n_layers, self.d.n_heads)
            if not self._too_long(g, cfg):
                lay = layout(g.policies, self.d.n_layers, self.sharing)
                need = group_blocks(len(g.prompt), len(g.policies), len(lay.streams),
                                    lay.base < 0 and lay.lsh > 0, cfg.max_new_tokens, self.block_size)
                if need > usable:
                    raise ValueError(f"group {i} (key {g.key!r}): its prompt and {cfg.max_new_tokens} new tokens "
                                     f"per row need {need} KV blocks but the pool holds {usable}; raise "
                                     "kv_budget_gb (or slots), or lower max_new_tokens")
        if cfg.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: Engine(model, tokenizer, ...)")

    def _too_long(self, g, cfg) -> bool:
        return len(g.prompt) - 1 + cfg.max_new_tokens > self.max_len

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

    def _on_stream(self):
        """The model's GPU and the call's stream current (Triton launches, graph replays and copies use the
        current ones); a no-op on CPU."""
        if self._stream is None:
            return on_device(self.device)
        stack = ExitStack()
        stack.enter_context(on_device(self.device))
        stack.enter_context(torch.cuda.stream(self._stream))
        return stack


class _Run:
    """The state of one run: its settings, queue, rows, results and the step in flight."""

    def __init__(self, st: Slots, cfg: GenConfig):
        self.st, self.cfg = st, cfg
        self.queue: deque[Group] = deque()
        self.queued_rows = 0  # rows of queued groups that fit max_len
        self.results: dict[int, list] = {}
        self.admitted: list[int] = []  # running groups, oldest first (the newest is preempted first)
        self.flight = Flight()
        self.pending: Launched | None = None  # launched, not collected (overlap)
        self.prev: Launched | None = None  # the latest launch (its tokens are the next launch's inputs)
