"""Engine throughput: both policies of a RetMask pair in one pass, beside transformers' generate run twice.

A Llama-3.1-8B-shaped model built from its config with random bf16 weights (nothing downloaded).
Sweep `pairs`: 64-token prompts, 512 forced new tokens, 1 to 256 pairs; the engine runs original
and ablated rows together; the baseline is `generate` (SDPA, static cache) on the original model,
then on the copy with the heads' `o_proj` columns zeroed. Reported: output tokens per second of both
policies together, the engine's mean decode step against the bandwidth floor (weights + KV bytes per
step over the measured copy bandwidth), and peak memory. At `--sampled-pairs` the engine also
samples (temperature 0.6, as `retmask pairs`), to show what sampling adds to a step; at
`--serial-pairs` it also runs with overlap off (each step's tokens collected before the next launch),
to show what hiding the host's work behind the GPU's buys; at `--eager-pairs`, without CUDA graphs.
Sweep `long`: one pair on a 32K prompt, 256 new tokens, scope `all` and scope `generated`.

    python benchmarks/bench_engine.py
    python benchmarks/bench_engine.py --tiny --out runs/bench/engine.csv   # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import benchlib
from retmask.engine import ORIGINAL, Engine, GenConfig, Group, Policy
from retmask.heads import HeadSet
from retmask.sampling import Sampling

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                rope_theta=500000.0)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def build(shape: dict, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape, tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def heads_for(n_layers: int, n_heads: int, k: int, low: int) -> HeadSet:
    """k heads spread over layers >= low (the paper's selections start at layer 2)."""
    g = torch.Generator().manual_seed(0)
    pool = [(layer, h) for layer in range(low, n_layers) for h in range(n_heads)]
    idx = torch.randperm(len(pool), generator=g)[:k].tolist()
    return HeadSet.from_list([pool[i] for i in idx])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")


def run_engine(model, groups, cfg, slots, max_len, device, decode="auto", overlap=None):
    """Seconds, decode steps, tokens and peak GB of one engine run, and the decode mode it ran in.
    The cache is sized for the groups' policies, as `retmask pairs` sizes it."""
    # reuse_prefix=0: the warm-up runs the timed run's first prompt, whose KV a timed group would otherwise copy
    with Engine(model, slots=slots, max_len=max_len, chunk=4096, decode=decode, reuse_prefix=0, overlap=overlap) as eng:
        # warm-up (Triton compiles incl. the sampler's, allocator, graph), with the timed run's sampling
        list(eng.generate(groups[:1], GenConfig(max_new_tokens=4, sampling=cfg.sampling)))
        _sync(device)
        _peak_reset(device)
        t = time.perf_counter()
        steps = [0]
        out = list(eng.generate(groups, cfg, progress=lambda n: steps.__setitem__(0, steps[0] + 1)))
        _sync(device)
        sec = time.perf_counter() - t
        mode = eng.decode if not eng.graph_errors else "static (capture failed: " + eng.graph_errors[0][:80] + ")"
        mode += " + overlap" if eng.overlap else ""
    return sec, steps[0], sum(len(r.tokens) for g in out for r in g.rows), _peak_gb(device), mode


def run_generate_twice(model, heads: HeadSet, prompts, new, device, compile_: bool = False):
    """transformers' generate on the original model, then on the zeroed copy (columns zeroed in place).

    A static cache on CUDA makes `generate` compile the forward (torch.compile, CUDA graphs) unless told
    not to. `compile_=False` runs it eagerly. `compile_=True` warms up on the timed batch and cache
    length (`max_cache_len`), so the compilation (tens of seconds per shape) stays outside the timing."""
    model.set_attn_implementation("sdpa")
    ids = torch.tensor(prompts, device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
              max_cache_len=ids.shape[1] + new, disable_compile=not compile_, pad_token_id=0, eos_token_id=None)
    model.generate(ids if compile_ else ids[:1], **dict(kw, max_new_tokens=4, min_new_tokens=4))
    hd = model.config.head_dim
    saved = {(layer, h): model.model.layers[layer].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd].clone()
             for layer, h in heads}
    _sync(device)
    _peak_reset(device)
    t = time.perf_counter()
    toks = model.generate(ids, **kw).shape[1] - ids.shape[1]
    with torch.no_grad():
        for layer, h in heads:
            model.model.layers[layer].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    toks += model.generate(ids, **kw).shape[1] - ids.shape[1]
    _sync(device)
    sec = time.perf_counter() - t
    with torch.no_grad():
        for (layer, h), w in saved.items():
            model.model.layers[layer].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = w
    return sec, toks * ids.shape[0], _peak_gb(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="1,8,32,64,128,256")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--long-prompt", type=int, default=32768)
    ap.add_argument("--long-new", type=int, default=256)
    ap.add_argument("--eager-pairs", default="1,32",
                    help="pair counts also run with decode='eager' (no CUDA graph), to show what the graph buys")
    ap.add_argument("--serial-pairs", default="1,32",
                    help="pair counts also run with overlap=False (each step collected before the next launch), "
                         "to show what overlapping the host's work with the GPU's buys")
    ap.add_argument("--sampled-pairs", default="256",
                    help="pair counts where the engine also samples (temperature 0.6, the pairs job's default) "
                         "instead of greedy, to show what sampling adds to a step")
    ap.add_argument("--heads", type=int, default=33, help="heads switched off (Llama-3.1-8B at tau 0.1: 33)")
    ap.add_argument("--compiled-pairs", default="32",
                    help="pair counts where generate also runs compiled (static cache + torch.compile; each "
                         "costs a compilation before its timing); the other rows run generate eagerly")
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS / "engine.csv")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny Llama")
    args = ap.parse_args(argv)
    device = benchlib.resolve_mode(args, "engine", dict(
        pairs="1,3", eager_pairs="1", serial_pairs="3", sampled_pairs="3", prompt=16, new=8, long_prompt=200,
        long_new=4, heads=3), interpreter=False)
    if device is None:
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(TINY if args.tiny else LLAMA_8B, device, dtype)
    c = model.config
    hs = heads_for(c.num_hidden_layers, c.num_attention_heads, args.heads, low=min(2, c.num_hidden_layers - 1))
    st = benchlib.stamp()
    copy_gbs = benchlib.copy_bandwidth_gbs(device)
    # weights a decode step reads: all but the input embedding, of which it gathers one row per token
    w_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv_tok = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(0)
    rows = benchlib.RowLog(args.out)  # each row is saved as it is measured
    for n in (int(x) for x in args.pairs.split(",")):
        prompts = torch.randint(10, c.vocab_size, (n, args.prompt), generator=g).tolist()
        groups = [Group(p, [ORIGINAL, Policy(hs)], key=i) for i, p in enumerate(prompts)]
        cfg = GenConfig(max_new_tokens=args.new)
        mean_ctx = args.prompt + args.new / 2
        floor_ms = 1e3 * (w_bytes + 2 * n * mean_ctx * kv_tok) / (copy_gbs * 1e9)  # bytes read per step / bandwidth
        runs = [("engine (both policies, one pass)", "auto", cfg, None)]
        if str(n) in args.eager_pairs.split(","):
            runs.append(("engine, decode eager (no CUDA graph)", "eager", cfg, None))
        if str(n) in args.serial_pairs.split(","):
            runs.append(("engine, host in the step (overlap off)", "auto", cfg, False))
        if str(n) in args.sampled_pairs.split(","):
            runs.append(("engine, sampled (temperature 0.6)", "auto",
                         GenConfig(max_new_tokens=args.new, sampling=Sampling(temperature=0.6)), None))
        timed = []
        for name, decode, c_run, overlap in runs:
            sec, steps, toks, peak, mode = run_engine(model, groups, c_run, 2 * n, args.prompt + args.new, device,
                                                      decode, overlap)
            timed.append((name, mode, sec, toks, peak, 1e3 * sec / max(1, steps)))
        b_sec, b_toks, b_peak = run_generate_twice(model, hs, prompts, args.new, device)
        timed.append(("generate x2 (sdpa, static cache)", "hf eager", b_sec, b_toks, b_peak, None))
        best = b_sec
        if str(n) in args.compiled_pairs.split(",") and device.type == "cuda":
            c_sec, c_toks, c_peak = run_generate_twice(model, hs, prompts, args.new, device, compile_=True)
            timed.append(("generate x2 (sdpa, static cache, torch.compile)", "hf compiled", c_sec, c_toks, c_peak,
                          None))
            best = min(best, c_sec)
        for name, mode, s, t, p, step_ms in timed:
            eng = step_ms is not None
            rows.append(dict(st, sweep="pairs", provider=name, decode=mode, pairs=n, prompt=args.prompt,
                             new=args.new, scope="all", seconds=f"{s:.3f}", tok_per_s=f"{t / s:.1f}",
                             step_ms=f"{step_ms:.2f}" if eng else "", floor_ms=f"{floor_ms:.2f}" if eng else "",
                             floor_frac=f"{floor_ms / step_ms:.2f}" if eng else "",
                             speedup=f"{best / s:.2f}" if eng else "",  # over the faster generate run
                             peak_gb=f"{p:.2f}", copy_gbs=f"{copy_gbs:.0f}"))
    prompt = torch.randint(10, c.vocab_size, (args.long_prompt,), generator=g).tolist()
    for scope in ("all", "generated"):
        groups = [Group(prompt, [ORIGINAL, Policy(hs, scope)])]
        sec, steps, toks, peak, mode = run_engine(model, groups, GenConfig(max_new_tokens=args.long_new), 2,
                                                  args.long_prompt + args.long_new, device)
        rows.append(dict(st, sweep="long", provider=f"engine, scope {scope}", decode=mode, pairs=1,
                         prompt=args.long_prompt, new=args.long_new, scope=scope, seconds=f"{sec:.3f}",
                         tok_per_s=f"{toks / sec:.1f}", step_ms=f"{1e3 * sec / max(1, steps):.2f}", floor_ms="",
                         floor_frac="", speedup="", peak_gb=f"{peak:.2f}", copy_gbs=f"{copy_gbs:.0f}"))
    print(f"\nwrote {len(rows)} rows to {args.out}\n")
    print(benchlib.table(rows, ["sweep", "provider", "decode", "pairs", "prompt", "new", "seconds", "tok_per_s",
                                "step_ms", "floor_ms", "floor_frac", "speedup", "peak_gb"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
