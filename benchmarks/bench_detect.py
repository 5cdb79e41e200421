"""Detection cost per NIAH test, 4K to 128K, on a Llama-3.1-8B-shaped random model (nothing downloaded).

Providers, per context length:
  - `retmask`: the engine (chunked prefill without logits, 50 decode steps with the decode kernel's
    per-head argmax) plus `retrieval_scores` on the device: what `retmask detect` runs per test.
  - `reference-style`: what Wu et al.'s detector does: one forward over the whole prompt with logits at
    every position, then 50 decode steps each recomputing eager attention (repeat_kv and a full
    softmax, `output_attentions=True`) and a Python loop over every (layer, head) with a device sync
    each; run at the lengths where it fits (`--baseline-max`).
  - `prefill floor`: the prompt's FLOPs (linear layers + causal attention) over the measured bf16
    matmul rate: no detector can do a test faster than its prefill.
Reported: seconds per test, peak GPU memory, ratio to the floor, speed-up over the baseline.

Depth sweep (`detect_sweep.csv`): one haystack with its needle at `--sweep-depths` depths (a grid's
column), run as `retmask detect` runs it (one slot, prompts in prefix order) with prefix reuse and
without: seconds per test, prompt tokens computed, and the floor of each (the FLOPs of the tokens
computed, each attending over everything before it).

The causal check (`detect_causal.csv`): one NIAH prompt answered by the 7 policies of `retmask niah`
(the original; selected heads in layers 2 and up, and random and non-retrieval controls of the same
size, each under scope `all` and `generated`) as rows of one group, 32 decode steps. Once with each
prefill stream's prompt KV stored once (the layout `retmask niah` gets) and once with every row
keeping its own (at the lengths where it fits): seconds per prompt, peak GPU memory, and the cache
and staging the engine sized.

    python benchmarks/bench_detect.py
    python benchmarks/bench_detect.py --tiny        # CPU smoke run on a tiny Llama
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import benchlib
from bench_engine import LLAMA_8B, TINY, _peak_gb, _peak_reset, _sync, build
from retmask import causal
from retmask.detect import prefill_flops
from retmask.engine import ORIGINAL, Engine, GenConfig, Group, Policy, prefix_order
from retmask.heads import HeadSet
from retmask.prefill import layout
from retmask.scoring import retrieval_scores

STEPS = 50
CAUSAL_STEPS = causal.DEFAULTS["steps"]


def matmul_tflops(device, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = benchlib.median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def depth_prompts(vocab: int, L: int, n_depths: int, g: torch.Generator) -> list[list[int]]:
    """One random L-token haystack with a 16-token needle at each of `n_depths` depths (linspace 0-100)
    and a 32-token question after it, as a grid's column of NIAH prompts."""
    hay = torch.randint(10, vocab, (L - 48,), generator=g).tolist()
    needle, question = (torch.randint(10, vocab, (n,), generator=g).tolist() for n in (16, 32))
    cuts = [round(i / max(1, n_depths - 1) * len(hay)) for i in range(n_depths)]
    return [hay[:c] + needle + hay[c:] + question for c in cuts]


def run_sweep(model, prompts, device, chunk, reuse: int):
    """A depth sweep as `retmask detect` runs it (one slot, prefix order, scores on the device): seconds
    per test, and the start of each prompt's computed part (its reused prefix)."""
    L = len(prompts[0])
    order = prefix_order(prompts)
    gen = GenConfig(max_new_tokens=STEPS, return_argmax=True)
    with Engine(model, slots=1, max_len=L + STEPS, chunk=chunk, reuse_prefix=reuse) as eng:
        # warm-up on another haystack with the same depths: the prefill kernel autotunes per (chunk, keys)
        # bucket, and the chunks after a reused prefix have their own sizes
        g = torch.Generator().manual_seed(1)
        warm = depth_prompts(model.config.vocab_size, L, len(prompts), g)
        list(eng.generate([Group(p, [ORIGINAL]) for p in (warm[i] for i in prefix_order(warm))],
                          GenConfig(max_new_tokens=2, return_argmax=True)))
        _sync(device)
        t = time.perf_counter()
        reused = {}
        for res in eng.generate([Group(prompts[i], [ORIGINAL], key=i) for i in order], gen):
            row = res.rows[0]
            sc = retrieval_scores(torch.tensor(prompts[res.key], device=device), (L - 40, L - 32), row.tokens,
                                  row.argmax.to(device))
            sc.sum().item()
            reused[res.key] = res.reused
        _sync(device)
        return (time.perf_counter() - t) / len(prompts), [reused[i] for i in range(len(prompts))]


def causal_policies(config, k: int, seed: int = 0) -> list[Policy]:
    """`retmask niah`'s policies on a model shaped like `config`: k selected heads in layers 2 and up (where
    the paper's threshold puts Llama-3.1-8B's lowest), and random and non-retrieval controls of the same
    size drawn as the command draws them, each under scope `all` and `generated`."""
    g = torch.Generator().manual_seed(seed)
    L, H = config.num_hidden_layers, config.num_attention_heads
    scores = {(l, h): 0.05 * float(torch.rand((), generator=g)) for l in range(L) for h in range(H)}
    for i in torch.randperm((L - 2) * H, generator=g)[:k].tolist():
        scores[(2 + i // H, i % H)] = 0.5
    return causal.make_policies(HeadSet.from_scores(scores, topk=k), scores)


def run_causal(model, prompt, policies, device, chunk, per_row: bool):
    """One NIAH prompt answered by every policy as rows of one group, sized as `retmask niah` sizes it
    (per_row: sharing off, so each row keeps its own prompt KV). Seconds, peak GB, the KV the group held at
    its peak (its blocks) and the staging the engine budgets (GB), and its layout (shared depth, prompt block
    sets per group)."""
    L = len(prompt)
    kw = dict(slots=len(policies), max_len=L + CAUSAL_STEPS, chunk=chunk, reuse_prefix=0, sharing=not per_row)
    with Engine(model, **kw) as eng:
        list(eng.generate([Group(prompt, policies)], GenConfig(max_new_tokens=2)))  # warm-up at the same length
        _sync(device)
        _peak_reset(device)
        t = time.perf_counter()
        list(eng.generate([Group(prompt, policies)], GenConfig(max_new_tokens=CAUSAL_STEPS)))
        _sync(device)
        lay = layout(policies, eng.d.n_layers, eng.sharing)
        cache = eng.stats["kv_blocks_peak"] * eng.plan.block_bytes / 1e9
        return (time.perf_counter() - t, _peak_gb(device), cache, eng.plan.staging_bytes / 1e9, lay.lsh, lay.n_segs)


def run_retmask(model, prompt, span, device, chunk):
    L = len(prompt)
    # reuse_prefix=0: one test computed whole (the warm-up runs the same prompt, whose KV it would copy)
    with Engine(model, slots=1, max_len=L + STEPS, chunk=chunk, reuse_prefix=0) as eng:
        # warm-up at the same length: the prefill kernel autotunes per (chunk, keys) bucket, and a shorter
        # prompt would leave that tuning (seconds at 128K) inside the timed test
        list(eng.generate([Group(prompt, [ORIGINAL])], GenConfig(max_new_tokens=2, return_argmax=True)))
        _sync(device)
        _peak_reset(device)
        t = time.perf_counter()
        res = next(iter(eng.generate([Group(prompt, [ORIGINAL])],
                                     GenConfig(max_new_tokens=STEPS, return_argmax=True))))
        row = res.rows[0]
        sc = retrieval_scores(torch.tensor(prompt, device=device), span, row.tokens, row.argmax.to(device))
        sc.sum().item()
        _sync(device)
        return time.perf_counter() - t, _peak_gb(device)


@torch.no_grad()
def run_reference_style(model, prompt, span, device):
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([prompt], device=device)
    _sync(device)
    _peak_reset(device)
    t = time.perf_counter()
    out = model(ids[:, :-1], use_cache=True)  # logits at every prompt position
    past = out.past_key_values
    model.set_attn_implementation("eager")
    inp = ids[:, -1:]
    c = model.config
    score = [[0.0] * c.num_attention_heads for _ in range(c.num_hidden_layers)]
    s, e = span
    for _ in range(STEPS):
        o = model(inp, past_key_values=past, use_cache=True, output_attentions=True)
        past = o.past_key_values
        tok = o.logits[0, -1].argmax()
        for layer in range(c.num_hidden_layers):
            for h in range(c.num_attention_heads):
                i = int(o.attentions[layer][0, h, -1].argmax())  # one sync per head per step
                if s <= i < e and int(ids[0, i]) == int(tok):
                    score[layer][h] += 1 / (e - s)
        inp = tok.view(1, 1)
    _sync(device)
    sec = time.perf_counter() - t
    model.set_attn_implementation("sdpa")
    return sec, _peak_gb(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--baseline-max", type=int, default=32768, help="longest length the baseline runs at")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--sweep-length", type=int, default=32768, help="context of the depth sweep (0: none)")
    ap.add_argument("--sweep-depths", type=int, default=10)
    ap.add_argument("--causal-lengths", default="32768,65536,131072", help="lengths of the causal check ('': none)")
    ap.add_argument("--per-row-max", type=int, default=65536,
                    help="longest causal-check length run with every row keeping its own prompt KV")
    ap.add_argument("--heads", type=int, default=33, help="heads the causal check switches off (Llama-3.1-8B at "
                    "tau 0.1: 33)")
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS / "detect.csv")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny Llama")
    args = ap.parse_args(argv)
    device = benchlib.resolve_mode(args, "detect", dict(lengths="96,160", baseline_max=160, chunk=64,
                                                        sweep_length=400, sweep_depths=5, causal_lengths="96,160",
                                                        per_row_max=160, heads=2), interpreter=False)
    if device is None:
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(TINY if args.tiny else LLAMA_8B, device, dtype)
    c = model.config
    st = benchlib.stamp()
    tflops = matmul_tflops(device, dtype, 256 if args.tiny else 8192)
    g = torch.Generator().manual_seed(0)
    rows = benchlib.RowLog(args.out)  # each row is saved as it is measured
    for L in (int(x) for x in args.lengths.split(",") if x.strip()):
        prompt = torch.randint(10, c.vocab_size, (L,), generator=g).tolist()
        span = (L // 2, L // 2 + 12)
        floor = prefill_flops(c, L) / (tflops * 1e12)
        sec, peak = run_retmask(model, prompt, span, device, args.chunk)
        base = run_reference_style(model, prompt, span, device) if L <= args.baseline_max else None
        for name, r in (("retmask", (sec, peak)), ("reference-style", base)):
            if r is None:
                continue
            rows.append(dict(st, provider=name, length=L, steps=STEPS, seconds=f"{r[0]:.3f}", peak_gb=f"{r[1]:.2f}",
                             floor_s=f"{floor:.3g}", vs_floor=f"{r[0] / floor:.2f}",
                             speedup=f"{base[0] / sec:.1f}" if (name == "retmask" and base) else "",
                             matmul_tflops=f"{tflops:.0f}"))
    if rows:
        print(f"\nwrote {len(rows)} rows to {args.out}\n")
        print(benchlib.table(rows, ["provider", "length", "seconds", "peak_gb", "floor_s", "vs_floor", "speedup"]))
    if args.causal_lengths.strip():
        pols = causal_policies(c, args.heads)
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        crows = benchlib.RowLog(args.out.with_name(args.out.stem + "_causal.csv"))
        for L in (int(x) for x in args.causal_lengths.split(",") if x.strip()):
            prompt = torch.randint(10, c.vocab_size, (L,), generator=g).tolist()
            for per_row in (False, True) if L <= args.per_row_max else (False,):
                sec, peak, cache, staging, pooled, segs = run_causal(model, prompt, pols, device, args.chunk, per_row)
                crows.append(dict(st, provider="prompt KV per row" if per_row else "prompt KV per stream",
                                  length=L, rows=len(pols), streams=len({p.prompt_heads for p in pols}),
                                  steps=CAUSAL_STEPS, seconds=f"{sec:.3f}", peak_gb=f"{peak:.2f}",
                                  cache_gb=f"{cache:.4g}", staging_gb=f"{staging:.4g}", weights_gb=f"{weights:.4g}",
                                  shared_depth=pooled, segments=segs))
        print(f"\nwrote {len(crows)} rows to {crows.path}\n")
        print(benchlib.table(crows, ["provider", "length", "rows", "streams", "seconds", "peak_gb", "cache_gb",
                                     "staging_gb", "weights_gb"]))
    if args.sweep_length:
        L, n = args.sweep_length, args.sweep_depths
        prompts = depth_prompts(c.vocab_size, L, n, g)
        sweep = benchlib.RowLog(args.out.with_name(args.out.stem + "_sweep.csv"))
        reuse = 16 if args.tiny else 128
        timed = {r: run_sweep(model, prompts, device, args.chunk, r) for r in (0, reuse)}
        for r, (sec, pre) in timed.items():
            floor = sum(prefill_flops(c, L, s) for s in pre) / n / (tflops * 1e12)
            sweep.append(dict(st, provider="retmask, prefix reuse" if r else "retmask, no reuse", length=L, depths=n,
                              steps=STEPS, seconds=f"{sec:.3f}", computed_tokens=n * (L - 1) - sum(pre),
                              reused=f"{sum(pre) / (n * (L - 1)):.2f}", floor_s=f"{floor:.3g}",
                              vs_floor=f"{sec / floor:.2f}",
                              speedup=f"{timed[0][0] / sec:.2f}", matmul_tflops=f"{tflops:.0f}"))
        print(f"\nwrote {len(sweep)} rows to {sweep.path}\n")
        print(benchlib.table(sweep, ["provider", "length", "depths", "seconds", "computed_tokens", "reused",
                                     "floor_s", "vs_floor", "speedup"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
