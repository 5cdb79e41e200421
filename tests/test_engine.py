"""Engine exactness on tiny random Llama, Qwen3 and OLMo-3 models (CPU, reference kernels): logits and
greedy tokens against transformers on the plain and zeroed models, scope `generated`, argmax, sampling
seeds, stops, decode modes and CUDA graphs."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from engine_common import HEADS, NEW, family_models, generated_scope_greedy, hf_greedy, prompts
from retmask import hf
from retmask.engine import ORIGINAL, Engine, GenConfig, Group, Policy
from retmask.heads import HeadSet
from retmask.sampling import Sampling
from tiny_models import FAMILIES, tiny


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return family_models(request.param)


@pytest.mark.parametrize("sharing,chunk,slots", [(True, 7, 5), (False, 64, 12), (True, 1000, 2)])
def test_greedy_equals_generate_on_plain_and_zeroed_models(family, sharing, chunk, slots):
    _, m, ref, zeroed = family
    ps = prompts()
    with Engine(m, slots=slots, max_len=48, chunk=chunk, sharing=sharing) as eng:
        groups = [Group(p, [ORIGINAL, Policy(HEADS)], key=i) for i, p in enumerate(ps)]
        res = {r.key: r for r in eng.generate(groups, GenConfig(max_new_tokens=NEW))}
    assert sorted(res) == list(range(len(ps)))
    for i, p in enumerate(ps):
        assert res[i].rows[0].tokens == hf_greedy(ref, p), f"original row, prompt {i}"
        assert res[i].rows[1].tokens == hf_greedy(zeroed, p), f"ablated row, prompt {i}"
        assert res[i].rows[0].finish == "length"
    assert any(res[i].rows[0].tokens != res[i].rows[1].tokens for i in res)  # the heads matter


def test_logits_equal_full_forward(family):
    """Per-step logits of each row equal a full forward of the plain / zeroed model over the sequence."""
    _, m, ref, zeroed = family
    p = prompts(seed=3, lens=(17,))[0]
    with Engine(m, slots=4, max_len=40, chunk=5) as eng:
        (res,) = list(eng.generate([Group(p, [ORIGINAL, Policy(HEADS)])], GenConfig(max_new_tokens=6,
                                                                                    keep_logits=True)))
    for row, model in zip(res.rows, (ref, zeroed)):
        seq = torch.tensor([p + row.tokens[:-1]])
        with torch.no_grad():
            full = model(seq).logits[0, len(p) - 1 :]  # (T, V): the positions that produced each token
        torch.testing.assert_close(row.logits, full.float(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_rows_follow_their_models_within_bf16_noise(name):
    """bf16 (what GPUs run) through the engine on CPU, with the reference kernels: each row's logits stay
    within bf16 noise of its own model's full forward and far from the other policy's, its greedy tokens are
    that forward's argmax, and sampling works on bf16 logits."""
    m = tiny(name, dtype=torch.bfloat16)
    ref, zeroed = copy.deepcopy(m), hf.zeroed_copy(copy.deepcopy(m), HEADS)
    p = prompts(seed=3, lens=(17,))[0]
    with Engine(m, slots=4, max_len=40, chunk=5) as eng:
        assert eng.k[0].dtype == torch.bfloat16
        (res,) = list(eng.generate([Group(p, [ORIGINAL, Policy(HEADS)])], GenConfig(max_new_tokens=6,
                                                                                    keep_logits=True)))
        (smp,) = list(eng.generate([Group(p, [ORIGINAL, Policy(HEADS)])],
                                   GenConfig(max_new_tokens=6, sampling=Sampling(temperature=0.6, top_p=0.9))))
    fulls = []
    for row, model in zip(res.rows, (ref, zeroed)):
        with torch.no_grad():
            fulls.append(model(torch.tensor([p + row.tokens[:-1]])).logits[0, len(p) - 1 :].float())
        assert row.tokens == fulls[-1].argmax(-1).tolist()
    for i, row in enumerate(res.rows):
        own = (row.logits - fulls[i]).abs().max().item()
        other = (row.logits[:1] - fulls[1 - i][:1]).abs().max().item()  # same first position, other policy
        assert own < 0.25 < other, (own, other)
    assert all(len(r.tokens) == 6 and all(0 <= t < m.config.vocab_size for t in r.tokens) for r in smp.rows)


def test_scope_generated_matches_its_definition(family):
    """Scope generated = the intact model reads the prompt, the zeroed copy reads generated tokens."""
    _, m, ref, zeroed = family
    pol = Policy(HEADS, scope="generated")
    with Engine(m, slots=4, max_len=48, chunk=6) as eng:
        groups = [Group(p, [pol, ORIGINAL], key=i) for i, p in enumerate(prompts(5, (12, 25)))]
        res = {r.key: r for r in eng.generate(groups, GenConfig(max_new_tokens=NEW))}
    for i, p in enumerate(prompts(5, (12, 25))):
        assert res[i].rows[0].tokens == generated_scope_greedy(ref, zeroed, p)
        assert res[i].rows[1].tokens == hf_greedy(ref, p)




def test_rows_do_not_depend_on_batch_mates(family):
    _, m, *_ = family
    ps = prompts(7, (9, 21, 4))
    pols = [ORIGINAL, Policy(HEADS), Policy(HeadSet.from_list("0-1"), name="layer0"), Policy(HEADS, "generated")]
    cfg = GenConfig(max_new_tokens=NEW, sampling=Sampling(temperature=0.8, top_p=0.9, top_k=20))
    with Engine(m, slots=8, max_len=48, chunk=8) as eng:
        together = {r.key: r for r in eng.generate([Group(p, pols, seeds=[0, 1, 2, 3], key=i)
                                                    for i, p in enumerate(ps)], cfg)}
        alone = {i: next(eng.generate([Group(ps[i], [pols[j]], seeds=[j], key=i)], cfg)) for i in range(3) for j in [1]}
    for i in range(3):
        assert together[i].rows[1].tokens == alone[i].rows[0].tokens


def test_default_seeds_differ_across_the_rows_of_a_call(family):
    """Without seeds, a row's seed is GenConfig.seed plus its index among the call's rows: groups with the
    same prompt sample differently, and each row equals a run given that seed explicitly."""
    _, m, *_ = family
    p = prompts(1, (9,))[0]
    pols = [ORIGINAL, Policy(HEADS)]
    cfg = GenConfig(max_new_tokens=NEW, sampling=Sampling(temperature=1.5), seed=100)
    with Engine(m, slots=8, max_len=48, chunk=8) as eng:
        res = {r.key: r for r in eng.generate([Group(p, pols, key=i) for i in range(3)], cfg)}
        explicit = {r.key: r for r in eng.generate([Group(p, pols, seeds=[100 + 2 * i, 101 + 2 * i], key=i)
                                                    for i in range(3)], cfg)}
    assert len({tuple(res[i].rows[0].tokens) for i in range(3)}) == 3  # same prompt and policy, own noise
    for i in range(3):
        assert [r.tokens for r in res[i].rows] == [r.tokens for r in explicit[i].rows]


def test_staging_buffers_are_read_before_they_are_reused(family, monkeypatch):
    """On CUDA a launch's inputs and outputs pass through two host buffers per kind, used by alternate
    launches, and a launch's outputs are read when it is collected, a launch later with overlap. Run
    here on the CPU (unpinned), overlapped, every row equals the serial run without the buffers."""
    from retmask.decoding import Slots

    _, m, *_ = family
    ps = prompts(21, (14, 6, 22, 3, 17, 9, 2))
    free = _mixed_run(m, "static", ps, overlap=False)
    eos = (free[1].rows[1].tokens[2], free[4].rows[0].tokens[4])
    want = _mixed_run(m, "static", ps, overlap=False, eos=eos)
    monkeypatch.setattr(Slots, "STAGE_ON_CPU", True)
    _same_rows(want, _mixed_run(m, "static", ps, overlap=True, eos=eos), logits_tol=1e-5)


@pytest.mark.parametrize("overlap", [False, True])
def test_sampled_tokens_are_the_rows_own_draws(family, overlap):
    """Token t of a sampled row is the Gumbel-max draw of (its seed, step t) from its own logits at step t
    under the top-k / top-p cut (the documented sampler, replayed here from the row's logits), for rows
    that join the batch at different steps."""
    from retmask.kernels.reference import gumbel_argmax_reference
    from retmask.sampling import score_floor

    _, m, *_ = family
    samp = Sampling(temperature=0.8, top_k=40, top_p=0.95)
    cfg = GenConfig(max_new_tokens=NEW, keep_logits=True, sampling=samp, seed=7)
    ps = prompts(5, (9, 4, 15, 6))
    with Engine(m, slots=3, max_len=48, chunk=8, overlap=overlap) as eng:  # 3 slots for 8 rows: refills
        res = {r.key: r for r in eng.generate([Group(p, [ORIGINAL, Policy(HEADS)], key=i)
                                               for i, p in enumerate(ps)], cfg)}
    for i in range(len(ps)):
        for j, row in enumerate(res[i].rows):
            n = len(row.tokens)
            seed = torch.full((n,), 7 + 2 * i + j, dtype=torch.int64)  # GenConfig.seed + the row's index
            want = gumbel_argmax_reference(row.logits.double(), seed, torch.arange(n), 1 / samp.temperature,
                                           score_floor(row.logits.double(), samp))
            assert row.tokens == want.tolist(), f"group {i}, row {j}"


def test_argmax_stream_matches_eager_attention(family):
    name, m, ref, zeroed = family
    p = prompts(9, (15,))[0]
    with Engine(m, slots=2, max_len=40, chunk=4) as eng:
        (res,) = list(eng.generate([Group(p, [ORIGINAL, Policy(HEADS)])], GenConfig(max_new_tokens=5,
                                                                                    return_argmax=True)))
    for row, model in zip(res.rows, (ref, zeroed)):
        seq = torch.tensor([p + row.tokens[:-1]])
        with torch.no_grad():
            att = model(seq, output_attentions=True).attentions  # per layer (1, Hq, T, T)
        want = torch.stack([a[0, :, len(p) - 1 :].argmax(-1) for a in att], 0).permute(2, 0, 1)  # (T, L, Hq)
        got = row.argmax
        assert got.shape == want.shape
        if row is res.rows[1]:
            for layer, h in HEADS:
                assert (got[:, layer, h] == -1).all()
                got[:, layer, h] = want[:, layer, h]
        assert (got == want).float().mean() > 0.99  # exact but for float near-ties


def test_stops_and_finish_reasons(family):
    _, m, ref, _ = family
    p = prompts(2, (10,))[0]
    free = hf_greedy(ref, p, 12)
    with Engine(m, slots=2, max_len=40) as eng:
        (r,) = list(eng.generate([Group(p, [ORIGINAL])], GenConfig(max_new_tokens=12, eos_ids=(free[3],))))
    cut = free.index(free[3]) + 1
    assert r.rows[0].tokens == free[:cut] and r.rows[0].finish == "eos"


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_strings_end_rows_where_their_text_appears(overlap):
    """A stop string ends a row at the first token whose decoded tail contains it (oracle: the
    unstopped greedy tokens, decoded prefix by prefix), with finish "stop"; rows of the same batch
    that never see it run to their length; many slots at once (the vectorized bookkeeping); also with
    the host a step behind the launches (overlap)."""
    from retmask import toy

    tok = toy.build_tokenizer()
    m = tiny("llama", vocab=len(tok), seed=3)
    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(10, len(tok), (int(n),), generator=g).tolist() for n in torch.randint(2, 12, (12,),
                                                                                              generator=g)]
    new = 14
    free = [hf_greedy(m, p, new) for p in ps]
    stop = tok.decode(free[0][5:7])  # text that row 0 produces at its steps 6-7
    want = []
    for f in free:
        n = next((i for i in range(1, new + 1) if stop in tok.decode(f[max(0, i - 16):i])), None)
        want.append((f[:n], "stop") if n else (f, "length"))
    assert want[0][1] == "stop" and any(w[1] == "length" for w in want)
    with Engine(m, tok, slots=8, max_len=40, overlap=overlap) as eng:  # 12 groups through 8 slots: refills
        got = {r.key: r.rows[0] for r in eng.generate([Group(p, [ORIGINAL], key=i) for i, p in enumerate(ps)],
                                                       GenConfig(max_new_tokens=new, stop_strings=(stop,)))}
    assert [(got[i].tokens, got[i].finish) for i in range(len(ps))] == want


def test_one_generation_at_a_time_and_clean_after_an_early_stop(family):
    _, m, ref, _ = family
    ps = prompts(4, (5, 30, 12))
    cfg = GenConfig(max_new_tokens=NEW)
    with Engine(m, slots=4, max_len=48) as eng:
        first = eng.generate([Group(p, [ORIGINAL, Policy(HEADS)], key=i) for i, p in enumerate(ps)], cfg)
        next(first)  # stop after one group: rows of the others are mid-flight
        with pytest.raises(RuntimeError, match="still running"):
            next(eng.generate([Group(ps[0], [ORIGINAL])], cfg))
        first.close()
        again = {r.key: r for r in eng.generate([Group(p, [ORIGINAL], key=i) for i, p in enumerate(ps)], cfg)}
    for i, p in enumerate(ps):
        assert again[i].rows[0].tokens == hf_greedy(ref, p)


def test_progress_counts_generated_tokens(family):
    """progress(n) gets the tokens each step produced: over a run they add up to every row's tokens."""
    _, m, *_ = family
    seen = []
    groups = [Group(p, [ORIGINAL, Policy(HEADS)], key=i) for i, p in enumerate(prompts(3, (6, 11, 4)))]
    with Engine(m, slots=3, max_len=40) as eng:  # slots for one pair at a time: refill mid-run
        out = list(eng.generate(groups, GenConfig(max_new_tokens=5, eos_ids=(7, 11, 13)), progress=seen.append))
    assert sum(seen) == sum(len(r.tokens) for g in out for r in g.rows)
    assert max(seen) <= 3 and len(seen) >= 5


def test_flight_reports_rows_longest_and_cap(family):
    """`Engine.flight`, read from the progress callback: rows decoding at each step (never more than the
    slots), the longest row so far, and the rows that ended at max_new_tokens; at the end, none decoding."""
    _, m, *_ = family
    groups = [Group(p, [ORIGINAL, Policy(HEADS)], key=i) for i, p in enumerate(prompts(3, (6, 11, 4, 9)))]
    seen = []
    with Engine(m, slots=4, max_len=40) as eng:
        first = list(eng.generate(groups, GenConfig(max_new_tokens=6)))
        assert eng.flight.at_cap == 8 and eng.flight.longest == 6
        # an EOS that one row says at its third token: that row ends early, most others at the cap
        cfg = GenConfig(max_new_tokens=6, eos_ids=(first[0].rows[0].tokens[2],))
        out = list(eng.generate(groups, cfg, progress=lambda n: seen.append(dataclasses.replace(eng.flight))))
    rows = [r for g in out for r in g.rows]
    assert 1 <= max(f.rows for f in seen) <= 4 and seen[-1].rows == 0
    assert [f.longest for f in seen] == sorted(f.longest for f in seen)  # never shrinks
    assert eng.flight.longest == max(len(r.tokens) for r in rows)
    assert eng.flight.at_cap == sum(r.finish == "length" for r in rows) == seen[-1].at_cap
    assert 0 < eng.flight.at_cap < len(rows)  # both kinds of ending, so the count is not trivially all or none


def test_bad_inputs(family):
    _, m, *_ = family
    with Engine(m, slots=2, max_len=16) as eng:
        with pytest.raises(ValueError, match="does not fit max_len=16"):
            list(eng.generate([Group(list(range(3, 13)), [ORIGINAL])], GenConfig(max_new_tokens=8)))
        with pytest.raises(ValueError, match="head 9-0 does not exist"):
            list(eng.generate([Group([5, 6], [Policy(HeadSet.from_list("9-0"))])], GenConfig(max_new_tokens=2)))
        with pytest.raises(ValueError, match="3 rows but the engine decodes 2 rows together"):
            list(eng.generate([Group([5, 6], [ORIGINAL] * 3)], GenConfig(max_new_tokens=2)))
        with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
            list(eng.generate([Group([5, 6], [ORIGINAL])], GenConfig(max_new_tokens=2, stop_strings=("x",))))
        # what generate() is given: groups, prompts (token ids inside the vocabulary), policies, seeds, config
        P = [ORIGINAL, Policy(HEADS)]
        for groups, cfg, msg in (
                (Group([5, 6], P), GenConfig(),
                 r"groups: expected a list of Group, got Group \(one group: \[group\]\)"),
                ([None], GenConfig(), r"groups\[0\]: expected a Group"),
                ([Group([5, 6], P)], None, "cfg: expected a GenConfig"),
                ([Group([5, 97], P)], GenConfig(), r"token ids must lie in \[0, 97\)"),
                ([Group([5, -1], P)], GenConfig(), r"token ids must lie in \[0, 97\)"),
                ([Group("hello", P)], GenConfig(), "prompt must be a 1-D sequence of token ids"),
                ([Group([5.5, 6.0], P)], GenConfig(), "prompt must be a 1-D sequence of token ids"),
                ([Group(torch.tensor([[5, 6]]), P)], GenConfig(), "prompt must be a 1-D sequence of token ids"),
                ([Group([5, 6], P[1])], GenConfig(), "policies must be a list of Policy"),
                ([Group([5, 6], P, seeds=[1.5, 2.5])], GenConfig(), "seeds must be a list of ints")):
            with pytest.raises(ValueError, match=msg):
                eng.generate(groups, cfg)  # at the call, before the iterator is consumed
        # a 1-D integer tensor or numpy array is a prompt like its list
        want = [r.tokens for r in next(eng.generate([Group([5, 6, 7], P)], GenConfig(max_new_tokens=3))).rows]
        for p in (torch.tensor([5, 6, 7]), np.array([5, 6, 7], dtype=np.int32)):
            assert [r.tokens for r in next(eng.generate([Group(p, P)], GenConfig(max_new_tokens=3))).rows] == want
    # the engine's own arguments, checked before the model is switched to retmask attention
    plain = tiny("llama")
    impl = plain.config._attn_implementation
    for kw, msg in (({"slots": 2.5}, "slots=2.5: expected an int"), ({"slots": 2, "chunk": "8"}, "chunk='8'"),
                    ({"kv_budget_gb": float("inf")}, "kv_budget_gb=inf: must be a finite number > 0"),
                    ({"kv_budget_gb": 0.01, "max_slots": 0}, "max_slots=0: must be >= 1"),
                    ({"slots": 2, "tokenizer": 123}, "tokenizer: expected a transformers tokenizer"),
                    ({"slots": 2, "block_size": 24}, "block_size=24: the kernels take 16, 32, 64, 128, 256")):
        with pytest.raises(ValueError, match=msg):
            Engine(plain, **kw)
    assert plain.config._attn_implementation == impl
    for model in (None, "toy", torch.nn.Linear(2, 2)):
        with pytest.raises(ValueError, match="model: expected a loaded transformers causal LM"):
            Engine(model, slots=2)
    for kw, msg in (({"max_new_tokens": 2.5}, "max_new_tokens=2.5"), ({"stop_strings": "ab"}, "not one string"),
                    ({"stop_strings": ("",)}, "non-empty strings"), ({"eos_ids": ("47",)}, "eos_ids"),
                    ({"seed": "x"}, "seed='x'"), ({"sampling": None}, "sampling: expected"),
                    ({"return_argmax": "no"}, "return_argmax='no'")):
        with pytest.raises(ValueError, match=msg):
            GenConfig(**kw)
    for kw, msg in (({"temperature": float("nan")}, "temperature=nan"), ({"temperature": 1e-320}, "too small"),
                    ({"top_k": 2.5}, "top_k=2.5")):
        with pytest.raises(ValueError, match=msg):
            Sampling(**kw)
    with pytest.raises(ValueError, match="heads: expected a HeadSet or None"):
        Policy("1-2")
    for rows, msg in ((HEADS, "got HeadSet"), ([], "got an empty list"), (["1-2"], r"rows\[0\]: expected a HeadSet")):
        with pytest.raises(ValueError, match=msg):
            with hf.policies(m, rows):
                raise AssertionError(f"rows {rows!r} were accepted")
    with Engine(m, slots=2, max_len=16, on_too_long="skip") as skip:
        out = list(skip.generate([Group(list(range(3, 13)), [ORIGINAL]), Group([5, 6], [ORIGINAL], key="ok")],
                                 GenConfig(max_new_tokens=8)))
    assert [r.key for r in out] == ["ok"] and skip.skipped == 1


def test_kv_budget_sizes_the_pool():
    """The budget holds the block pool and the K/V one prefill pass stages: the most blocks that fit both;
    `slots` alone gives every row room for max_len tokens of its own; a group that can never fit is refused
    at the call."""
    m = tiny("llama")
    eng = Engine(m, kv_budget_gb=1e-3, max_len=100, block_size=16, prefill_tokens=256)
    p = eng.plan
    tok = 2 * 2 * 16 * 4  # K and V, 2 KV heads, head_dim 16, fp32
    assert p.block_bytes == tok * 4 * 16  # 4 layers x 16 tokens
    assert p.staging_bytes == tok * 4 * max(eng.prefill_tokens, 2 * 100)
    assert p.n_blocks * p.block_bytes + p.staging_bytes <= 1e6 < (p.n_blocks + 1) * p.block_bytes + p.staging_bytes
    assert eng.slots == min(512, p.n_blocks - 1) and eng.stats["kv_blocks_total"] == p.n_blocks - 1
    eng.close()
    with pytest.raises(ValueError, match="not one block per layer fits"):
        Engine(m, kv_budget_gb=1e-9, max_len=100)
    with Engine(m, kv_budget_gb=1e-3, max_len=100, prefill_tokens=256, max_slots=3) as capped:
        assert capped.slots == 3
    with Engine(m, slots=3, max_len=100, block_size=16) as fixed:  # 3 rows of 100 tokens, each its own, twice
        assert fixed.plan.usable_blocks == 3 * (2 * 7 + 1)
    # a pool of fewer tokens than prefill_tokens: a pass stages at most the pool's worth, half the budget
    budget = 2 * 12 * p.block_bytes / 1e9
    with Engine(m, kv_budget_gb=budget, max_len=100, block_size=16, prefill_tokens=256) as small:
        assert small.plan.usable_blocks == 11 and small.plan.staging_bytes == 12 * p.block_bytes
        with pytest.raises(ValueError, match=r"need 12 KV blocks but the pool holds 11; raise kv_budget_gb"):
            small.generate([Group(list(range(3, 36)), [ORIGINAL, Policy(HEADS)])], GenConfig(max_new_tokens=60))
        assert len(list(small.generate([Group(list(range(3, 36)), [ORIGINAL, Policy(HEADS)])],
                                       GenConfig(max_new_tokens=40)))) == 1  # 2 x 3 prompt + 2 x 3 new: fits


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        hf.attach(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))


def test_policies_context_for_plain_transformers(family):
    """The same per-row policies for plain model(...) and generate(...) users, with padding."""
    _, m, ref, zeroed = family
    hf.attach(m)
    ids = torch.tensor(prompts(4, (12, 12)))
    am = torch.ones_like(ids)
    am[1, :4] = 0  # left padding on row 1
    with torch.no_grad(), hf.policies(m, [None, HEADS]):
        logits = m(ids).logits
        gen = m.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(logits[0], ref(ids[:1]).logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[1], zeroed(ids[1:]).logits[0], atol=1e-4, rtol=1e-4)
    assert gen[0, 12:].tolist() == hf_greedy(ref, ids[0].tolist(), 6)
    assert gen[1, 12:].tolist() == hf_greedy(zeroed, ids[1, 4:].tolist(), 6)
    with pytest.raises(ValueError, match="keep bitmap has 2 rows"), hf.policies(m, [None, HEADS]):
        m(ids[:1].repeat(3, 1))


def test_rows_that_read_the_prompt_alike_share_its_blocks(family):
    """Original and scope-`generated` rows read one set of prompt blocks; a scope-`all` row's prompt differs
    from its shared depth on and gets a set of its own (the layers below come from the original's). Tokens and
    argmax equal the same rows with sharing off (every row its own prompt blocks), which uses more blocks."""
    _, m, ref, zeroed = family
    p = prompts(seed=3)[0][:33]  # 32 prompt tokens prefilled: 2 blocks of 16
    cfg = GenConfig(max_new_tokens=NEW, return_argmax=True)
    for pols, sets in (([ORIGINAL, Policy(HEADS, "generated")], 1), ([ORIGINAL, Policy(HEADS)], 2)):
        out, peak = {}, {}
        for sharing in (True, False):
            with Engine(m, slots=2, max_len=48, block_size=16, sharing=sharing) as eng:
                out[sharing] = next(eng.generate([Group(p, pols)], cfg)).rows
                peak[sharing] = eng.stats["kv_blocks_peak"]
        assert peak[True] == 2 * sets + 2 * 1 and peak[False] == 2 * 2 + 2 * 1  # prompt sets + each row's new tokens
        for a, b in zip(out[True], out[False]):
            assert a.tokens == b.tokens and torch.equal(a.argmax, b.argmax)
        assert out[True][0].tokens == hf_greedy(ref, p)
    assert out[True][1].tokens == hf_greedy(zeroed, p)


def _mixed_run(m, decode, ps, new=NEW, info=None, overlap=None, eos=(), sampling=Sampling(temperature=0.7, top_k=30)):
    """Groups of 1, 2 and 4 rows (sharing depths 4, 1 and 0), argmax and logits on; slots refill.
    `info` (a dict) receives the engine's decode mode, overlap, capture errors, which steps were captured
    and the engine's stats."""
    pols = [[ORIGINAL], [ORIGINAL, Policy(HEADS)],
            [Policy(HEADS, "generated"), ORIGINAL, Policy(HeadSet.from_list("0-1")), Policy(HEADS)]]
    groups = [Group(p, pols[i % 3], key=i) for i, p in enumerate(ps)]
    cfg = GenConfig(max_new_tokens=new, return_argmax=True, keep_logits=True, eos_ids=eos, sampling=sampling)
    with Engine(m, slots=6, max_len=48, chunk=8, decode=decode, overlap=overlap) as eng:
        out = {r.key: r for r in eng.generate(groups, cfg)}
        if info is not None:
            info.update(decode=eng.decode, overlap=eng.overlap, errors=eng.graph_errors,
                        captured=[s.graph is not None for s in eng._steps.values()], stats=dict(eng.stats))
    return out


def _same_rows(a: dict, b: dict, logits_tol=0.0):
    assert sorted(a) == sorted(b)
    for i in a:
        for x, y in zip(a[i].rows, b[i].rows, strict=True):
            assert (x.tokens, x.finish) == (y.tokens, y.finish), f"group {i}, {x.policy}"
            assert torch.equal(x.argmax, y.argmax)
            torch.testing.assert_close(x.logits, y.logits, atol=logits_tol, rtol=logits_tol)


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("greedy", [True, False])
def test_overlapped_steps_equal_serial_steps(family, decode, greedy):
    """overlap=True (CUDA's default: step k's tokens reach the host after step k+1 is launched, so the
    host's work on them hides behind the GPU's) gives every row the tokens, argmax, logits and finish
    reason of overlap=False: rows of 1-, 2- and 4-row groups ending on EOS and on length at different
    steps, slots refilled mid-run. A row that ended on EOS rides along one more step and its slot is
    refilled a step later, so the overlapped run launches more steps for the same tokens."""
    _, m, *_ = family
    ps = prompts(21, (14, 6, 22, 3, 17, 9, 2))
    samp = Sampling() if greedy else Sampling(temperature=0.7, top_k=30)
    free = _mixed_run(m, decode, ps, sampling=samp, overlap=False)
    eos = (free[1].rows[1].tokens[2], free[4].rows[0].tokens[4])  # rows end on EOS at different steps
    serial, over = {}, {}
    want = _mixed_run(m, decode, ps, sampling=samp, overlap=False, eos=eos, info=serial)
    got = _mixed_run(m, decode, ps, sampling=samp, overlap=True, eos=eos, info=over)
    finishes = [r.finish for g in want.values() for r in g.rows]
    assert "eos" in finishes and "length" in finishes
    _same_rows(want, got, logits_tol=1e-5)  # the batch differs by a step: eager layers may take other paths
    assert (serial["overlap"], over["overlap"]) == (False, True)
    assert over["stats"]["row_steps"] == serial["stats"]["row_steps"] == sum(
        len(r.tokens) for g in want.values() for r in g.rows)
    assert over["stats"]["steps"] > serial["stats"]["steps"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_static_decode_step_equals_eager(family, backend, monkeypatch):
    """The static step (fixed buffers, every layer given the bitmap and the pool: what a CUDA graph
    replays) gives the eager step's tokens, argmax and logits, with rows joining and leaving."""
    name, m, *_ = family
    if backend == "triton" and name != "llama":
        pytest.skip("the interpreter run covers one family; the reference backend covers all three")
    monkeypatch.setenv("RETMASK_BACKEND", backend)
    ps, new = (prompts(11, (14, 6, 22, 3, 17)), NEW) if backend == "reference" else (prompts(11, (7, 3, 9)), 4)
    eager, static = _mixed_run(m, "eager", ps, new), _mixed_run(m, "static", ps, new)
    assert sorted(eager) == sorted(static) == list(range(len(ps)))
    for i in eager:
        for a, b in zip(eager[i].rows, static[i].rows):
            assert a.tokens == b.tokens, f"group {i}, {a.policy}"
            assert torch.equal(a.argmax, b.argmax)
            torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    if backend == "triton":  # and the Triton kernels (shared tiles, segment layout) agree with the reference
        monkeypatch.setenv("RETMASK_BACKEND", "reference")
        ref = _mixed_run(m, "eager", ps, new)
        for i in ref:
            for a, b in zip(ref[i].rows, static[i].rows):
                assert a.tokens == b.tokens, f"group {i}, {a.policy}"
                torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_decode_mode_checks():
    m = tiny("llama")
    with pytest.raises(ValueError, match="decode='fast': use one of auto, eager, static, graph"):
        Engine(m, slots=1, max_len=8, decode="fast")
    with pytest.raises(ValueError, match="decode='graph' needs a CUDA model"):
        Engine(m, slots=1, max_len=8, decode="graph")
    with pytest.raises(ValueError, match="overlap='yes': expected True, False or None"):
        Engine(m, slots=1, max_len=8, overlap="yes")
    with Engine(m, slots=1, max_len=8) as eng:
        assert eng.decode == "eager" and eng.overlap is False  # auto on CPU


@pytest.mark.cuda
def test_cuda_graph_decode_equals_eager():
    """On a GPU (bf16, Triton kernels) the captured and replayed step gives the eager step's tokens and argmax."""
    m = tiny("olmo3", dtype=torch.bfloat16).cuda()
    ps = prompts(13, (30, 7, 19, 2, 25, 11))
    info = {}
    eager, graph = _mixed_run(m, "eager", ps), _mixed_run(m, "auto", ps, info=info)
    assert info == dict(decode="graph", errors=[], captured=[True])
    for i in eager:
        for a, b in zip(eager[i].rows, graph[i].rows):
            assert a.tokens == b.tokens, f"group {i}, {a.policy}"
            assert torch.equal(a.argmax, b.argmax)


@pytest.mark.cuda
def test_cuda_launches_never_wait_for_the_gpu(monkeypatch):
    """On CUDA the host works a step behind the GPU (overlap, the default): after a call's first launch
    (which captures the graph), launching a step and its copies to the host, and prefilling the groups
    admitted while a step is in flight, make no synchronizing call (torch's sync debug mode raises on
    one) and do not wait for the GPU (work queued before them is still running when they return); the
    tokens, argmax and finish reasons equal a run that collects each step before launching the next."""
    m = tiny("llama", dtype=torch.bfloat16).cuda()
    ps = prompts(13, (30, 7, 19, 2, 25, 11))
    launch, prefill, checked = Engine._launch, Engine._prefill, {"launch": 0, "prefill": 0}

    def no_wait(what, fn, cycles):
        torch.cuda._sleep(cycles)  # GPU work queued before the call, longer than the call's host time
        busy = torch.cuda.Event()
        busy.record()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert not busy.query(), f"the {what} waited for the GPU"
        checked[what] += 1
        return out

    def strict_launch(self, st, cfg, prev):
        if prev is None:
            return launch(self, st, cfg, prev)
        return no_wait("launch", lambda: launch(self, st, cfg, prev), 100_000_000)  # tens of milliseconds

    def strict_prefill(self, admitted, st, cfg):
        if not st.launches:  # the call's first admission: nothing is in flight yet
            return prefill(self, admitted, st, cfg)
        return no_wait("prefill", lambda: prefill(self, admitted, st, cfg), 2_000_000_000)  # about a second

    serial = _mixed_run(m, "auto", ps, overlap=False)
    eos = (serial[1].rows[1].tokens[2],)
    want = _mixed_run(m, "auto", ps, overlap=False, eos=eos)  # also compiles the kernels the run below needs
    monkeypatch.setattr(Engine, "_launch", strict_launch)
    monkeypatch.setattr(Engine, "_prefill", strict_prefill)
    info = {}
    got = _mixed_run(m, "auto", ps, eos=eos, info=info)
    assert info["overlap"] is True and info["decode"] == "graph" and info["errors"] == []
    assert checked["launch"] >= NEW and checked["prefill"] >= 1, checked
    _same_rows(want, got, logits_tol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_engine_greedy_equals_generate(name):
    """On a GPU, in fp32 (Triton kernels with exact fp32 dots, CUDA graph decode): greedy tokens equal
    `generate` on the plain model and on the zeroed copy, with sharing and slot refill."""
    m = tiny(name).cuda()
    ref = copy.deepcopy(m)
    zeroed = hf.zeroed_copy(copy.deepcopy(m), HEADS)
    ps = prompts()
    with Engine(m, slots=5, max_len=48, chunk=7) as eng:
        res = {r.key: r for r in eng.generate([Group(p, [ORIGINAL, Policy(HEADS)], key=i) for i, p in enumerate(ps)],
                                              GenConfig(max_new_tokens=NEW))}
        assert eng.decode == "graph" and eng.graph_errors == []
    for i, p in enumerate(ps):
        for row, model in zip(res[i].rows, (ref, zeroed)):
            assert row.tokens == hf_greedy(model, p), f"prompt {i}, {row.policy}"


def test_failed_graph_capture_warns_and_falls_back(monkeypatch):
    """A capture that fails (here: no CUDA at all) warns once, says why in graph_errors, and the
    step runs uncaptured with the same tokens."""
    m = tiny("llama")
    ps = prompts(8, (9, 14))
    groups = lambda: [Group(p, [ORIGINAL, Policy(HEADS)], key=i) for i, p in enumerate(ps)]  # noqa: E731
    cfg = GenConfig(max_new_tokens=5)
    with Engine(m, slots=4, max_len=40, decode="static") as eng:
        want = {r.key: r.rows for r in eng.generate(groups(), cfg)}

    def no_cuda(*a, **k):
        raise RuntimeError("no CUDA here")

    monkeypatch.setattr(torch.cuda, "Stream", no_cuda)
    with Engine(m, slots=4, max_len=40, decode="static") as eng:
        eng.decode = "graph"  # what "auto" picks on CUDA; the capture then meets no_cuda
        with pytest.warns(UserWarning, match="CUDA graph capture of the decode step failed .*no CUDA here"):
            got = {r.key: r.rows for r in eng.generate(groups(), cfg)}
        assert eng.graph_errors == ["RuntimeError: no CUDA here"]
    assert {k: [r.tokens for r in v] for k, v in got.items()} == {k: [r.tokens for r in v] for k, v in want.items()}


@pytest.mark.cuda
def test_cuda_sampling_matches_cpu_and_stays_on_the_device():
    """The Gumbel noise is made on the logits' device from the same counter hash: CUDA and CPU sample alike."""
    from retmask.sampling import next_tokens

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5000, generator=g) * 3
    seeds, steps = torch.arange(64) * 7 + 1, torch.arange(64) % 5
    cfg = Sampling(temperature=0.7, top_p=0.9, top_k=200)
    cpu = next_tokens(logits, cfg, seeds, steps)
    gpu = next_tokens(logits.cuda(), cfg, seeds, steps)
    assert gpu.device.type == "cuda" and (gpu.cpu() == cpu).float().mean() >= 0.98  # exact but for float near-ties


def test_host_inputs_reach_the_engine_device_as_copies():
    """`to_device` (the prefill's and the layout's host-to-device copies) lands on the given device, any
    type, and never aliases the host array the engine goes on changing."""
    from retmask.decoding import to_device

    a = np.arange(4, dtype=np.int64)
    t = to_device(a, torch.device("cpu"))
    a[0] = 9
    assert t.tolist() == [0, 1, 2, 3]
    assert to_device(a, torch.device("meta")).device.type == "meta"
