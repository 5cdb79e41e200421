"""What prefix reuse saves in detection: prefill FLOPs by count, and (with --time) seconds on this machine.

Counts, for the Llama-3.1-8B shape, the prefill FLOPs of NIAH prompts with and without prefix reuse, fed
to one slot in `prefix_order` (each prompt reuses what it shares with the one before): one grid column
(10 depths) at several lengths, one needle's whole `128k` grid (20 lengths x 10 depths), and that grid
split over torchrun ranks as `retmask detect` splits it (every world-th prompt). Random tokens stand in for
the haystack, so the shared prefixes are exactly the haystack before each needle.

    python scripts/prefix_reuse.py                 # FLOP counts (no model)
    python scripts/prefix_reuse.py --time 4096     # also time one column on a small random Llama here
    python scripts/prefix_reuse.py --lookup        # also the host time of a prefix lookup, 512 cached prompts
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_detect import depth_prompts, prefill_flops, run_sweep  # noqa: E402
from bench_engine import LLAMA_8B, build  # noqa: E402
from retmask.detect import plan  # noqa: E402
from retmask.engine import common_prefix  # noqa: E402

SMALL = dict(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=16384)


def grid(vocab: int, seed: int = 0) -> list[np.ndarray]:
    """One needle's `128k` grid: 20 lengths x 10 depths over one haystack (a shorter context is a cut of it)."""
    g = torch.Generator().manual_seed(seed)
    hay = torch.randint(10, vocab, (128000,), generator=g).numpy()
    needle, question = (torch.randint(10, vocab, (n,), generator=g).numpy() for n in (16, 32))
    out = []
    for L in np.round(np.linspace(4000, 128000, 20)).astype(int):
        h = hay[: L - 48]
        for d in np.linspace(0, 100, 10):
            cut = int(round(d / 100 * len(h)))
            out.append(np.concatenate([h[:cut], needle, h[cut:], question]))
    return out


def lookup(prompts: int = 512, L: int = 4096, n: int = 64) -> None:
    """Host time of a prefix-cache lookup (`BlockManager.match` over the prompt's block hashes) with the
    full blocks of `prompts` L-token prompts of one haystack cached (needles at random depths: every cached
    prompt shares a prefix with every query), against a scan of every cached prompt."""
    from retmask.blocks import BlockManager, BlockTag, chain_hashes
    from retmask.cache_plan import DEFAULT_BLOCK_SIZE as BS

    rng = np.random.default_rng(0)
    hay, needle = rng.integers(10, 128000, L), rng.integers(10, 128000, 16)
    prompt = lambda c: np.concatenate([hay[:c], needle, hay[c:L - 16]])  # noqa: E731
    held = [prompt(int(rng.integers(0, L - 16))) for _ in range(prompts)]
    bm = BlockManager(prompts * (L // BS))
    tag = BlockTag(0, 32, ())
    for a in held:
        ds = chain_hashes(a, BS)
        for b, d in zip(bm.allocate(len(ds)), ds):
            bm.cache(b, d, tag)
    qs = [prompt(int(c)) for c in rng.integers(0, L - 16, n)]
    t = time.perf_counter()
    for a in qs:
        bm.match(chain_hashes(a, BS), 0, 32, ())
    t_index = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for a in qs:
        max(common_prefix(a, h) for h in held)
    t_scan = (time.perf_counter() - t) / n
    print(f"\nprefix lookup among {prompts} cached prompts of {L} tokens: {t_index * 1e3:.2f} ms (block hashes), "
          f"{t_scan * 1e3:.2f} ms (scan of every prompt)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=int, metavar="L", help="also time one L-token column on a small Llama (CPU)")
    ap.add_argument("--lookup", action="store_true", help="also time the engine's prefix lookup (host)")
    args = ap.parse_args(argv)
    from transformers import LlamaConfig

    c = LlamaConfig(**LLAMA_8B)
    g = torch.Generator().manual_seed(0)
    print("| prompts (8B shape, one slot, prefix order) | tokens reused | prefill FLOPs | fewer |")
    print("|---|---|---|---|")
    for L in (4096, 32768, 131072):
        r = plan(depth_prompts(c.vocab_size, L, 10, g), c)
        print(f"| one column, {L // 1024}K, 10 depths | {r['reused_tokens'] / r['prompt_tokens']:.0%} | "
              f"{r['flops'] / 1e15:.1f} -> {r['flops_reused'] / 1e15:.1f} PFLOP | "
              f"{r['flops'] / r['flops_reused']:.2f}x |")
    ps = grid(c.vocab_size)
    r = plan(ps, c)
    f0 = r["flops"]
    print(f"| one needle's 128k grid (200 prompts) | {r['reused_tokens'] / r['prompt_tokens']:.0%} | "
          f"{f0 / 1e15:.0f} -> {r['flops_reused'] / 1e15:.0f} PFLOP | {f0 / r['flops_reused']:.2f}x |")
    for world in (2, 8):
        f1 = sum(plan(ps[k::world], c)["flops_reused"] for k in range(world))
        print(f"| the same over {world} ranks (every world-th prompt) | | {f0 / 1e15:.0f} -> {f1 / 1e15:.0f} PFLOP "
              f"| {f0 / f1:.2f}x |")
    if args.lookup:
        lookup()
    if args.time:
        L = args.time
        model = build(SMALL, torch.device("cpu"), torch.float32)
        ps = depth_prompts(SMALL["vocab_size"], L, 10, torch.Generator().manual_seed(0))
        print(f"\nOne {L}-token column (10 depths) on a small Llama ({SMALL['num_hidden_layers']} layers, hidden "
              f"{SMALL['hidden_size']}), CPU, {torch.get_num_threads()} threads: seconds per test")
        t0 = time.perf_counter()
        for r in (0, 128, 0, 128):
            sec, pre = run_sweep(model, ps, torch.device("cpu"), 1024, r)
            fl = sum(prefill_flops(model.config, len(p), s) for p, s in zip(ps, pre))
            print(f"  reuse_prefix={r:<4d} {sec:.2f} s  (reused {sum(pre) / (10 * (L - 1)):.0%}, prefill "
                  f"{fl / 10 / 1e9:.0f} GFLOP per test)", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
