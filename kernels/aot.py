"""Compile the Triton kernels for a CUDA architecture on a machine without a GPU (ahead of time).

The interpreter that runs the kernels on CPU never lowers them to PTX, so an error of the GPU
compiler (a type or layout the backend rejects, a Triton version's API change) would first show on
a GPU. `compile_all(arch)` lowers every kernel with the arguments and constexprs its launcher uses
(bf16 with head dim 128 and every feature on and off, fp16 / 64 and fp32 / 32 with all on, every
autotune config of the prefill kernel) through Triton's own compiler and the bundled `ptxas`, and returns one record per variant (a
variant whose shared memory exceeds the architecture's limit fails too: its launch would).

    TRITON_INTERPRET=0 python -m retmask.kernels.aot        # sm_90 (H100/H200) and sm_80 (A100)
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import attention, decode

_FLOAT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass
class Compiled:
    kernel: str
    variant: str
    arch: int
    ok: bool
    seconds: float
    error: str = ""
    shared_bytes: int = 0  # shared memory per program


# largest dynamic shared memory per block (bytes): H100/H200 and A100
SHARED_LIMIT = {90: 232448, 80: 166912}


def _signature(fn, pointers: dict[str, str], constexprs: dict, floats=("qk_scale", "sm_scale")) -> dict[str, str]:
    """Triton signature of `fn`: pointer arguments by name, float scalars, the rest int32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _compile(fn, pointers, constexprs, arch, num_warps, num_stages, label) -> Compiled:
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} is not a compiled Triton function (TRITON_INTERPRET=1 "
                           "was set when triton was imported); run the check with TRITON_INTERPRET=0")
    t = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=_signature(fn, pointers, constexprs), constexprs=constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages))
        shared = int(k.metadata.shared)
        limit = SHARED_LIMIT.get(arch)
        if limit is not None and shared > limit:  # the launch would fail with "out of resources"
            return Compiled(fn.__name__, label, arch, False, time.perf_counter() - t,
                            f"needs {shared} bytes of shared memory, sm_{arch} has {limit}", shared)
        return Compiled(fn.__name__, label, arch, True, time.perf_counter() - t, shared_bytes=shared)
    except Exception as e:  # noqa: BLE001  (reported per variant)
        chain = [e]
        while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:  # the innermost error says why
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        why = "\n".join(f"{type(x).__name__}: {x}" for x in chain[::-1][:2])
        return Compiled(fn.__name__, label, arch, False, time.perf_counter() - t, why)


def _prefill_variants():
    cfgs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in attention._configs()]
    for dt, d in (("bf16", 128), ("fp16", 64), ("fp32", 32)):
        for keep, lens, window in ((True, True, True), (False, False, False)):
            for bm, bn, w, s in (cfgs if (dt, keep) == ("bf16", True) else cfgs[:1]):
                io = _FLOAT[dt]
                ptr = dict(Q=io, K=io, V=io, O=io, KEEP="*u8" if keep else io, LENS="*i32" if lens else io)
                ce = dict(HAS_KEEP=keep, HAS_LENS=lens, HAS_WINDOW=window, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d,
                          EVEN_D=True, PREC="ieee" if dt == "fp32" else "tf32")
                yield (attention._attn_fwd, ptr, ce, w, s,
                       f"{dt} D{d} keep={keep} lens={lens} window={window} M{bm} N{bn} w{w} s{s}")


def _decode_variants():
    block_n, warps = 64, 4
    for dt, d, gqa in (("bf16", 128, 4), ("fp16", 64, 2), ("fp32", 32, 2)):
        io = _FLOAT[dt]
        prec = "ieee" if dt == "fp32" else "tf32"
        for argmax, shared, keep in itertools.product((True, False), (True, False), (True, False)):
            if dt != "bf16" and not (argmax and shared and keep):
                continue
            part = dict(PM="*fp32", PL="*fp32", PACC="*fp32", PBEST="*fp32",
                        PPOS="*i32" if argmax else "*fp32")
            keep_p = "*u8" if keep else io
            flags = dict(HAS_KEEP=keep, HAS_WINDOW=not keep, ARGMAX=argmax, BLOCK_D=d, EVEN_D=True)
            label = f"{dt} D{d} gqa{gqa} argmax={argmax} shared={shared} keep={keep}"
            if shared:
                for group_max in (1, 2, 8):
                    ptr = dict(Q=io, SK=io, SV=io, SHLENS="*i32", LENS="*i32", KEEP=keep_p, STARTS="*i32",
                               COUNTS="*i32", ORDER="*i32", **part)
                    ce = dict(flags, GROUP_MAX=group_max, GQ_P=gqa, M=max(16, group_max * gqa), BLOCK_N=block_n,
                              PREC=prec)
                    yield decode._shared_split, ptr, ce, warps, 3, f"{label} group_max={group_max}"
            ptr = dict(Q=io, K=io, V=io, LENS="*i32", KEEP=keep_p, SEG="*i32", SHLENS="*i32", **part)
            ce = dict(flags, HAS_SHARED=shared, M=max(16, gqa), BLOCK_N=block_n, PREC=prec)
            yield decode._private_split, ptr, ce, warps, 3, label
            ptr = dict(O=io, OPOS="*i64" if argmax else io, OSCORE="*fp32" if argmax else io, LENS="*i32",
                       KEEP=keep_p, SEG="*i32", SHLENS="*i32", **part)
            ce = dict(flags, HAS_SHARED=shared)
            yield decode._combine, ptr, ce, 1 if d <= 64 else 2, 3, label


def compile_all(arch: int = 90, progress=None) -> list[Compiled]:
    """Compile every kernel variant for `arch` (90: Hopper, 80: Ampere); one record per variant."""
    out = []
    for fn, ptr, ce, w, s, label in itertools.chain(_prefill_variants(), _decode_variants()):
        out.append(_compile(fn, ptr, ce, arch, w, s, label))
        if progress:
            progress(out[-1])
    return out


def main(argv=None) -> int:
    archs = [int(a) for a in (argv if argv is not None else sys.argv[1:])] or [90, 80]
    print(f"triton {triton.__version__}: compiling retmask's kernels for sm_{', sm_'.join(map(str, archs))}")
    failed = 0
    for arch in archs:
        for r in compile_all(arch):
            failed += not r.ok
            print(f"{'ok  ' if r.ok else 'FAIL'} sm_{r.arch} {r.kernel:15s} {r.variant} "
                  f"({r.shared_bytes // 1024} KiB shared, {r.seconds:.1f} s)"
                  + (f"\n     {r.error[:2000]}" if r.error else ""))
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
