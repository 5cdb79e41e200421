"""masked_attention: the Triton kernel (interpreted on CPU), the CPU backend (SDPA) and the reference against a
float64 oracle."""

import pytest
import torch

import oracle
from retmask.kernels import masked_attention, masked_attention_cpu, masked_attention_reference
from retmask.kernels.attention import masked_attention_triton

FLOOR = {torch.float16: 1e-4, torch.float32: 1e-6}
IMPLS = {"triton": masked_attention_triton, "cpu": masked_attention_cpu, "reference": masked_attention_reference}

# B, Hq, Hkv, Sq, Skv, D, keep, ragged lengths, window
CASES = [
    (1, 2, 2, 1, 1, 32, "all", False, None),
    (2, 4, 1, 17, 17, 64, "random", False, None),  # GQA 4
    (3, 8, 1, 17, 113, 32, "random", True, None),  # GQA 8, Sq < Skv, ragged
    (2, 8, 2, 113, 113, 128, "all", False, 16),  # window
    (1, 4, 4, 255, 255, 32, "random", False, None),  # GQA 1, several tiles
    (3, 4, 2, 113, 255, 64, "random", True, 40),  # window + ragged + chunk over a prefix
    (2, 4, 1, 17, 40, 80, "none", True, None),  # head dim not a power of two, every head off
    (2, 2, 2, 1, 113, 128, "random", True, 7),  # one query over a cached prefix (decode shape)
]


def make(case, dtype, seed=0):
    b, hq, hkv, sq, skv, d, keep_kind, ragged, window = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, skv, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, skv, d, generator=g).to(dtype)
    keep = {
        "all": None,
        "none": torch.zeros(b, hq, dtype=torch.bool),
        "random": torch.rand(b, hq, generator=g) < 0.6,
    }[keep_kind]
    lens = None
    if ragged:  # lengths below Sq too: those rows' first queries are padding and get zeros
        lens = torch.randint(1, skv + 1, (b,), generator=g)
        lens[0] = skv
    return q, k, v, keep, lens, window


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES,
                         ids=[f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-Sq{c[3]}-Skv{c[4]}-D{c[5]}-{c[6]}" for c in CASES])
def test_matches_float64(impl, dtype, case, poison):
    q, k, v, keep, lens, window = make(case, dtype)
    out = IMPLS[impl](q, k, v, keep, kv_lens=lens, window=window)
    assert out.shape == q.shape and out.dtype == dtype
    truth = oracle.attention(q, k, v, keep, lens, window)
    same = oracle.attention(q, k, v, keep, lens, window, dtype=dtype)
    oracle.assert_close_to_truth(out, same, truth, FLOOR[dtype], f"{impl} {dtype}")
    if keep is not None:  # switched-off heads are exactly zero
        assert (out[~keep] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [c for c in CASES if c[7]], ids=lambda c: f"Sq{c[3]}-Skv{c[4]}-w{c[8]}")
def test_padding_never_reaches_the_output(impl, case):
    """Keys and values past a row's length hold NaN (as unwritten or reused cache memory may): every backend
    gives exactly what it gives with clean padding."""
    q, k, v, keep, lens, window = make(case, torch.float32, seed=11)
    clean = IMPLS[impl](q, k, v, keep, kv_lens=lens, window=window)
    kp, vp = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):
        kp[b, :, n:] = float("nan")
        vp[b, :, n:] = float("nan")
    assert torch.isnan(kp).any()
    out = IMPLS[impl](q, kp, vp, keep, kv_lens=lens, window=window)
    assert not torch.isnan(out).any() and torch.equal(out, clean)


def test_triton_matches_reference_and_is_a_free_view(poison):
    q, k, v, keep, lens, window = make(CASES[5], torch.float16, seed=3)
    a = masked_attention_triton(q, k, v, keep, kv_lens=lens, window=window)
    r = masked_attention_reference(q, k, v, keep, kv_lens=lens, window=window)
    torch.testing.assert_close(a, r, atol=2e-3, rtol=0)
    # the (B, Hq, Sq, D) result is a view of a contiguous (B, Sq, Hq, D) buffer
    assert a.transpose(1, 2).is_contiguous()


def test_chunked_prefill_equals_one_pass():
    """Chunks of a prompt over the growing cache give what one pass over the whole prompt gives."""
    q, k, v, _, _, _ = make((1, 4, 2, 113, 113, 32, "all", False, None), torch.float32, seed=5)
    whole = masked_attention_triton(q, k, v, window=30)
    parts, start = [], 0
    for n in (40, 1, 17, 55):
        end = start + n
        parts.append(masked_attention_triton(q[:, :, start:end], k[:, :, :end], v[:, :, :end], window=30))
        start = end
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=0)


def test_non_contiguous_inputs():
    """Inputs in the (B, S, H, D) memory order a projection produces are read through strides."""
    q, k, v, keep, lens, _ = make(CASES[2], torch.float32, seed=7)
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()
    torch.testing.assert_close(
        masked_attention_triton(qs, ks, vs, keep, kv_lens=lens),
        masked_attention_reference(q, k, v, keep, kv_lens=lens), atol=1e-5, rtol=0,
    )


def test_scale_argument():
    q, k, v, *_ = make(CASES[1], torch.float32, seed=2)
    out = masked_attention_triton(q, k, v, scale=0.3)
    truth = oracle.attention(q, k, v, scale=0.3)
    assert (out.double() - truth).abs().max() < 1e-5


def test_backend_env(monkeypatch):
    q, k, v, *_ = make(CASES[1], torch.float32)
    calls = []
    import retmask.kernels.attention as attn_mod

    real = attn_mod.masked_attention_triton
    monkeypatch.setattr(attn_mod, "masked_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("RETMASK_BACKEND", "reference")
    masked_attention(q, k, v)
    assert calls == []
    monkeypatch.setenv("RETMASK_BACKEND", "triton")
    masked_attention(q, k, v)
    assert calls == [1]
    import retmask.kernels as kernels_pkg

    cpu_calls = []
    real_cpu = kernels_pkg.masked_attention_cpu
    monkeypatch.setattr(kernels_pkg, "masked_attention_cpu", lambda *a, **kw: cpu_calls.append(1) or real_cpu(*a, **kw))
    monkeypatch.setenv("RETMASK_BACKEND", "auto")  # CPU tensors: the CPU backend
    masked_attention(q, k, v)
    assert calls == [1] and cpu_calls == [1]
    monkeypatch.setenv("RETMASK_BACKEND", "cpu")
    masked_attention(q, k, v)
    monkeypatch.setenv("RETMASK_BACKEND", "reference")
    masked_attention(q, k, v)
    assert calls == [1] and cpu_calls == [1, 1]
    monkeypatch.setenv("RETMASK_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="RETMASK_BACKEND"):
        masked_attention(q, k, v)
    monkeypatch.setenv("RETMASK_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        masked_attention(q, k, v)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 32, 8, 1000, 1000, 128), (1, 32, 8, 512, 4099, 128), (3, 16, 16, 777, 777, 64)])
def test_cuda_large(dtype, shape, poison):
    b, hq, hkv, sq, skv, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, skv, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, skv, d, device="cuda", dtype=dtype, generator=g)
    keep = torch.rand(b, hq, device="cuda", generator=g) < 0.5
    lens = torch.randint(sq, skv + 1, (b,), device="cuda", generator=g)
    for window in (None, 300):
        out = masked_attention(q, k, v, keep, kv_lens=lens, window=window)
        truth = oracle.attention(q, k, v, keep, lens, window)
        same = oracle.attention(q, k, v, keep, lens, window, dtype=dtype)
        oracle.assert_close_to_truth(out, same, truth, 1e-3, f"cuda {dtype} window={window}")
        assert (out[~keep] == 0).all()


def test_k_and_v_with_different_layouts():
    """V is read through its own strides, not K's."""
    q, k, v, keep, lens, window = make(CASES[5], torch.float32, seed=8)
    vs = v.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Hkv, Skv, D) view of (B, Skv, Hkv, D)
    assert vs.stride(2) != k.stride(2)
    torch.testing.assert_close(
        masked_attention_triton(q, k, vs, keep, kv_lens=lens, window=window),
        masked_attention_reference(q, k, v, keep, kv_lens=lens, window=window), atol=1e-5, rtol=0,
    )


def test_autotune_switch():
    """RETMASK_AUTOTUNE=0 (the test suite's setting) leaves the autotuner the first config only."""
    import subprocess
    import sys

    code = "from retmask.kernels import attention as a; print(len(a._attn_fwd_tuned.configs), len(a._configs()))"
    for flag, want in (("0", "1 7"), ("1", "7 7")):
        env = {**__import__("os").environ, "RETMASK_AUTOTUNE": flag}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.stdout.split() == want.split(), out.stderr[-2000:]
