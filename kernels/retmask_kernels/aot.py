"""Compile the Triton kernels for a CUDA architecture on a machine without a GPU (ahead of time).

The interpreter that runs the kernels on CPU never lowers them to PTX, so an error of the GPU
compiler (a type or layout the backend rejects, a Triton version's API change) would first show on
a GPU. `compile_all(arch)` lowers every kernel with the arguments and constexprs its launcher uses
(bf16 with head dim 128 and every feature on and off, fp16 / 64 and fp32 / 32 with all on, every
autotune config of the prefill kernel; the decode split kernels also over paged caches at several block
sizes) through Triton's own compiler and the bundled `ptxas`, and
returns one record per variant. A variant whose shared memory exceeds the architecture's limit
fails, as its launch would; an autotune config over it is only `pruned` (the autotuner skips it),
unless no config of its variant fits.

The pointers and strides are compiled as 16-aligned, the specialization Triton's launcher gives
the contiguous tensors the kernels get, so the lowering is close to the one a GPU runs: shared
memory includes the pipeline's buffers, and each record says how many of the kernel's loops load
asynchronously (software-pipelined): all of them for the prefill and split kernels.

    TRITON_INTERPRET=0 python -m retmask.kernels.aot        # sm_90 (H100/H200) and sm_80 (A100)
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import attention, decode, sampling

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
    loops: int = 0  # scf.for loops of the lowered kernel
    pipelined_loops: int = 0  # of them, loops whose body loads asynchronously (software-pipelined)
    registers: int | None = None  # per thread, from the machine code (None: no cuobjdump to read it)
    stack_bytes: int | None = None  # per thread; above 0 the kernel spills registers
    pruned: bool = False  # an autotune config over the shared-memory limit: skipped by the autotuner, not a failure

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("prune" if self.pruned else "FAIL")


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


def _aligned(fn, pointers) -> dict:
    """Triton's launcher specialization for 16-byte-aligned pointers and strides divisible by 16."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if name in pointers or name.startswith("stride_")}


_ASYNC = re.compile(r"async_copy_global_to_local|async_tma_copy_global_to_local|descriptor_load")


def _compile(fn, pointers, constexprs, arch, num_warps, num_stages, label, tuned=False) -> Compiled:
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} is not a compiled Triton function (TRITON_INTERPRET=1 "
                           "was set when triton was imported); run the check with TRITON_INTERPRET=0")
    t = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=_signature(fn, pointers, constexprs), constexprs=constexprs,
                        attrs=_aligned(fn, pointers))
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages))
        shared = int(k.metadata.shared)
        ttgir = k.asm.get("ttgir", "")
        loops, piped = _loops(ttgir)
        limit = SHARED_LIMIT.get(arch)
        if limit is not None and shared > limit:  # the launch would fail with "out of resources"
            return Compiled(fn.__name__, label, arch, False, time.perf_counter() - t,
                            f"needs {shared} bytes of shared memory, sm_{arch} has {limit}", shared, pruned=tuned)
        regs, stack = _resources(k.asm.get("cubin"))
        return Compiled(fn.__name__, label, arch, True, time.perf_counter() - t, shared_bytes=shared,
                        loops=loops, pipelined_loops=piped, registers=regs, stack_bytes=stack)
    except Exception as e:  # noqa: BLE001  (reported per variant)
        chain = [e]
        while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:  # the innermost error says why
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        why = "\n".join(f"{type(x).__name__}: {x}" for x in chain[::-1][:2])
        return Compiled(fn.__name__, label, arch, False, time.perf_counter() - t, why)


def _loops(ttgir: str) -> tuple[int, int]:
    """(loops, loops whose body holds an asynchronous load) of a TTGIR module, by brace matching."""
    lines = ttgir.splitlines()
    loops = piped = 0
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        loops += 1
        depth = 0
        for body in lines[i:]:
            depth += body.count("{") - body.count("}")
            if _ASYNC.search(body):
                piped += 1
                break
            if depth <= 0:
                break
    return loops, piped


def _resources(cubin: bytes | None) -> tuple[int | None, int | None]:
    """(registers, stack bytes) per thread of a compiled kernel, read by the cuobjdump Triton ships."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cubin or not tool.exists():
        return None, None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _prefill_variants():
    cfgs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in attention._configs()]
    for dt, d in (("bf16", 128), ("fp16", 64), ("fp32", 32)):
        # the engine's path (bitmap, ragged lengths), with a sliding window (OLMo-3), and bare
        for keep, lens, window in ((True, True, False), (True, True, True), (False, False, False)):
            if dt != "bf16" and (keep, window) == (True, False):
                continue
            family = f"{dt} D{d} keep={keep} lens={lens} window={window}"
            for bm, bn, w, s in (cfgs if (dt, keep) == ("bf16", True) else cfgs[:1]):
                io = _FLOAT[dt]
                ptr = dict(Q=io, K=io, V=io, Out=io, KEEP="*u8" if keep else io, LENS="*i32" if lens else io)
                ce = dict(HAS_KEEP=keep, HAS_LENS=lens, HAS_WINDOW=window, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d,
                          EVEN_D=True, PREC="ieee" if dt == "fp32" else "tf32")
                yield attention._attn_fwd, ptr, ce, w, s, f"{family} M{bm} N{bn} w{w} s{s}", family


def _decode_variants():
    block_n, warps = 64, 4
    for dt, d, gqa in (("bf16", 128, 4), ("fp16", 64, 2), ("fp32", 32, 2)):
        io = _FLOAT[dt]
        prec = "ieee" if dt == "fp32" else "tf32"
        # contiguous caches (bs 0): every feature on and off; paged caches: every feature on at each block
        # size, and the engine's paths (no bitmap, no argmax) at one
        paged = [(True, shared, True, bs) for bs in ((16, 64, 256) if dt == "bf16" else (16,))
                 for shared in (True, False)]
        if dt == "bf16":
            paged += [(False, shared, False, 16) for shared in (True, False)]
        for argmax, shared, keep, bs in [(*c, 0) for c in itertools.product((True, False), repeat=3)] + paged:
            if dt != "bf16" and not (argmax and shared and keep):
                continue
            part = dict(PM="*fp32", PL="*fp32", PACC="*fp32", PBEST="*fp32",
                        PPOS="*i32" if argmax else "*fp32")
            keep_p = "*u8" if keep else io
            table_p = "*i32"  # the block tables; with contiguous caches a placeholder never read (the lengths)
            flags = dict(HAS_KEEP=keep, HAS_WINDOW=not keep, ARGMAX=argmax, BLOCK_D=d, EVEN_D=True)
            paging = dict(PAGED=bs > 0, BS=max(bs, 1))
            label = f"{dt} D{d} gqa{gqa} argmax={argmax} shared={shared} keep={keep}"
            label += f" paged Bs{bs}" if bs else ""
            if shared:
                for group_max in ((1, 2, 8) if not bs else (1, 8) if dt == "bf16" else (2,)):
                    ptr = dict(Q=io, SK=io, SV=io, SHLENS="*i32", LENS="*i32", KEEP=keep_p, STARTS="*i32",
                               COUNTS="*i32", ORDER="*i32", TABLE=table_p, **part)
                    ce = dict(flags, **paging, GROUP_MAX=group_max, GQ_P=gqa, M=max(16, group_max * gqa),
                              BLOCK_N=block_n, PREC=prec)
                    yield decode._shared_split, ptr, ce, warps, 3, f"{label} group_max={group_max}", None
            ptr = dict(Q=io, K=io, V=io, LENS="*i32", KEEP=keep_p, SEG="*i32", SHLENS="*i32", TABLE=table_p, **part)
            ce = dict(flags, **paging, HAS_SHARED=shared, M=max(16, gqa), BLOCK_N=block_n, PREC=prec)
            yield decode._private_split, ptr, ce, warps, 3, label, None
            if bs:  # the combine step reads only the partial results: the same kernel for both modes
                continue
            ptr = dict(Out=io, OPOS="*i64" if argmax else io, OSCORE="*fp32" if argmax else io, LENS="*i32",
                       KEEP=keep_p, SEG="*i32", SHLENS="*i32", **part)
            ce = dict(flags, HAS_SHARED=shared)
            yield decode._combine, ptr, ce, 1 if d <= 64 else 2, 3, label, None


def _sampling_variants():
    for dt in ("bf16", "fp16", "fp32"):
        for floor in (False, True):
            ptr = dict(LOGITS=_FLOAT[dt], SEED="*i64", STEP="*i64", FLOOR="*fp64", INV_T="*fp64", BEST="*fp64",
                       IDX="*i32")
            yield (sampling._gumbel_split, ptr, dict(HAS_FLOOR=floor, BLOCK=1024), 4, 3, f"{dt} floor={floor}",
                   None)


def compile_all(arch: int = 90, progress=None) -> list[Compiled]:
    """Compile every kernel variant for `arch` (90: Hopper, 80: Ampere); one record per variant. An
    autotune config over the shared-memory limit is pruned; if every config of a variant is, the
    last one fails (the autotuner would have nothing to launch)."""
    out = []
    families: dict[str, list[Compiled]] = {}
    for fn, ptr, ce, w, s, label, family in itertools.chain(_prefill_variants(), _decode_variants(),
                                                                   _sampling_variants()):
        r = _compile(fn, ptr, ce, arch, w, s, label, tuned=family is not None)
        if family is not None:
            families.setdefault(family, []).append(r)
        out.append(r)
        if progress:
            progress(r)
    for family, rs in families.items():
        if not any(r.ok for r in rs) and rs[-1].pruned:
            rs[-1].pruned = False
            rs[-1].error += f"; no autotune config of {family} fits"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retmask.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("archs", nargs="*", type=int, metavar="ARCH",
                    help="compute capabilities to compile for, e.g. 90 (H100/H200) 80 (A100); default: 90 80")
    archs = ap.parse_args(argv).archs or [90, 80]
    print(f"triton {triton.__version__}: compiling retmask's kernels for sm_{', sm_'.join(map(str, archs))}")
    failed = 0
    for arch in archs:
        for r in compile_all(arch):
            failed += r.status == "FAIL"
            regs = f"{r.registers} registers, {r.stack_bytes} B stack, " if r.registers is not None else ""
            print(f"{r.status:4s} sm_{r.arch} {r.kernel:15s} {r.variant} "
                  f"({r.shared_bytes // 1024} KiB shared, {regs}{r.pipelined_loops}/{r.loops} loops pipelined, "
                  f"{r.seconds:.1f} s)"
                  + (f"\n      {r.error[:2000]}" if r.error else ""))
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
