"""Sampling: the Triton Gumbel-max kernel (interpreter) against its reference, and the sampler's
distribution, cuts and batch independence against independent oracles."""

import pytest
import torch

from retmask.kernels import gumbel_argmax, gumbel_argmax_reference
from retmask.kernels.sampling import gumbel_argmax_triton
from retmask.sampling import Sampling, next_tokens, score_floor


def _rows(b, v, dtype, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, v, generator=g) * spread).to(dtype)
    seeds = torch.randint(0, 2**62, (b,), generator=g)
    steps = torch.randint(0, 4096, (b,), generator=g)
    return logits, seeds, steps


@pytest.mark.parametrize("b,v,dtype", [(3, 1000, torch.float32), (1, 5003, torch.float16), (4, 130, torch.float32),
                                       (2, 1, torch.float32), (5, 191, torch.float16)])
@pytest.mark.parametrize("cut", [None, "topk", "all"])
def test_kernel_equals_reference(poison, b, v, dtype, cut):
    """Token for token, across vocabulary splits (the interpreter cuts V in up to 3 splits of 64-multiples)."""
    logits, seeds, steps = _rows(b, v, dtype, seed=v)
    inv_t = 1 / 0.6
    floor = None
    if cut == "topk":
        floor = logits.double().topk(min(7, v), dim=-1).values[:, -1] * inv_t
    elif cut == "all":  # no token survives: every key is -inf and the first token wins, as torch.argmax
        floor = torch.full((b,), float("inf"), dtype=torch.float64)
    got = gumbel_argmax_triton(logits, seeds, steps, inv_t, floor)
    want = gumbel_argmax_reference(logits, seeds, steps, inv_t, floor)
    assert got.dtype == torch.int64 and got.shape == (b,)
    assert got.tolist() == want.tolist()
    if cut == "all":
        assert got.tolist() == [0] * b


def test_kernel_keeps_the_first_of_tied_keys():
    """Infinite logits tie the keys whatever the noise: the lowest id wins, across lanes and splits."""
    logits = torch.zeros(3, 200)  # the interpreter's launch: blocks of 64, splits of 128 tokens
    logits[0, [199, 134, 70]] = float("inf")  # one lane (6) of two splits
    logits[1, [70, 6]] = float("inf")  # one lane of two blocks of a split
    logits[2, [65, 64]] = float("inf")  # neighbours in one block
    seeds, steps = torch.tensor([3, 4, 5]), torch.tensor([1, 2, 3])
    assert gumbel_argmax_triton(logits, seeds, steps, 1.0).tolist() == [70, 6, 64]
    assert gumbel_argmax_reference(logits, seeds, steps, 1.0).tolist() == [70, 6, 64]


def test_sampler_follows_the_softmax():
    """Frequencies over 20000 seeds against softmax(logits / T), computed independently."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    n, t = 20000, 0.7
    toks = next_tokens(logits.expand(n, -1), Sampling(temperature=t), torch.arange(n), torch.zeros(n, dtype=torch.long))
    freq = torch.bincount(toks, minlength=6).double() / n
    want = torch.softmax(logits[0].double() / t, -1)
    assert (freq - want).abs().max() < 0.015, (freq, want)


def _nucleus(row, t, k, p):
    """The kept token ids, by plain Python: top-k by value, then top-p over them."""
    scores = sorted(((x / t, i) for i, x in enumerate(row.tolist())), reverse=True)
    if k:
        kth = scores[k - 1][0]
        scores = [s for s in scores if s[0] >= kth]
    z = sum(torch.tensor(s[0]).exp().item() for s in scores)
    kept, mass = [], 0.0
    for s, i in scores:
        if mass >= p:
            break
        kept.append(i)
        mass += torch.tensor(s).exp().item() / z
    return set(kept)


@pytest.mark.parametrize("k,p", [(5, 1.0), (0, 0.8), (20, 0.5), (0, 0.05)])
def test_cuts_keep_only_the_nucleus(k, p):
    logits, _, _ = _rows(4, 300, torch.float32, seed=k)
    cfg = Sampling(temperature=0.9, top_k=k, top_p=p)
    n = 400
    for r in range(4):
        allowed = _nucleus(logits[r], 0.9, k, p)
        toks = next_tokens(logits[r:r + 1].expand(n, -1), cfg, torch.arange(n) + 1000 * r,
                           torch.zeros(n, dtype=torch.long))
        assert set(toks.tolist()) <= allowed
        if len(allowed) > 1:
            assert len(set(toks.tolist())) > 1  # it samples, not argmaxes


def test_floor_cuts_by_value_and_keeps_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    floor = score_floor(logits, Sampling(temperature=1.0, top_k=1))
    assert floor.tolist() == [3.0]
    toks = next_tokens(logits.expand(300, -1), Sampling(temperature=1.0, top_k=1), torch.arange(300),
                       torch.zeros(300, dtype=torch.long))
    assert set(toks.tolist()) == {1, 2, 4}
    assert score_floor(logits, Sampling(temperature=1.0)) is None


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rows_without_a_finite_logit_and_empty_batches(backend, monkeypatch):
    """A row whose logits are all -inf samples token 0 under every cut (top-p's mass is NaN there),
    like torch.argmax; a batch of no rows gives no tokens."""
    monkeypatch.setenv("RETMASK_BACKEND", backend)
    logits = torch.randn(3, 70)
    logits[1] = float("-inf")
    for cfg in (Sampling(temperature=0.6), Sampling(temperature=0.6, top_p=0.5), Sampling(temperature=0.6, top_k=3),
                Sampling(temperature=0.6, top_k=3, top_p=0.5)):
        toks = next_tokens(logits, cfg, torch.arange(3), torch.zeros(3, dtype=torch.long))
        assert toks[1].item() == 0 and 0 <= toks.min() and toks.max() < 70
    empty = next_tokens(torch.zeros(0, 70), Sampling(temperature=0.6), torch.zeros(0, dtype=torch.long),
                        torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_a_nan_logit_is_never_drawn_on_either_backend():
    """A NaN logit (a broken model) is skipped by the kernel's comparisons and by the reference alike, so the
    token does not depend on the device; a NaN floor cuts every token on both."""
    logits, seeds, steps = _rows(4, 300, torch.float32, seed=3)
    logits[:, ::7] = float("nan")
    for floor in (None, logits.nan_to_num(nan=-1e9).topk(5).values[:, -1].double(), torch.full((4,), float("nan"))):
        got = gumbel_argmax_triton(logits, seeds, steps, 1.5, floor)
        assert got.tolist() == gumbel_argmax_reference(logits, seeds, steps, 1.5, floor).tolist()
        assert (got % 7 != 0).all() or floor is not None and torch.isnan(floor).all()


def test_tokens_do_not_depend_on_the_batch():
    """A row sampled alone, or among others in any order, by the kernel: the same token."""
    logits, seeds, steps = _rows(5, 400, torch.float16, seed=9)
    whole = gumbel_argmax_triton(logits, seeds, steps, 2.0)
    perm = torch.tensor([3, 0, 4, 1, 2])
    shuffled = gumbel_argmax_triton(logits[perm], seeds[perm], steps[perm], 2.0)
    alone = [gumbel_argmax_triton(logits[i:i + 1], seeds[i:i + 1], steps[i:i + 1], 2.0).item() for i in range(5)]
    assert whole.tolist() == alone and shuffled.tolist() == whole[perm].tolist()


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 1.0, None), "logits"),
    ((torch.zeros(2, 5), torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1.0, None), "seed"),
    ((torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2), 1.0, None), "step"),
    ((torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 0.0, None), "inv_t"),
    ((torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1.0, torch.zeros(3)),
     "floor"),
    ((torch.zeros(2, 0), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1.0, None), "V >= 1"),
    ((torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), float("inf"), None),
     "inv_t=inf"),
    ((torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), True, None), "inv_t=True"),
    ((torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), "1", None), "inv_t='1'"),
    ((torch.zeros(2, 5), torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.long), 1.0, None), "seed"),
    ((torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1.0,
      torch.zeros(2, dtype=torch.bool)), "floor"),
    (([[0.0, 1.0]], torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1.0, None),
     "logits: expected a"),
])
@pytest.mark.parametrize("fn", [gumbel_argmax, gumbel_argmax_reference, gumbel_argmax_triton])
def test_bad_inputs_name_the_argument(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.cuda
def test_cuda_kernel_equals_reference_at_llama_vocab():
    """bf16 logits of Llama-3's vocabulary, 1 to 512 rows, with and without a cut: the kernel's
    tokens equal the reference's (the same float64 arithmetic), but for float near-ties."""
    for b in (1, 7, 512):
        logits, seeds, steps = _rows(b, 128256, torch.bfloat16, seed=b)
        logits = logits.cuda()
        for floor in (None, logits.double().topk(50, dim=-1).values[:, -1] * 1.5):
            got = gumbel_argmax_triton(logits, seeds, steps, 1.5, floor)
            want = gumbel_argmax_reference(logits, seeds, steps, 1.5, floor)
            assert got.device.type == "cuda"
            assert (got == want).float().mean().item() >= 0.99
