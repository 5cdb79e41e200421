"""Decode attention: retmask's split-K kernel beside torch SDPA, FlexAttention and flash-attn.

Sweep 1 (`length`): one new query per row over a KV cache of 4K-128K tokens (batch = tokens //
length, so every length fills the GPU), 0 / 50 / 100 % of heads off, with and without the per-head
argmax. GB/s counts the K/V bytes that must be read: KV heads whose query heads are all off are
not counted, so baselines that cannot skip them pay for them.
Sweep 2 (`shared`): groups of 1, 2 and 4 rows over one shared segment (the prompt) plus 64 private
tokens each: the shared tiles are read once per group, so 4 rows should cost little more than 1.
Also a 4-row group stored without sharing (each row its own copy of the prompt) for contrast.
Sweep 3 (`sampling`): the sampler of a decode step over Llama-3's 128256-token vocabulary at 1 to
512 rows (temperature 0.6, the paper's): the fused Gumbel-max kernel beside the PyTorch reference
(the (B, V) float64 noise materialized), same tokens. GB/s counts the logits read once.

    python benchmarks/bench_decode.py
    TRITON_INTERPRET=1 python benchmarks/bench_decode.py --tiny --out runs/bench/decode.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import benchlib
from retmask.kernels import gumbel_argmax_reference, masked_decode, masked_decode_reference, segment_layout
from retmask.kernels.sampling import gumbel_argmax_triton


def kv_bytes(keep: torch.Tensor, hkv: int, length: int, d: int, elt: int) -> int:
    """K and V bytes of the KV heads that have at least one query head on."""
    b, hq = keep.shape
    live = keep.view(b, hkv, hq // hkv).any(-1).sum().item()
    return 2 * int(live) * length * d * elt


def providers(names, keep, hq, hkv):
    zero = ~keep[:, :, None]  # (B, Hq, 1)
    off_any = bool(zero.any())

    def zeroed(o):
        return o.masked_fill(zero, 0.0) if off_any else o

    out = {}
    for name in names:
        if name in ("retmask", "retmask+argmax"):
            am = name.endswith("argmax")
            out[name] = (lambda q, k, v, n: (q, k, v, n),
                         lambda a, am=am: masked_decode(*a, keep, return_argmax=am, check_values=False))
        elif name == "reference":
            out[name] = (lambda q, k, v, n: (q, k, v, n), lambda a: masked_decode_reference(*a, keep))
        elif name.startswith("sdpa-"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                           "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[name[5:]])

            def prep(q, k, v, n, backend=backend):
                q4 = q[:, :, None]  # (B, Hq, 1, D)
                try:
                    with sdpa_kernel(backend):
                        F.scaled_dot_product_attention(q4, k[:, :, :16], v[:, :, :16], enable_gqa=True)
                    return q4, k, v, True
                except RuntimeError:
                    g = hq // hkv
                    return q4, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), False

            def run(a, backend=backend):
                with sdpa_kernel(backend):
                    return zeroed(F.scaled_dot_product_attention(a[0], a[1], a[2], enable_gqa=a[3])[:, :, 0])

            out[name] = (prep, run)
        elif name == "flex":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            compiled = torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention

            def prep(q, k, v, n):
                bm = create_block_mask(lambda b, h, qi, ki: keep[b, h] & (ki >= 0), q.shape[0], hq, 1, k.shape[2],
                                       device=q.device)
                return q[:, :, None], k, v, bm

            out[name] = (prep, lambda a: compiled(a[0], a[1], a[2], block_mask=a[3], enable_gqa=True)[:, :, 0])
        elif name == "flash-attn":
            try:
                from flash_attn import flash_attn_with_kvcache
            except ImportError:
                continue

            def prep(q, k, v, n):
                return q[:, None], k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), n.to(torch.int32)

            out[name] = (prep, lambda a: zeroed(flash_attn_with_kvcache(a[0], a[1], a[2], cache_seqlens=a[3])[:, 0]))
        else:
            raise SystemExit(f"--providers: unknown provider {name!r}")
    return out


def sweep_lengths(args, device, dtype, hq, hkv, d, st, copy_gbs, rows):
    elt = torch.finfo(dtype).bits // 8
    dense_ms = {}
    for length in (int(x) for x in args.lengths.split(",")):
        b = max(1, args.tokens // length)
        g = torch.Generator(device=device).manual_seed(length)
        q = torch.randn(b, hq, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(b, hkv, length, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(b, hkv, length, d, device=device, dtype=dtype, generator=g)
        n = torch.full((b,), length, device=device, dtype=torch.int32)
        for off in (float(x) for x in args.off.split(",")):
            keep = benchlib.keep_bitmap(b, hq, off, device)
            nbytes = kv_bytes(keep, hkv, length, d, elt)
            want, plain_ms = None, None
            for name, (prep, run) in providers(args.providers.split(","), keep, hq, hkv).items():
                try:
                    a = prep(q, k, v, n)
                    got = run(a)
                    dense = name.startswith("sdpa-") or name == "flash-attn"  # reads every head: timed once
                    if dense and (name, length) in dense_ms:
                        ms = dense_ms[name, length]
                    else:
                        ms = benchlib.median_ms(lambda: run(a))
                        if dense:
                            dense_ms[name, length] = ms
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    print(f"{name} L={length} off={off}: skipped ({str(e).splitlines()[0][:90]})")
                    continue
                got = got[0] if isinstance(got, tuple) else got
                want = got.float() if want is None else want
                plain_ms = ms if name == "retmask" else plain_ms
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(st, sweep="length", provider=name, length=length, batch=b, rows_per_group="",
                                 hq=hq, hkv=hkv, dim=d, dtype=args.dtype, off=off, ms=f"{ms:.4f}",
                                 gbs=f"{gbs:.0f}" if nbytes else "",
                                 pct_copy=f"{100 * gbs / copy_gbs:.0f}" if nbytes else "",
                                 ratio=f"{ms / plain_ms:.3f}" if name == "retmask+argmax" and plain_ms else "",
                                 max_diff=f"{(got.float() - want).abs().max().item():.2e}"))
    return rows


def sweep_shared(args, device, dtype, hq, hkv, d, st, copy_gbs, rows):
    """Groups of R rows on one shared segment of `length` keys (+ `private` keys each)."""
    elt = torch.finfo(dtype).bits // 8
    priv = args.private
    for length in (int(x) for x in args.shared_lengths.split(",")):
        g = torch.Generator(device=device).manual_seed(length)
        sk = torch.randn(1, hkv, length, d, device=device, dtype=dtype, generator=g)
        sv = torch.randn(1, hkv, length, d, device=device, dtype=dtype, generator=g)
        base = None
        for r in (1, 2, 4):
            q = torch.randn(r, hq, d, device=device, dtype=dtype, generator=g)
            kc = torch.randn(r, hkv, priv, d, device=device, dtype=dtype, generator=g)
            vc = torch.randn(r, hkv, priv, d, device=device, dtype=dtype, generator=g)
            n = torch.full((r,), priv, device=device, dtype=torch.int32)
            seg = torch.zeros(r, dtype=torch.int32, device=device)
            shared = dict(shared_k=sk, shared_v=sv, shared_lens=torch.tensor([length], device=device), row_seg=seg,
                          max_group_rows=r, seg_layout=segment_layout(seg, 1))  # as the engine passes it

            def run(q=q, kc=kc, vc=vc, n=n, shared=shared):
                return masked_decode(q, kc, vc, n, return_argmax=True, check_values=False, **shared)

            run()
            ms = benchlib.median_ms(run, graph=True)  # a 32K segment reads in tens of us: time the kernels
            base = ms if r == 1 else base
            nbytes = 2 * hkv * (length + r * priv) * d * elt
            rows.append(dict(st, sweep="shared", provider="retmask+argmax", length=length, batch=r, rows_per_group=r,
                             hq=hq, hkv=hkv, dim=d, dtype=args.dtype, off=0.0, ms=f"{ms:.4f}",
                             gbs=f"{nbytes / (ms * 1e-3) / 1e9:.0f}",
                             pct_copy=f"{100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbs:.0f}",
                             ratio=f"{ms / base:.3f}", max_diff=""))
        # the same 4 rows without sharing: each row holds its own copy of the prompt
        r = 4
        kc = torch.cat([sk.expand(r, -1, -1, -1), torch.randn(r, hkv, priv, d, device=device, dtype=dtype)], 2)
        vc = torch.cat([sv.expand(r, -1, -1, -1), torch.randn(r, hkv, priv, d, device=device, dtype=dtype)], 2)
        q = torch.randn(r, hq, d, device=device, dtype=dtype)
        n = torch.full((r,), length + priv, device=device, dtype=torch.int32)
        ms = benchlib.median_ms(  # the tensors bound as defaults: the names are deleted below
            lambda q=q, kc=kc, vc=vc, n=n: masked_decode(q, kc, vc, n, return_argmax=True, check_values=False),
            graph=True)
        rows.append(dict(st, sweep="shared", provider="retmask+argmax, unshared copies", length=length, batch=r,
                         rows_per_group=r, hq=hq, hkv=hkv, dim=d, dtype=args.dtype, off=0.0, ms=f"{ms:.4f}",
                         gbs="", pct_copy="", ratio=f"{ms / base:.3f}", max_diff=""))
        del kc, vc
    return rows


def sweep_sampling(args, device, dtype, st, copy_gbs, rows):
    """The sampler of one decode step: fused kernel vs reference, rows x vocabulary logits."""
    v = args.vocab
    inv_t = 1 / 0.6
    for b in (int(x) for x in args.sample_rows.split(",")):
        g = torch.Generator(device=device).manual_seed(b)
        logits = torch.randn(b, v, device=device, dtype=dtype, generator=g) * 4
        seeds = torch.arange(b, device=device) * 7919 + 1
        steps = torch.full((b,), 100, device=device)
        nbytes = logits.numel() * logits.element_size()
        want = base = None
        for name, fn in (("torch reference", gumbel_argmax_reference), ("retmask fused", gumbel_argmax_triton)):
            got = fn(logits, seeds, steps, inv_t)
            want = got if want is None else want  # the reference's tokens
            ms = benchlib.median_ms(lambda fn=fn: fn(logits, seeds, steps, inv_t))
            base = ms if base is None else base
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append(dict(st, sweep="sampling", provider=name, length=v, batch=b, rows_per_group="", hq="",
                             hkv="", dim="", dtype=args.dtype, off=0.0, ms=f"{ms:.4f}", gbs=f"{gbs:.0f}",
                             pct_copy=f"{100 * gbs / copy_gbs:.0f}", ratio=f"{ms / base:.3f}",
                             max_diff=f"{(got != want).float().mean().item():.3f}"))  # share of tokens that differ
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--shared-lengths", default="32768,131072")
    ap.add_argument("--private", type=int, default=64, help="private keys per row in the shared sweep")
    ap.add_argument("--off", default="0,0.5,1")
    ap.add_argument("--vocab", type=int, default=128256, help="vocabulary of the sampling sweep")
    ap.add_argument("--sample-rows", default="1,16,128,512", help="rows of the sampling sweep")
    ap.add_argument("--tokens", type=int, default=131072, help="batch = max(1, tokens // length)")
    ap.add_argument("--heads", default="32,8")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--providers",
                    default="retmask,retmask+argmax,sdpa-flash,sdpa-efficient,sdpa-cudnn,sdpa-math,flex,flash-attn")
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS / "decode.csv")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, interpreter, fp32")
    args = ap.parse_args(argv)
    device = benchlib.resolve_mode(args, "decode", dict(
        lengths="64,160", shared_lengths="96", private=8, tokens=160, heads="8,2", dim=32, dtype="float32",
        vocab=300, sample_rows="1,3",
        providers="retmask,retmask+argmax,reference,sdpa-math,flex"))
    if device is None:
        return 2
    dtype = getattr(torch, args.dtype)
    hq, hkv = (int(x) for x in args.heads.split(","))
    st = benchlib.stamp()
    copy_gbs = benchlib.copy_bandwidth_gbs(device)
    print(f"measured copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    rows = benchlib.RowLog(args.out, {"copy_gbs": f"{copy_gbs:.0f}"})  # each row is saved as it is measured
    sweep_lengths(args, device, dtype, hq, hkv, args.dim, st, copy_gbs, rows)
    sweep_shared(args, device, dtype, hq, hkv, args.dim, st, copy_gbs, rows)
    sweep_sampling(args, device, dtype, st, copy_gbs, rows)
    benchlib.plot([r for r in rows if r["sweep"] == "length"], "length", "gbs", "provider",
                  args.out.with_suffix(".png"),
                  f"Decode, {hq}/{hkv} heads, D {args.dim}, {args.dtype} on {st['device']}", facet="off",
                  ylabel="GB/s of K/V read", hline=copy_gbs, hline_label="copy bandwidth")
    print(f"\nwrote {len(rows)} rows to {args.out}\n")
    print(benchlib.table(rows, ["sweep", "provider", "length", "batch", "off", "ms", "gbs", "pct_copy", "ratio",
                                "max_diff"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
