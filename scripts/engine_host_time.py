"""Host time of an engine decode step outside the model's forward, on CPU.

A step's host work is its launch (inputs, bitmap rows that changed, the queued forward and copies)
and its collection (tokens to the rows, stop rules, finished rows). Collected before the next launch
(`overlap=False`), both add to every step on a GPU; with `overlap=True` (CUDA's default) step k is
collected after step k+1 is launched, so the GPU waits only when launch + collection outlast a step.
A Llama with the layer and head counts of Llama-3.1-8B but tiny widths runs `--pairs` RetMask pairs
at once; the script times each `Engine._launch` (less the forward it contains) and `Engine._collect`.

    python scripts/engine_host_time.py               # 256 pairs (512 slots), 32 layers x 32 heads
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from retmask import decoding as E
from retmask.engine import ORIGINAL, Engine, GenConfig, Group, Policy
from retmask.heads import HeadSet


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--new", type=int, default=24)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=64, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 4), head_dim=16,
                      max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    heads = HeadSet.from_list([(min(2, args.layers - 1), 0), (args.layers - 1, args.heads - 1)])
    g = torch.Generator().manual_seed(0)
    groups = [Group(torch.randint(3, 97, (16,), generator=g).tolist(), [ORIGINAL, Policy(heads)], key=i)
              for i in range(args.pairs)]
    spent = {"launch": 0.0, "forward": 0.0, "collect": 0.0, "n": 0}
    launch, collect, run = Engine._launch, Engine._collect, E.StaticStep.run

    def timed_launch(self, *a):
        t = time.perf_counter()
        out = launch(self, *a)
        spent["launch"] += time.perf_counter() - t
        spent["n"] += 1
        return out

    def timed_collect(self, *a):
        t = time.perf_counter()
        out = collect(self, *a)
        spent["collect"] += time.perf_counter() - t
        return out

    def timed_run(self, *a):
        t = time.perf_counter()
        out = run(self, *a)
        spent["forward"] += time.perf_counter() - t
        return out

    Engine._launch, Engine._collect, E.StaticStep.run = timed_launch, timed_collect, timed_run
    with Engine(model, slots=2 * args.pairs, max_len=16 + args.new, decode="static") as eng:
        list(eng.generate(groups[:1], GenConfig(max_new_tokens=2)))  # warm-up
        spent.update(launch=0.0, forward=0.0, collect=0.0, n=0)
        list(eng.generate(groups, GenConfig(max_new_tokens=args.new)))
    ms = {k: 1e3 * spent[k] / spent["n"] for k in ("launch", "forward", "collect")}
    print(f"{2 * args.pairs} slots, {args.layers} layers x {args.heads} heads, {spent['n']} steps: host time per "
          f"step outside the forward {ms['launch'] - ms['forward'] + ms['collect']:.2f} ms (launch "
          f"{ms['launch'] - ms['forward']:.2f} ms, collection {ms['collect']:.2f} ms)")


if __name__ == "__main__":
    main()
