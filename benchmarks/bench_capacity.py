"""Rows in flight for a KV budget: the paged cache beside fixed per-row slots (CPU, no weights).

RetMask pairs (each prompt decoded by the original and by a copy with heads off from layer 2 on,
scope `all`: two prefill streams, shared depth 2) on a length trace shaped like the paper's LMSYS
chats: prompt tokens mean 64 (at most 512), answer tokens mean 495 (at most 2048), both drawn from a
seeded lognormal (sigma 1) whose mu is set so the capped means hit those targets; the two rows of a
pair get their own answer lengths. 12,000 pairs keep the queue busy for several of the longest
answers at the larger budget.

Fixed slots: each row reserves what its longest request could need (`max_len` = 512 + 2048 tokens),
so a budget holds the same number of rows whatever the lengths. Paged: the pool `plan_for_config`
sizes for the same budget, run step by step through a real `BlockManager` under the engine's own
rules (`retmask.scheduler`): a group is admitted when its prompt's blocks per segment and one block per
row are free beside a reserve of one block per running row; each step a row whose private position is a
multiple of the block size takes a block; when too few are free the most recently admitted group is
preempted (freed, requeued at the front, restarted from scratch); a row's blocks are freed when it ends,
its group's prompt blocks when both rows have. No cap on rows: the simulation measures what memory allows.

Reported per model, budget and block size: fixed-slot rows; paged rows in flight, the median over
the steady state (from 10 % of the steps, and past the cold start's longest rows, until the queue
empties) and the peak; their ratio; allocated bytes over the bytes of tokens held (median over the
steady state); preemptions; and the decode steps of preempted rows that are run again
(`recomputed_pct`, a share of the trace's answer tokens). Budgets: 45 and 86 GB (an H100 or H200
after an 8B model's bf16 weights, x0.7).

    python benchmarks/bench_capacity.py                                   # results/capacity.{csv,png}
    python benchmarks/bench_capacity.py --quick      # a smoke run (seconds), runs/bench/capacity_quick.csv
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import benchlib
from retmask.blocks import BlockManager
from retmask.cache_plan import blocks_for, plan_for_config, token_bytes
from retmask.engine import ORIGINAL, Policy
from retmask.heads import HeadSet
from retmask.prefill import layout
from retmask.scheduler import admission_room, group_need

MAX_PROMPT, MAX_NEW = 512, 2048
MAX_LEN = MAX_PROMPT + MAX_NEW
PROMPT_MEAN, ANSWER_MEAN, SIGMA = 64, 495, 1.0
BUDGETS_GB = (45, 86)
BLOCK_SIZES = (32, 16)  # the default, then a smaller block as an extra row
HEADS = "2-5,10-3,20-7"  # the ablated row's heads: the lowest at layer 2 sets the shared depth
# the published fixed-slot baseline: Llama-3.1-8B rows (and bytes per row) at each budget
FIXED_LLAMA = {45: 115, 86: 231}
FIXED_LLAMA_ROW_MB = 352.45
TARGET_RATIO, TARGET_ALLOC = 4.0, 1.15


def model_config(name: str):
    """The transformers config of `name` (no model built)."""
    if name == "Llama-3.1-8B":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    if name == "Qwen3-8B":
        from transformers import Qwen3Config

        return Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    raise ValueError(f"model {name!r}: use Llama-3.1-8B or Qwen3-8B")


MODELS = ("Llama-3.1-8B", "Qwen3-8B")


# ---- the length trace ---------------------------------------------------------------------------
def capped_lognormal(z: np.ndarray, mean: float, cap: int, sigma: float = SIGMA) -> np.ndarray:
    """Token counts exp(mu + sigma z), rounded, in [1, cap], with mu set (bisection) so their mean is `mean`."""
    draw = lambda mu: np.clip(np.rint(np.exp(mu + sigma * z)), 1, cap).astype(np.int64)  # noqa: E731
    lo, hi = math.log(mean) - 4 * sigma, math.log(mean) + 2 * sigma
    for _ in range(60):  # the capped mean grows with mu
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if draw(mid).mean() < mean else (lo, mid)
    return draw((lo + hi) / 2)


@dataclass(frozen=True)
class Trace:
    prompt: np.ndarray  # (G,) prompt tokens per pair
    answer: np.ndarray  # (G, 2) new tokens of the original and the ablated row

    @classmethod
    def lmsys_like(cls, n_pairs: int, seed: int = 0) -> "Trace":
        rng = np.random.default_rng(seed)
        prompt = capped_lognormal(rng.standard_normal(n_pairs), PROMPT_MEAN, MAX_PROMPT)
        answer = capped_lognormal(rng.standard_normal(2 * n_pairs), ANSWER_MEAN, MAX_NEW).reshape(n_pairs, 2)
        return cls(prompt, answer)


# ---- fixed slots ---------------------------------------------------------------------------------
def fixed_slots(config, budget_gb: float, lsh: int, dtype=torch.bfloat16) -> tuple[int, int]:
    """(rows, bytes per row) of fixed slots as the engine sized them before paging: per row, private KV of
    max_new_tokens + 1 below the shared depth and max_len + 1 above it, plus a pool segment of max_len at
    the pooled layers; besides, one prefill pass's staging."""
    n_layers = config.num_hidden_layers
    tb = token_bytes(config.num_key_value_heads, config.head_dim, dtype)
    per_row = tb * (lsh * (MAX_NEW + 1) + (n_layers - lsh) * (MAX_LEN + 1) + lsh * MAX_LEN)
    staging = lambda s: tb * n_layers * min(32768, s * MAX_LEN)  # noqa: E731
    budget, s = budget_gb * 1e9, 0
    while (s + 1) * per_row + staging(s + 1) <= budget:
        s += 1
    return s, per_row


# ---- the paged pool, step by step ----------------------------------------------------------------
@dataclass
class PagedRun:
    rows: np.ndarray  # (T,) rows decoded at each step
    used: np.ndarray  # (T,) blocks allocated after the step's writes
    held: np.ndarray  # (T,) bytes of tokens held then
    queue_end: int  # steps with groups still waiting (the steady state ends there)
    preemptions: int
    recomputed: int  # row-steps thrown away by preemptions

    @property
    def has_steady(self) -> bool:
        return self.queue_end > max(self.queue_end // 10, MAX_NEW + 1)

    def steady(self) -> slice:
        """Steps from 10 % of those with a queue, and past the longest row admitted at the cold start (every
        group fits at first, so the first cohort is admitted at once), until the queue empties; the whole run
        when the queue empties before that (a short trace)."""
        if not self.has_steady:
            return slice(0, len(self.rows))
        return slice(max(self.queue_end // 10, MAX_NEW + 1), self.queue_end)


def simulate(trace: Trace, n_blocks: int, block_size: int, tb: int, n_layers: int, seg_layers: tuple) -> PagedRun:
    """The engine's admission, block reservation and preemption over `trace`, one decode step at a time.

    `seg_layers[j]`: layers whose prompt KV segment j holds (its blocks span every layer)."""
    bs, n_segs, n_groups = block_size, len(seg_layers), len(trace.prompt)
    bm = BlockManager(n_blocks)
    ans = trace.answer.reshape(-1)  # (R,) row 2g + j: group g's row j
    n_run = np.zeros_like(ans)  # steps launched per row
    active = np.zeros(len(ans), dtype=bool)
    pblocks: list[list[int]] = [[] for _ in ans]
    segs: dict[int, list[list[int]]] = {}
    left = np.zeros(n_groups, dtype=np.int64)  # rows of a running group still decoding
    prompt_bytes = (trace.prompt - 1) * tb * sum(seg_layers)  # (G,)
    queue, admitted = deque(range(n_groups)), {}  # admitted: running groups, oldest first
    held_prompt = preempt = recomputed = queue_end = 0
    rows_t, used_t, held_t = [], [], []

    def drop(g: int) -> None:  # free a running group's rows and prompt blocks
        nonlocal held_prompt
        for r in (2 * g, 2 * g + 1):
            if active[r]:
                bm.free(pblocks[r])
                pblocks[r], active[r] = [], False
        for ids in segs.pop(g):
            bm.free(ids)
        held_prompt -= prompt_bytes[g]
        del admitted[g]

    while queue or admitted:
        t = len(rows_t)
        act = np.flatnonzero(active)
        # admit: the group's prompt blocks for each segment and a first block per row, beside this step's
        if queue:
            queue_end = t + 1
            free = admission_room(bm.n_free, len(act), int((n_run[act] % bs == 0).sum()))
            while queue:
                g = queue[0]
                need = group_need(int(trace.prompt[g]), n_segs, 2, bs)
                if need > free and (len(act) or admitted):
                    break
                queue.popleft()
                free -= need
                nb = blocks_for(int(trace.prompt[g]) - 1, bs)
                segs[g] = [bm.allocate(nb) for _ in range(n_segs)]
                held_prompt += prompt_bytes[g]
                admitted[g] = None
                active[2 * g:2 * g + 2], n_run[2 * g:2 * g + 2], left[g] = True, 0, 2
            act = np.flatnonzero(active)
        # reserve: rows at a block boundary take a block; preempt the newest groups while short
        while True:
            take = act[n_run[act] % bs == 0]
            if len(take) <= bm.n_free:
                break
            if len(admitted) <= 1:
                raise RuntimeError(f"one group exhausts {n_blocks} blocks")
            g = next(reversed(admitted))
            recomputed += int(n_run[2 * g:2 * g + 2].sum())
            drop(g)
            n_run[2 * g:2 * g + 2] = 0
            queue.appendleft(g)
            preempt += 1
            act = np.flatnonzero(active)
        for r, b in zip(take.tolist(), bm.allocate(len(take))):
            pblocks[r].append(b)
        # decode one step; rows at their last token end
        n_run[act] += 1
        rows_t.append(len(act))
        used_t.append(bm.n_used)
        held_t.append(held_prompt + int(n_run[act].sum()) * tb * n_layers)
        for r in act[n_run[act] == ans[act]].tolist():
            bm.free(pblocks[r])
            pblocks[r], active[r] = [], False
            g = r // 2
            left[g] -= 1
            if not left[g]:
                for ids in segs.pop(g):
                    bm.free(ids)
                held_prompt -= prompt_bytes[g]
                del admitted[g]
    bm.check()
    assert bm.n_used == 0, "blocks leaked"
    return PagedRun(np.asarray(rows_t), np.asarray(used_t), np.asarray(held_t, dtype=np.float64), queue_end,
                    preempt, recomputed)


# ---- the plot ------------------------------------------------------------------------------------
def plot(runs: dict, fixed: dict, model: str, path: Path) -> Path | None:
    """Rows in flight over the simulated steps, paged (each block size) against fixed slots, one panel per
    budget."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    budgets = sorted({b for (m, b, _) in runs if m == model})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.2), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for bs, color, width in ((32, "C0", 1.2), (16, "C2", 0.8)):
            run = runs.get((model, budget, bs))
            if run is None:
                continue
            ax.plot(np.arange(len(run.rows)), run.rows, color=color, lw=width,
                    label=f"paged, {bs}-token blocks (median {np.median(run.rows[run.steady()]):.0f})")
        run = runs[(model, budget, 32)]
        s = run.steady()
        ax.axvspan(s.start, s.stop, color="grey", alpha=0.08, label="steady state (the medians' steps)")
        ax.axhline(fixed[(model, budget)], color="C3", ls="--", lw=1.5,
                   label=f"fixed slots ({fixed[(model, budget)]} rows, each reserves {MAX_LEN} tokens)")
        top = 2.5 * float(np.median(run.rows[s]))  # the cold start (every group fits at first) goes off scale
        ax.set_ylim(0, top)
        peak = max(int(runs[k].rows.max()) for k in runs if k[:2] == (model, budget))
        if peak > top:
            ax.annotate(f"cold start: up to {peak} rows", xy=(0, top), xytext=(0.04, 0.93),
                        textcoords="axes fraction", fontsize=8, arrowprops=dict(arrowstyle="->", lw=0.8),
                        bbox=dict(fc="white", ec="none", alpha=0.85))
        ax.set_title(f"{budget} GB of KV", fontsize=10)
        ax.set_xlabel("decode step")
        ax.set_ylabel("rows in flight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{model} (bf16): rows in flight, paged KV against fixed slots; RetMask pairs with LMSYS-shaped "
                 f"lengths (prompt ~{PROMPT_MEAN}, answer ~{ANSWER_MEAN} tokens)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=12000, help="RetMask pairs in the trace")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run: a short trace")
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS / "capacity.csv",
                    help="results CSV (rows appended); the plot goes beside it, as .png")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs = 1000
        if args.out == benchlib.RESULTS / "capacity.csv":  # a smoke run never lands in the committed results
            args.out = Path("runs/bench/capacity_quick.csv")
    t0 = time.perf_counter()
    trace = Trace.lmsys_like(args.pairs, args.seed)
    pm, am = trace.prompt.mean(), trace.answer.mean()
    print(f"trace: {args.pairs} pairs; prompt tokens mean {pm:.1f} (target {PROMPT_MEAN}, max {trace.prompt.max()}), "
          f"answer tokens mean {am:.1f} (target {ANSWER_MEAN}, max {trace.answer.max()}); lognormal sigma {SIGMA}")
    assert abs(pm / PROMPT_MEAN - 1) <= 0.03 and abs(am / ANSWER_MEAN - 1) <= 0.03, "trace means off target"
    policies = [ORIGINAL, Policy(HeadSet.from_list(HEADS))]
    st = benchlib.stamp()
    rows = benchlib.RowLog(args.out)
    runs, fixed, verdicts = {}, {}, []
    for model in MODELS:
        cfg = model_config(model)
        n_layers = cfg.num_hidden_layers
        tb = token_bytes(cfg.num_key_value_heads, cfg.head_dim, torch.bfloat16)
        lay = layout(policies, n_layers, sharing=True)
        seg_layers = tuple(lay.tag(j).hi - lay.tag(j).lo for j in range(lay.n_segs))
        for budget in BUDGETS_GB:
            n_fixed, row_bytes = fixed_slots(cfg, budget, lay.lsh)
            if model == "Llama-3.1-8B":  # the published baseline
                assert n_fixed == FIXED_LLAMA[budget], (budget, n_fixed)
                assert round(row_bytes / 1e6, 2) == FIXED_LLAMA_ROW_MB, row_bytes
            fixed[(model, budget)] = n_fixed
            for bs in BLOCK_SIZES:
                plan = plan_for_config(cfg, torch.bfloat16, max_len=MAX_LEN, kv_budget_gb=budget, block_size=bs,
                                       max_slots=10**6)
                run = simulate(trace, plan.usable_blocks, bs, tb, n_layers, seg_layers)
                runs[(model, budget, bs)] = run
                s = run.steady()
                med = float(np.median(run.rows[s]))
                alloc = float(np.median(run.used[s] * plan.block_bytes / run.held[s]))
                ratio = med / n_fixed
                miss = [f"ratio {ratio:.2f}x < {TARGET_RATIO:g}x"] * (ratio < TARGET_RATIO) + \
                       [f"allocated/held {alloc:.3f} > {TARGET_ALLOC}"] * (alloc > TARGET_ALLOC)
                if run.has_steady:
                    verdicts.append((model, budget, bs, miss))
                rows.append(dict(st, model=model, budget_gb=budget, block_size=bs, pairs=args.pairs,
                                 prompt_mean=f"{pm:.1f}", answer_mean=f"{am:.1f}", fixed_rows=n_fixed,
                                 fixed_row_mb=f"{row_bytes / 1e6:.2f}", paged_blocks=plan.usable_blocks,
                                 paged_rows_median=f"{med:.0f}", paged_rows_peak=int(run.rows.max()),
                                 ratio=f"{ratio:.2f}", alloc_over_held=f"{alloc:.3f}", preemptions=run.preemptions,
                                 recomputed_pct=f"{100 * run.recomputed / trace.answer.sum():.2f}",
                                 steps=len(run.rows), steady_steps=f"{s.start}-{s.stop}",
                                 verdict=("n/a (no steady state)" if not run.has_steady else
                                          "FAIL: " + "; ".join(miss) if miss else "PASS")))
    png = plot(runs, fixed, "Llama-3.1-8B", args.out.with_suffix(".png"))
    short = [k for k, r in runs.items() if not r.has_steady]
    if short:
        print(f"No steady state in {len(short)} of {len(runs)} runs (the queue emptied before step {MAX_NEW + 1}): "
              "their medians are over the whole run; use more --pairs")
    for model, budget, bs, miss in verdicts:
        print(f"{model} at {budget} GB, {bs}-token blocks: " +
              ("PASS" if not miss else "FAIL (" + "; ".join(miss) + ")"))
    for model, budget, bs, miss in verdicts:
        if bs == 32 and miss:
            print(f"Target missed with the default 32-token blocks: {model} at {budget} GB ({'; '.join(miss)}).")
    print(f"targets: paged/fixed rows >= {TARGET_RATIO:g}x, allocated <= {TARGET_ALLOC}x held; fixed slots reserve "
          f"{MAX_LEN} tokens per row; medians over the steady state; {time.perf_counter() - t0:.0f} s; results in "
          f"{args.out}" + (f", plot {png}" if png else ""))
    print(benchlib.table(rows, ["model", "budget_gb", "block_size", "fixed_rows", "paged_rows_median",
                                "paged_rows_peak", "ratio", "alloc_over_held", "preemptions", "recomputed_pct",
                                "verdict"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
