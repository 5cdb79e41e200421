"""The CPU backend against what a CPU user would run instead, on the machine at hand (no GPU needed).

Sweep `pairs`: RetMask pairs (original + ablated row per prompt; 64-token random prompts, 96 greedy new
tokens, fp32) through the engine, beside transformers' `generate` run twice (the model, then the copy
with the heads' `o_proj` columns zeroed), for 1, 8 and 32 pairs, on the shipped toy model and on a tiny
random Llama (hidden 256, 4 layers, 8 query / 2 KV heads). Output tokens per second of both policies.
Sweep `detect`: one NIAH-shaped test (a random prompt, 50 decode steps with every head's argmax) by
the engine (what `retmask detect` runs per test), beside a detector built like the reference
(Retrieval_Head): one SDPA forward with logits at every prompt position, then eager attention with
`output_attentions` at every step and a loop over the heads. Seconds per test and peak resident
memory (each measurement in a fresh process, so the peak is its own), on the toy from 1K to 32K, and
on a tiny Llama with Llama-3's 128,256-token vocabulary (where full logits at every prompt position
are the reference's main cost).

Both sides of a comparison run in the same run, interleaved, `--reps` times; the table reports
medians. Threads: torch's default (one per core), as `retmask` leaves it.

    python benchmarks/bench_cpu.py                    # the committed sweep (results/cpu.csv)
    python benchmarks/bench_cpu.py --quick --out runs/bench/cpu.csv   # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import benchlib

TINY_LLAMA = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=65536)
BIG_VOCAB = dict(TINY_LLAMA, vocab_size=128256)
NEW, PROMPT, STEPS = 96, 64, 50


def load(name: str):
    """(model, heads to switch off) for 'toy', 'tiny-llama' or 'tiny-llama-128k-vocab', fp32, eval mode."""
    from retmask import toy
    from retmask.heads import HeadSet

    if name == "toy":
        model, _ = toy.load(dtype=torch.float32, device="cpu")
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(**(TINY_LLAMA if name == "tiny-llama" else BIG_VOCAB), tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    c = model.config
    heads = HeadSet.from_list([(l, h) for l in range(1, c.num_hidden_layers) for h in (0, 1)])
    return model.eval(), heads


def pairs_engine(model, heads, prompts) -> tuple[float, int]:
    from retmask.engine import ORIGINAL, Engine, GenConfig, Group, Policy

    pol = [ORIGINAL, Policy(heads)]
    cfg = GenConfig(max_new_tokens=NEW, eos_ids=())
    groups = [Group(p, pol, key=i) for i, p in enumerate(prompts)]
    with Engine(model, slots=2 * len(prompts), max_len=PROMPT + NEW, reuse_prefix=0) as eng:
        list(eng.generate(groups[:1], GenConfig(max_new_tokens=2, eos_ids=())))  # warm-up
        t = time.perf_counter()
        out = list(eng.generate(groups, cfg))
        sec = time.perf_counter() - t
    return sec, sum(len(r.tokens) for g in out for r in g.rows)


@torch.no_grad()
def pairs_generate(model, heads, prompts) -> tuple[float, int]:
    """`generate` (greedy, SDPA, the default dynamic cache) on the model, then on the zeroed copy."""
    model.set_attn_implementation("sdpa")
    ids = torch.tensor(prompts)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids[:1], **dict(kw, max_new_tokens=2, min_new_tokens=2))  # warm-up
    hd = model.config.head_dim
    saved = {(l, h): model.model.layers[l].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd].clone() for l, h in heads}
    t = time.perf_counter()
    toks = model.generate(ids, **kw).shape[1] - ids.shape[1]
    for l, h in heads:
        model.model.layers[l].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    toks += model.generate(ids, **kw).shape[1] - ids.shape[1]
    sec = time.perf_counter() - t
    for (l, h), w in saved.items():
        model.model.layers[l].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = w
    return sec, toks * ids.shape[0]


def detect_engine(model, prompt, span) -> float:
    from retmask.engine import ORIGINAL, Engine, GenConfig, Group
    from retmask.scoring import retrieval_scores_by_rule

    with Engine(model, slots=1, max_len=len(prompt) + STEPS, reuse_prefix=0) as eng:
        t = time.perf_counter()
        res = next(iter(eng.generate([Group(prompt, [ORIGINAL])],
                                     GenConfig(max_new_tokens=STEPS, eos_ids=(), return_argmax=True))))
        row = res.rows[0]
        retrieval_scores_by_rule(prompt, span, row.tokens, row.argmax)
        return time.perf_counter() - t


@torch.no_grad()
def detect_reference_style(model, prompt, span) -> float:
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([prompt])
    t = time.perf_counter()
    out = model(ids[:, :-1], use_cache=True)  # logits at every prompt position, as the reference
    past = out.past_key_values
    model.set_attn_implementation("eager")
    inp, c, (s, e) = ids[:, -1:], model.config, span
    score = [[0.0] * c.num_attention_heads for _ in range(c.num_hidden_layers)]
    for _ in range(STEPS):
        o = model(inp, past_key_values=past, use_cache=True, output_attentions=True)
        past, tok = o.past_key_values, o.logits[0, -1].argmax()
        for layer in range(c.num_hidden_layers):
            for h in range(c.num_attention_heads):
                i = int(o.attentions[layer][0, h, -1].argmax())
                if s <= i < e and int(ids[0, i]) == int(tok):
                    score[layer][h] += 1 / (e - s)
        inp = tok.view(1, 1)
    sec = time.perf_counter() - t
    model.set_attn_implementation("sdpa")
    return sec


def _child(spec: dict) -> dict:
    """One detection measurement in this (fresh) process: seconds and its own peak resident memory."""
    model, _ = load(spec["model"])
    g = torch.Generator().manual_seed(spec["length"])
    prompt = torch.randint(10, model.config.vocab_size, (spec["length"],), generator=g).tolist()
    span = (spec["length"] // 2, spec["length"] // 2 + 12)
    fn = detect_engine if spec["provider"] == "retmask" else detect_reference_style
    fn(model, prompt[:256], (100, 112))  # warm-up at a short length
    sec = fn(model, prompt, span)
    return {"seconds": sec, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def detect_once(model: str, provider: str, length: int) -> dict:
    spec = json.dumps({"model": model, "provider": provider, "length": length})
    done = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    if done.returncode != 0:
        raise RuntimeError(f"{provider} at {length} on {model} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="1,8,32")
    ap.add_argument("--models", default="toy,tiny-llama")
    ap.add_argument("--toy-lengths", default="1024,4096,16384,32768")
    ap.add_argument("--vocab-lengths", help="lengths of the 128,256-vocabulary detection rows (default 2048,8192; "
                    "'' for none)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smoke run: small sizes, one repetition")
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS / "cpu.csv")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    if args.quick:
        args.pairs, args.toy_lengths, args.reps = "1,2", "256", 1
    if args.vocab_lengths is None:
        args.vocab_lengths = "256" if args.quick else "2048,8192"
    st = dict(benchlib.stamp(), threads=torch.get_num_threads(), cores=os.cpu_count())
    rows = benchlib.RowLog(args.out)
    g = torch.Generator().manual_seed(0)
    for name in (m for m in args.models.split(",") if m):
        model, heads = load(name)
        for n in (int(x) for x in args.pairs.split(",")):
            prompts = torch.randint(10, min(model.config.vocab_size, 4096), (n, PROMPT), generator=g).tolist()
            times = {"retmask engine": [], "generate x2": []}
            toks = {}
            for _ in range(args.reps):  # interleaved
                for prov, fn in (("retmask engine", pairs_engine), ("generate x2", pairs_generate)):
                    sec, toks[prov] = fn(model, heads, prompts)
                    times[prov].append(sec)
            base = statistics.median(times["generate x2"])
            for prov, ts in times.items():
                sec = statistics.median(ts)
                rows.append(dict(st, sweep="pairs", model=name, provider=prov, size=f"{n} pairs", seconds=f"{sec:.3f}",
                                 tok_per_s=f"{toks[prov] / sec:.0f}", peak_rss_gb="",
                                 vs_baseline=f"{base / sec:.2f}x faster" if prov != "generate x2" else ""))
    for name, lengths in (("toy", args.toy_lengths), ("tiny-llama-128k-vocab", args.vocab_lengths)):
        for L in (int(x) for x in lengths.split(",") if x.strip()):
            res = {"retmask": [], "reference-style": []}
            for _ in range(args.reps):
                for prov in res:
                    res[prov].append(detect_once(name, prov, L))
            base = statistics.median(r["seconds"] for r in res["reference-style"])
            for prov, rs in res.items():
                sec = statistics.median(r["seconds"] for r in rs)
                rows.append(dict(st, sweep="detect", model=name, provider=prov, size=f"{L} tokens",
                                 seconds=f"{sec:.3f}", tok_per_s="",
                                 peak_rss_gb=f"{max(r['peak_rss_gb'] for r in rs):.2f}",
                                 vs_baseline=f"{sec / base:.2f}x its time" if prov == "retmask" else ""))
    print(benchlib.table(rows, ["sweep", "model", "provider", "size", "seconds", "tok_per_s", "peak_rss_gb",
                                "vs_baseline"]))
    print(f"{st['device']}, {st['cores']} cores, {st['threads']} threads, torch {st['torch']}; medians of "
          f"{args.reps} interleaved runs; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
