"""Host time of an engine decode step outside the model's forward, on CPU.

Between two decode steps the GPU waits for the host (sampling result to the host, bookkeeping,
the next step's inputs), so this time adds to every step. A Llama with the layer and head counts
of Llama-3.1-8B but tiny widths runs `--pairs` RetMask pairs at once; the script times each
`Engine._step` and subtracts the forward it contains.

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
    spent = {"step": 0.0, "forward": 0.0, "n": 0}
    step, run = Engine._step, E.StaticStep.run

    def timed_step(self, st, c):
        t = time.perf_counter()
        out = step(self, st, c)
        spent["step"] += time.perf_counter() - t
        spent["n"] += 1
        return out

    def timed_run(self, *a):
        t = time.perf_counter()
        out = run(self, *a)
        spent["forward"] += time.perf_counter() - t
        return out

    Engine._step, E.StaticStep.run = timed_step, timed_run
    with Engine(model, slots=2 * args.pairs, max_len=16 + args.new, decode="static",
                policies=groups[0].policies) as eng:
        list(eng.generate(groups[:1], GenConfig(max_new_tokens=2)))  # warm-up
        spent.update(step=0.0, forward=0.0, n=0)
        list(eng.generate(groups, GenConfig(max_new_tokens=args.new)))
    ms = 1e3 * (spent["step"] - spent["forward"]) / spent["n"]
    print(f"{2 * args.pairs} slots, {args.layers} layers x {args.heads} heads, {spent['n']} steps: "
          f"{ms:.2f} ms of host time per step outside the forward")


if __name__ == "__main__":
    main()
