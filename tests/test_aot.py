"""Every Triton kernel lowers to Hopper machine code (PTX through ptxas) on a machine with no GPU.

The interpreter that runs the kernels on CPU never compiles them; this catches what only the GPU
compiler rejects (it once caught a plain-float global read inside a jit function). The checks run
in a subprocess with TRITON_INTERPRET=0, since under the interpreter `triton.jit` compiles nothing."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import triton

_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not (_PTXAS.exists() or os.environ.get("TRITON_PTXAS_PATH") or shutil.which("ptxas")),
                                reason="no ptxas: this Triton build ships no NVIDIA backend binaries")

BAD_KERNEL = textwrap.dedent('''
    import triton, triton.language as tl
    from retmask.kernels import aot

    SCALE = 2.0  # a plain global: the interpreter reads it, the GPU compiler refuses it

    @triton.jit
    def bad(X, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs, mask=offs < n) * SCALE, mask=offs < n)

    r = aot._compile(bad, {"X": "*fp32"}, {"BLOCK": 16}, 90, 4, 3, "bad")
    print("ok" if r.ok else r.error.replace(chr(10), " | "))
    fn, ptr, ce, w, s, label, _ = next(aot._decode_variants())
    aot.SHARED_LIMIT[90] = 1024  # a kernel over the architecture's shared memory fails like its launch would
    r = aot._compile(fn, ptr, ce, 90, w, s, label)
    print("ok" if r.ok else r.error.replace(chr(10), " | "))
    # autotune configs over it are pruned; when all of a variant's are, the variant fails
    two = list(aot._prefill_variants())[:2]
    aot._prefill_variants, aot._decode_variants = (lambda: iter(two)), (lambda: iter(()))
    aot._sampling_variants = lambda: iter(())
    print(" ".join(r.status for r in aot.compile_all(90)))
''')


def _python(*args):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)


def test_the_check_catches_a_kernel_the_gpu_compiler_rejects(tmp_path):
    (tmp_path / "bad_kernel.py").write_text(BAD_KERNEL)  # triton.jit reads the source from a file
    p = _python(str(tmp_path / "bad_kernel.py"))
    assert p.returncode == 0, p.stderr[-2000:]
    glob, shared, tuned = p.stdout.strip().splitlines()[-3:]
    assert "global variable" in glob
    assert shared.startswith("needs ") and "bytes of shared memory, sm_90 has 1024" in shared
    assert tuned == "prune FAIL"


def test_every_kernel_variant_compiles_for_sm90():
    p = _python("-m", "retmask.kernels.aot", "90")
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and lines[-1] == "0 failed", p.stdout[-4000:] + p.stderr[-2000:]
    compiled = [ln for ln in lines if ln.startswith("ok   sm_90")]
    assert {ln.split()[2] for ln in compiled} == {"_attn_fwd", "_shared_split", "_private_split", "_combine",
                                                  "_gumbel_split"}
    assert len(compiled) >= 40
    # lowered as a GPU launch specializes them, the key loops of the prefill and decode kernels load
    # K/V asynchronously (software-pipelined); a change that serializes them would show 0 here
    for ln in compiled:
        piped, loops = map(int, re.search(r"(\d+)/(\d+) loops pipelined", ln).groups())
        if ln.split()[2] == "_combine":  # scalar merges: nothing to pipeline
            assert piped == 0, ln
        elif ln.split()[2] == "_gumbel_split":  # float64 math per logit, not loads, bounds the sampler
            assert loops == 1, ln
        else:  # every key loop (2 stages, 3 with a window edge; 1 per split) loads asynchronously
            assert piped == loops == (1 if "split" in ln else 3 if "window=True" in ln else 2), ln
    assert any("keep=True lens=True window=False" in ln for ln in compiled)  # the engine's prefill path


def test_interpreted_functions_are_refused_with_the_fix(monkeypatch):
    from retmask.kernels import aot, decode

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the suite runs with TRITON_INTERPRET=0 here")
    with pytest.raises(RuntimeError, match="run the check with TRITON_INTERPRET=0"):
        aot._compile(decode._combine, {}, {}, 90, 1, 1, "x")


SAMPLER_SIGNATURE = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from retmask.kernels import aot
    for fn, ptr, ce, w, s, label, _ in aot._sampling_variants():
        src = ASTSource(fn=fn, signature=aot._signature(fn, ptr, ce), constexprs=ce, attrs=aot._aligned(fn, ptr))
        ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=w)).asm["ttir"]
        print(next(line for line in ttir.splitlines() if "tt.func" in line))
''')


def test_sampler_takes_no_float32_scalar():
    """The sampler scales logits in float64 exactly as its reference and score floors do. A Python
    float argument reaches a GPU kernel as float32 (the interpreter keeps it float64, so only the
    compiled signature shows it): the scale must come through a float64 buffer."""
    p = _python("-c", SAMPLER_SIGNATURE)
    assert p.returncode == 0, p.stderr[-2000:]
    heads = p.stdout.strip().splitlines()
    assert len(heads) == 6 and all(": f32" not in h and "f64>" in h for h in heads), heads
