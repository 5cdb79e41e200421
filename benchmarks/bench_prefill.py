"""Prefill attention: retmask's masked kernel beside torch SDPA (each backend), FlexAttention and flash-attn.

Llama-3.1-8B attention shapes (32 query / 8 KV heads, D 128, bf16), 4K-128K tokens, 0 / 50 / 100 %
of heads off (random per row). TFLOP/s count the useful causal FLOPs, 4 * D * L * (L + 1) / 2 per
head that is on: switched-off heads are not counted, so a baseline that cannot skip them pays for
them. Baselines zero the off heads' outputs afterwards; FlexAttention gets an equivalent per-head
block mask and skips them itself. Rows are appended to a CSV with device, versions, commit and date;
a plot and a GitHub table come last.

    python benchmarks/bench_prefill.py                       # GPU: full sweep
    TRITON_INTERPRET=1 python benchmarks/bench_prefill.py --tiny --out runs/bench/prefill.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import benchlib
from retmask.kernels import masked_attention, masked_attention_reference

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def causal_block_mask(keep: torch.Tensor, length: int, block: int = 128):
    """FlexAttention's causal mask with the off heads removed, built from its blocks: for query block
    i, key blocks 0..i-1 are full and block i (the diagonal) is partial; an off head has none. Unlike
    `create_block_mask` uncompiled, nothing of size B x H x L x L is materialized (512 GiB at 128K)."""
    from torch.nn.attention.flex_attention import BlockMask

    b, h = keep.shape
    n = -(-length // block)
    ar = torch.arange(n, device=keep.device, dtype=torch.int32)
    on = keep.to(torch.int32)[:, :, None].expand(b, h, n)
    rows = lambda t: t.expand(b, h, n, n).contiguous()  # noqa: E731

    def mask_mod(bi, hi, qi, ki):
        return keep[bi, hi] & (qi >= ki)

    return BlockMask.from_kv_blocks(on.contiguous(), rows(ar[:, None].expand(n, n)), (on * ar).contiguous(),
                                    rows(ar[None, :].expand(n, n)), block, mask_mod, (length, length))


def providers(names: list[str], keep: torch.Tensor, hq: int, hkv: int):
    """name -> (prepare(q, k, v) -> args, run(args) -> out (B, Hq, L, D)); unavailable ones are skipped."""
    zero = ~keep[:, :, None, None]  # (B, Hq, 1, 1)
    off_any = bool(zero.any())

    def zeroed(o):
        return o.masked_fill(zero, 0.0) if off_any else o

    out = {}
    for name in names:
        if name == "retmask":
            out[name] = (lambda q, k, v: (q, k, v), lambda a: masked_attention(*a, keep, check_values=False))
        elif name == "reference":
            out[name] = (lambda q, k, v: (q, k, v), lambda a: masked_attention_reference(*a, keep))
        elif name.startswith("sdpa-"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                           "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[name[5:]])

            def run(a, backend=backend):
                q, k, v, gqa = a
                with sdpa_kernel(backend):
                    return zeroed(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa))

            def prep(q, k, v, backend=backend):
                try:  # native GQA where the backend has it, else K/V expanded outside the timed region
                    with sdpa_kernel(backend):
                        F.scaled_dot_product_attention(q[:, :, :16], k[:, :, :16], v[:, :, :16], is_causal=True,
                                                       enable_gqa=True)
                    return q, k, v, True
                except RuntimeError:
                    g = hq // hkv
                    return q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), False

            out[name] = (prep, run)
        elif name == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            compiled = torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention

            def prep(q, k, v):
                return q, k, v, causal_block_mask(keep, q.shape[2])

            out[name] = (prep, lambda a: compiled(a[0], a[1], a[2], block_mask=a[3], enable_gqa=True))
        elif name == "flash-attn":
            try:
                from flash_attn import flash_attn_func
            except ImportError:
                continue

            def prep(q, k, v):
                return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, L, H, D)

            out[name] = (prep, lambda a: zeroed(flash_attn_func(*a, causal=True).transpose(1, 2)))
        else:
            raise SystemExit(f"--providers: unknown provider {name!r}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--off", default="0,0.5,1", help="fractions of heads switched off")
    ap.add_argument("--tokens", type=int, default=16384, help="batch = max(1, tokens // length)")
    ap.add_argument("--heads", default="32,8", help="query heads, KV heads")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--providers", default="retmask,sdpa-flash,sdpa-efficient,sdpa-cudnn,sdpa-math,flex,flash-attn")
    ap.add_argument("--math-max-len", type=int, default=8192, help="sdpa-math materialises L x L scores")
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS / "prefill.csv")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, interpreter, fp32")
    args = ap.parse_args(argv)
    device = benchlib.resolve_mode(args, "prefill", dict(
        lengths="64,96", off="0,0.5,1", tokens=128, heads="8,2", dim=32, dtype="float32",
        providers="retmask,reference,sdpa-math,flex"))
    if device is None:
        return 2
    dtype = getattr(torch, args.dtype)
    hq, hkv = (int(x) for x in args.heads.split(","))
    d = args.dim
    st = benchlib.stamp()
    rows = benchlib.RowLog(args.out)  # each row is saved as it is measured
    for length in (int(x) for x in args.lengths.split(",")):
        b = max(1, args.tokens // length)
        g = torch.Generator(device=device).manual_seed(length)
        q = torch.randn(b, hq, length, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(b, hkv, length, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(b, hkv, length, d, device=device, dtype=dtype, generator=g)
        base_ms = None
        dense_ms = {}  # SDPA and flash-attn compute every head whatever is off: timed once per length
        for off in (float(x) for x in args.off.split(",")):
            keep = benchlib.keep_bitmap(b, hq, off, device)
            flops = 4 * d * (length * (length + 1) // 2) * int(keep.sum())
            want = None
            for name, (prep, run) in providers(args.providers.split(","), keep, hq, hkv).items():
                if name == "sdpa-math" and length > args.math_max_len:
                    continue
                try:
                    a = prep(q, k, v)
                    got = run(a)
                    dense = name.startswith("sdpa-") or name == "flash-attn"
                    if dense and name in dense_ms:
                        ms = dense_ms[name]
                    else:
                        ms = benchlib.median_ms(lambda: run(a))
                        if dense:
                            dense_ms[name] = ms
                except (RuntimeError, torch.OutOfMemoryError) as e:  # a backend that does not take this shape
                    print(f"{name} L={length} off={off}: skipped ({str(e).splitlines()[0][:90]})")
                    torch.cuda.empty_cache() if device.type == "cuda" else None
                    continue
                if want is None:
                    want = got.float()
                diff = (got.float() - want).abs().max().item()
                if name == "retmask" and off == 0:
                    base_ms = ms
                rows.append(dict(st, kernel="prefill", provider=name, length=length, batch=b, hq=hq, hkv=hkv,
                                 dim=d, dtype=args.dtype, off=off, ms=f"{ms:.4f}",
                                 tflops=f"{flops / (ms * 1e-3) / 1e12:.1f}" if flops else "",
                                 vs_none_off=f"{ms / base_ms:.3f}" if name == "retmask" and base_ms else "",
                                 max_diff=f"{diff:.2e}"))
                del got
    benchlib.plot(rows, "length", "tflops", "provider", args.out.with_suffix(".png"),
                  f"Causal prefill, {hq}/{hkv} heads, D {d}, {args.dtype} on {st['device']}", facet="off",
                  ylabel="TFLOP/s (useful)")
    print(f"\nwrote {len(rows)} rows to {args.out}\n")
    print(benchlib.table(rows, ["provider", "length", "batch", "off", "ms", "tflops", "vs_none_off", "max_diff"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
