"""The engine's decode step: the attention context of one step over all slots, its static form
(fixed buffers, captured as a CUDA graph), the host-side state of the slots, and the step in two
halves: its launch (inputs, forward, sampling, copies to the host; no host sync) and its collection
(tokens to the rows, stop rules, finished rows), which the engine may run a step later (`overlap`).

`DecodeMixin` is part of `Engine` (it reads the engine's cache and settings).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from retmask.kernels import masked_decode

from . import hf
from .policy import GenConfig, RowResult
from .sampling import next_tokens

if TYPE_CHECKING:
    from .engine import Engine


class DecodeContext:
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
        # the new token's K/V at each row's private end: block `wblk`, offset `woff` (an idle row's and a
        # row's step past its last land in the trash block)
        e.k[l][self.wblk, :, self.woff] = k[:, :, 0]  # (S, Hkv, D)
        e.v[l][self.wblk, :, self.woff] = v[:, :, 0]
        keep = self.keep[:, l] if self.static or not self.layer_all_on[l] else None
        shared = {}
        if self.static or e.layer_shared[l]:
            shared = dict(shared_k=e.k[l], shared_v=e.v[l], shared_lens=e.pool_len, shared_table=e.stab,
                          row_seg=e.row_seg[l], max_group_rows=self.max_group_rows, seg_layout=e.seg_layout.select(l))
        res = masked_decode(q[:, :, 0], e.k[l], e.v[l], e.kv_len + 1, keep, block_table=e.ptab, window=window,
                            scale=scaling, return_argmax=self.argmax is not None, check_values=False, **shared)
        if self.argmax is not None:
            res, pos, _ = res
            self.argmax[:, l] = pos
        return res[:, None]  # (S, 1, Hq, D)

    def locate(self) -> None:
        """Where this step writes each row's new K/V: the block holding private position kv_len, and the
        offset in it (device ops: a static step runs this inside its graph)."""
        e = self.eng
        at = e.kv_len.long()  # (S,)
        self.wblk = e.ptab.gather(1, (at // e.block_size)[:, None])[:, 0].long()  # (S,)
        self.woff = at % e.block_size

    def expand(self, layer, t):
        return t


class StaticStep:
    """The decode step over fixed device buffers (input ids, positions, keep bitmap in; logits and
    argmax out): the same launches every step and no host sync, so on CUDA it is captured once as a
    CUDA graph and replayed. A capture that fails warns and leaves the step running eagerly."""

    def __init__(self, eng: "Engine", want_argmax: bool, max_group_rows: int, capture: bool):
        d, s, dev = eng.d, eng.slots, eng.device
        self.eng = eng
        self.ids = torch.zeros(s, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(s, 1, dtype=torch.long, device=dev)
        self.keep = torch.zeros(s, d.n_layers, d.n_heads, dtype=torch.bool, device=dev)
        self.ctx = DecodeContext(eng, self.keep, None, want_argmax, max_group_rows, static=True)
        self.logits: torch.Tensor | None = None
        self.graph = None
        self.error: str | None = None
        if capture:
            self._capture()

    def _forward(self) -> torch.Tensor:
        self.ctx.locate()
        with hf.active(self.ctx):
            self.logits = self.eng.model(input_ids=self.ids, position_ids=self.pos, attention_mask=self.eng._mask,
                                         use_cache=False).logits[:, -1]
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


class Slots:
    """Host-side state of the decode slots: per-slot numpy arrays, so a step's bookkeeping is a few
    vector operations whatever the slot count (a Python loop runs only over the rows that end).

    What a launch needs is known before the previous step's tokens reach the host: positions, step
    counts and bitmaps follow from the steps launched (`n_run`); only the tokens themselves are
    read on the device (`Launched.tok`). `n_gen` counts the tokens collected."""

    def __init__(self, n: int, n_layers: int, n_heads: int, n_segments: int, max_new: int, device):
        self.n, self.max_new = n, max_new
        self.active = np.zeros(n, dtype=bool)
        self.group = [None] * n
        self.row = [0] * n
        self.policy = [None] * n
        self.seed = np.zeros(n, dtype=np.int64)
        self.next_in = np.zeros(n, dtype=np.int64)  # a row's first input (its last prompt token)
        self.pos = np.zeros(n, dtype=np.int64)  # position of the next launch's input
        self.n_run = np.zeros(n, dtype=np.int64)  # steps launched for the row
        self.n_gen = np.zeros(n, dtype=np.int64)  # tokens collected for the row
        self.serial = np.zeros(n, dtype=np.int64)  # which row a slot holds (a launch's tokens are its rows')
        self._serials = 0
        self.in_prompt = np.zeros(n, dtype=bool)  # not launched yet: its first step reads the prompt bitmap
        self.tokens = np.zeros((n, max(1, max_new)), dtype=np.int32)  # row's tokens: tokens[slot, :n_gen[slot]]
        self.argmax = [[] for _ in range(n)]
        self.logits = [[] for _ in range(n)]
        self.keep_prompt = torch.ones(n, n_layers, n_heads, dtype=torch.bool)  # at the last prompt token
        self.keep_gen = torch.ones(n, n_layers, n_heads, dtype=torch.bool)  # at generated tokens
        self.keep = torch.zeros(n, n_layers, n_heads, dtype=torch.bool, device=device)  # the step's bitmap
        self.keep_host = torch.zeros(n, n_layers, n_heads, dtype=torch.bool)  # its copy on the host
        self.keep_all_on: list[bool] | None = None  # per layer: every head of every slot on (eager steps)
        self.changed: set[int] = set()  # slots whose row of `keep` must be rewritten before the next step
        self.free_segs = list(range(n_segments))  # shared block tables (a group's prompt KV per stream)
        # per running group: the Group, its segments, its slots, the prompt tokens reused from the cache
        self.groups, self.group_seg, self.group_slots, self.reused = {}, {}, {}, {}
        self.pblocks: list[list[int]] = [[] for _ in range(n)]  # each slot's private KV blocks
        self.free_slots = list(range(n))
        self.launches = 0
        self._pin = torch.device(device).type == "cuda"
        self._staged = self._pin or self.STAGE_ON_CPU
        self._stage: dict[str, torch.Tensor] = {}

    STAGE_ON_CPU = False  # tests: the staging buffers on a CPU engine too (unpinned)

    def stage(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor | None:
        """This launch's host buffer `name` (pinned on CUDA) of `shape` and `dtype`; None on a CPU. Two per
        name, used by alternate launches: a launch's copies are read (by its collection) before the launch
        after next reuses its buffer, since at most one launch is ever left uncollected."""
        if not self._staged:
            return None
        buf = self._stage.get(name)
        if buf is None or buf.shape[1:] != shape or buf.dtype != dtype:
            buf = self._stage[name] = torch.empty(2, *shape, dtype=dtype, pin_memory=self._pin)
        return buf[self.launches % 2]

    @property
    def active_count(self) -> int:
        return int(self.active.sum())

    def take(self, k: int) -> list[int]:
        out, self.free_slots = self.free_slots[:k], self.free_slots[k:]
        return out

    def take_segs(self, k: int) -> list[int] | None:
        """`k` free segment ids, or None when fewer are free."""
        if len(self.free_segs) < k:
            return None
        out, self.free_segs = self.free_segs[:k], self.free_segs[k:]
        return out

    def start(self, slot, gid, row, policy, seed, first_in, pos):
        self.active[slot], self.group[slot], self.row[slot], self.policy[slot] = True, gid, row, policy
        self.seed[slot], self.next_in[slot], self.pos[slot], self.n_gen[slot] = seed, int(first_in), pos, 0
        self.n_run[slot] = 0
        self._serials += 1
        self.serial[slot] = self._serials
        self.in_prompt[slot] = True
        self.argmax[slot], self.logits[slot] = [], []
        self.changed.add(slot)

    def release(self, slot):
        self.active[slot] = False
        self.group[slot] = None
        self.argmax[slot], self.logits[slot] = [], []
        self.free_slots.append(slot)
        self.free_slots.sort()
        self.changed.add(slot)


@dataclass
class Flight:
    """Where the latest generate() call stands, from the host's own bookkeeping (no device sync), as of
    the step just collected: rows decoding now, the most tokens any row of the call has had so far, and
    the rows that ended at max_new_tokens so far (a row that never says EOS runs to the cap)."""

    rows: int = 0
    longest: int = 0
    at_cap: int = 0

    def note(self, st: "Slots", done: list) -> None:
        """After a collection: `done`, its (slot, RowResult) of the rows that ended (not yet released)."""
        self.rows = st.active_count - len(done)
        self.longest = max(self.longest, int(st.n_gen.max(initial=0)))
        self.at_cap += sum(r.finish == "length" for _, r in done)


@dataclass
class Launched:
    """A decode step launched and not yet collected: its tokens on the device (the next launch's
    inputs) and on their way to the host, with the argmax and logits when asked; which rows it ran
    (`live`, and the rows' `serial` numbers then); the CUDA event after its copies."""

    tok: torch.Tensor
    tok_host: torch.Tensor
    argmax: torch.Tensor | None
    logits: torch.Tensor | None
    live: np.ndarray
    serial: np.ndarray
    event: "torch.cuda.Event | None" = None


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor `t` on `device`. To a GPU `t` must be pinned: the copy is queued without waiting for
    the GPU, and the host must not write `t` before it is done. Elsewhere an ordinary copy (none to the
    CPU). Every host input of the engine's steps and prefill passes reaches the device here."""
    return t.to(device, non_blocking=device.type == "cuda")


def to_device(a, device: torch.device) -> torch.Tensor:
    """A copy of host data (a numpy array or a CPU tensor) on `device`. To a GPU it goes through pinned
    memory, without waiting for the GPU: the caching host allocator keeps the pinned block until the
    copy is done, so the host may change `a` at once."""
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
    return upload(t.pin_memory() if device.type == "cuda" else t.clone(), device)


class DecodeMixin:
    """Decode steps over the slots (mixed into `Engine`)."""

    @property
    def graph_errors(self) -> list[str]:
        """Why each failed CUDA graph capture failed (empty when every capture worked)."""
        return [s.error for s in self._steps.values() if s.error]

    def _static_step(self, want_argmax: bool) -> StaticStep:
        key = (want_argmax, self._group_max)
        if key not in self._steps:
            self._steps[key] = StaticStep(self, want_argmax, self._group_max, capture=self.decode == "graph")
        return self._steps[key]

    @torch.no_grad()
    def _launch(self, st: "Slots", cfg: GenConfig, prev: "Launched | None") -> Launched:
        """Queue one decode step over every slot, and its outputs' copies to the host, with no host sync:
        the inputs are the rows' host-known positions and bitmaps and, for a row past its first step, the
        token the previous launch (`prev`) left on the device. Host state advances as launched."""
        dev = self.device

        def up(name: str, t: torch.Tensor, per_slot: bool = False) -> torch.Tensor:
            """`t` to the device through a pinned staging buffer (its first rows; `per_slot`: one row per slot
            at most, so the buffer has a row per slot)."""
            buf = st.stage(name, (st.n, *t.shape[1:]) if per_slot else tuple(t.shape), t.dtype)
            return upload(t if buf is None else buf[: len(t)].copy_(t), dev)

        if st.changed:  # rows that joined, left or take their first step: only their bitmap rows change
            idx = sorted(st.changed)
            rows = [st.keep_prompt[i] if st.in_prompt[i] else st.keep_gen[i] for i in idx if st.active[i]]
            new = torch.zeros(len(idx), *st.keep.shape[1:], dtype=torch.bool)  # idle slots: every head off
            if rows:
                new[torch.from_numpy(st.active[idx])] = torch.stack(rows)
            st.keep_host[idx] = new
            st.keep.index_copy_(0, up("keep_idx", torch.tensor(idx), per_slot=True),
                                up("keep_rows", new, per_slot=True))
            st.keep_all_on = None
            st.changed = set(np.flatnonzero(st.in_prompt & st.active).tolist())  # their generated-token bitmap next
        live = st.active.copy()
        fresh = st.in_prompt & live  # first step: the input is the last prompt token, from the host
        # the step's host inputs in one copy: first inputs, positions, seeds, step counts, fresh, live
        ids, pos, seed, n_run, fresh_d, live_d = up("inputs", torch.from_numpy(
            np.stack([st.next_in, st.pos, st.seed, st.n_run, fresh, live]).astype(np.int64)))
        if prev is not None and not fresh[live].all():  # the others' inputs: the tokens of the step before
            ids = torch.where(fresh_d.bool(), ids, prev.tok)
        ids, pos = ids[:, None], pos[:, None]
        if self.decode == "eager":
            if st.keep_all_on is None:
                st.keep_all_on = st.keep_host.all(-1).all(0).tolist()  # layers whose launches skip the bitmap
            ctx = DecodeContext(self, st.keep, st.keep_all_on, cfg.return_argmax, self._group_max)
            ctx.locate()
            with hf.active(ctx):
                logits = self.model(input_ids=ids, position_ids=pos, attention_mask=self._mask,
                                    use_cache=False).logits[:, -1]  # (S, V)
        else:
            step = self._static_step(cfg.return_argmax)
            logits = step.run(ids, pos, st.keep)
            ctx = step.ctx
        self.kv_len += live_d.to(torch.int32)
        tok = next_tokens(logits, cfg.sampling, seed, n_run)

        def down(name: str, t: torch.Tensor) -> torch.Tensor:
            """`t` to the host: a copy (the static step reuses its output buffers, and the next launch may
            come first); from a GPU, an asynchronous one into a pinned staging buffer."""
            buf = st.stage(name, tuple(t.shape), t.dtype)
            return t.to("cpu", copy=True) if buf is None else buf.copy_(t, non_blocking=True)

        out = Launched(tok, down("tokens", tok), down("argmax", ctx.argmax) if cfg.return_argmax else None,
                       down("logits", logits.float()) if cfg.keep_logits else None, live, st.serial.copy())
        if dev.type == "cuda":
            out.event = torch.cuda.Event()
            out.event.record()
        st.launches += 1
        st.pos[live] += 1
        st.n_run[live] += 1
        st.in_prompt[live] = False
        return out

    @torch.no_grad()
    def _collect(self, step: Launched, st: "Slots", cfg: GenConfig) -> tuple[list, int]:
        """The tokens of a launched step, for its rows that are still running (a row that ended at the
        step before rode along this one): stop rules, finished rows and their slots freed. Returns the
        (slot, RowResult) of the rows that ended and the count of tokens collected."""
        if step.event is not None:
            step.event.synchronize()
        tok = step.tok_host.numpy()
        rows = np.flatnonzero(step.live & st.active & (st.serial == step.serial))
        t = tok[rows]
        st.tokens[rows, st.n_gen[rows]] = t
        st.n_gen[rows] += 1
        # each row's argmax and logits, its own copy out of the step's buffers (the launch after next reuses
        # them; a view would keep the whole step's rows alive as long as this row runs)
        for slot in rows.tolist() if (cfg.return_argmax or cfg.keep_logits) else ():
            if cfg.return_argmax:
                st.argmax[slot].append(step.argmax[slot].clone())
            if cfg.keep_logits:
                st.logits[slot].append(step.logits[slot].clone())
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
            self._vacate(st, slot)
        if done:
            self._refresh_layout()
        return done, len(rows)

    def _hit_stop(self, tail_tokens: list[int], stops: tuple[str, ...]) -> bool:
        """Whether the text of a row's last tokens (16 are given) contains a stop string."""
        tail = self.tokenizer.decode(tail_tokens, skip_special_tokens=False)
        return any(s in tail for s in stops)
