"""Run each kernel against its PyTorch reference on a few model-shaped cases and print a table.

On a CUDA machine the Triton kernels run on the GPU; on a CPU they run in Triton's interpreter
(`TRITON_INTERPRET=1`, which `make demo` sets). Exits non-zero if any case disagrees.
"""

from __future__ import annotations

import os
import time

import torch
from tabulate import tabulate

from retmask.kernels import masked_attention_reference, masked_decode_reference

TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t) * 1e3


def _cases(device, dtype, g):
    def r(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    b, hq, hkv, s, d = 2, 8, 2, 128, 64
    q, k, v = r(b, hq, s, d), r(b, hkv, s, d), r(b, hkv, s, d)
    half = torch.rand(b, hq, generator=g).argsort(1).to(device) < hq // 2  # (B, Hq): half the heads on
    none = torch.zeros(b, hq, dtype=torch.bool, device=device)
    lens = torch.tensor([128, 77], device=device)
    yield "prefill", "128 tokens, GQA 4", "0 %", dict(args=(q, k, v))
    yield "prefill", "128 tokens, GQA 4", "50 %", dict(args=(q, k, v, half))
    yield "prefill", "128 tokens, GQA 4", "100 %", dict(args=(q, k, v, none))
    yield "prefill", "window 32, ragged", "50 %", dict(args=(q, k, v, half), kw=dict(kv_lens=lens, window=32))
    yield "prefill", "chunk of 17 over a cache", "50 %", dict(args=(q[:, :, -17:], k, v, half), kw=dict(kv_lens=lens))
    bd, smax = 4, 200
    qd, kc, vc = r(bd, hq, d), r(bd, hkv, smax, d), r(bd, hkv, smax, d)
    dl = torch.tensor([200, 1, 63, 130], device=device)
    keep = torch.rand(bd, hq, generator=g).to(device) < 0.5
    kw = dict(return_argmax=True)
    yield "decode", "ragged cache + argmax", "0 %", dict(args=(qd, kc, vc, dl), kw=kw)
    yield "decode", "ragged cache + argmax", "~50 %", dict(args=(qd, kc, vc, dl, keep), kw=kw)
    shared = dict(shared_k=r(2, hkv, 150, d), shared_v=r(2, hkv, 150, d),
                  shared_lens=torch.tensor([150, 90], device=device), row_seg=torch.tensor([0, 0, 1, 1], device=device))
    yield "decode", "2 pairs on shared prompts", "~50 %", dict(args=(qd, kc, vc, dl, keep), kw=dict(kw, **shared))


def run(seed: int = 0) -> int:
    on_gpu = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    device = torch.device("cuda" if on_gpu and not interp else "cpu")
    if device.type == "cpu" and not interp:
        print("No GPU and TRITON_INTERPRET is not set: nothing to compare the references with.")
        print("Run `TRITON_INTERPRET=1 retmask check-kernels` (what `make demo` does).")
        return 1
    from retmask.kernels.attention import masked_attention_triton
    from retmask.kernels.decode import masked_decode_triton

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    g = torch.Generator().manual_seed(seed)
    rows, bad = [], 0
    for kernel, case, off, c in _cases(device, dtype, g):
        args, kw = c["args"], c.get("kw", {})
        tri, ref = (masked_attention_triton, masked_attention_reference) if kernel == "prefill" else (
            masked_decode_triton, masked_decode_reference)
        got, t_tri = _timed(lambda: tri(*args, **kw))
        want, t_ref = _timed(lambda: ref(*args, **kw))
        agree = ""
        if isinstance(got, tuple):
            agree = f"{(got[1] == want[1]).float().mean().item() * 100:.0f} %"
            got, want = got[0], want[0]
        diff = (got.float() - want.float()).abs().max().item()
        ok = diff <= TOL[dtype] and torch.isfinite(got).all().item()
        bad += not ok
        rows.append([kernel, case, off, f"{diff:.1e}", agree, f"{t_tri:.1f}", f"{t_ref:.1f}", "ok" if ok else "FAIL"])
    where = f"Triton on {torch.cuda.get_device_name()}" if device.type == "cuda" else "Triton interpreter on CPU"
    print(f"Masked attention kernels vs PyTorch references ({where}, {str(dtype).split('.')[-1]})\n")
    print(tabulate(rows, headers=["kernel", "case", "heads off", "max abs diff", "argmax agree", "triton ms",
                                  "reference ms", ""], tablefmt="github", disable_numparse=True))
    print(f"\n{len(rows) - bad}/{len(rows)} cases agree.")
    return 1 if bad else 0
