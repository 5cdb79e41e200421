"""The engine's cache on tiny random models (CPU): sizing (slots, segments, budget, policies hint), slot
refill and admission, prefill batches, prompts read alike computed once, and prefix reuse; every case
checks its tokens against transformers' own generation."""

from collections import Counter

import numpy as np
import pytest
import torch

from engine_common import HEADS, NEW, family_models, generated_scope_greedy, hf_greedy, prompts
from retmask import hf
from retmask.engine import ORIGINAL, Engine, GenConfig, Group, Policy, common_prefix, prefix_order
from retmask.heads import HeadSet
from retmask.sampling import Sampling
from tiny_models import FAMILIES, tiny


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return family_models(request.param)


def test_policies_hint_sizes_the_cache_and_keeps_tokens_exact(family):
    """With policies=[original, ablated] the engine pools only the prompt layers the pair shares (below
    layer 1 here), keeps full private KV above and new tokens only below: same tokens as `generate`,
    fewer bytes per row. A group that shares less than the pool holds keeps its prompt KV above its shared
    depth in a segment per stream, or in its rows' private caches when they hold it (one segment in all)."""
    _, m, ref, zeroed = family
    pair = [ORIGINAL, Policy(HEADS)]
    ps = prompts()
    with Engine(m, slots=4, max_len=48, chunk=7, policies=pair, private_len=NEW, segments=2) as eng:
        assert eng.pool_layers == HEADS.lowest_layer == 1 and eng.n_segments == 2
        # private caches: each capacity plus the spare column idle slots write to
        assert [t.shape[2] for t in eng.pk] == [48, 0, 0, 0] and [t.shape[2] for t in eng.k] == [NEW + 1, 49, 49, 49]
        res = {r.key: r for r in eng.generate([Group(p, pair, key=i) for i, p in enumerate(ps)] +
                                              [Group(ps[0], [ORIGINAL], key="alone")], GenConfig(max_new_tokens=NEW))}
        # single-row groups: the 2 pool segments, not the 4 slots, bound how many run at once
        singles = {r.key: r for r in eng.generate([Group(p, [ORIGINAL], key=i) for i, p in enumerate(ps)],
                                                  GenConfig(max_new_tokens=NEW))}
        assert all(singles[i].rows[0].tokens == hf_greedy(ref, p) for i, p in enumerate(ps))
        # a group sharing less than the pool holds (a head off in layer 0) keeps its pooled layers in a
        # segment of its own
        low = HeadSet.from_list("0-1")
        (r,) = eng.generate([Group(ps[4], [ORIGINAL, Policy(low)])], GenConfig(max_new_tokens=NEW))
        assert r.rows[0].tokens == hf_greedy(ref, ps[4]) and r.rows[1].tokens == hf_greedy(hf.zeroed_copy(ref, low), ps[4])
        hinted = eng.bytes_per_slot()
    for i, p in enumerate(ps):
        assert res[i].rows[0].tokens == hf_greedy(ref, p) and res[i].rows[1].tokens == hf_greedy(zeroed, p)
    assert res["alone"].rows[0].tokens == hf_greedy(ref, ps[0])
    with Engine(m, slots=2, max_len=48, chunk=7, policies=pair, segments=1) as roomy:  # private_len = max_len
        assert roomy.pool_layers == 1
        (r,) = roomy.generate([Group(ps[4], [ORIGINAL, Policy(low)])], GenConfig(max_new_tokens=NEW))
        assert roomy._layout(Group(ps[4], [ORIGINAL, Policy(low)]), GenConfig(max_new_tokens=NEW)) == (0, 0, 1)
        assert r.rows[0].tokens == hf_greedy(ref, ps[4]) and r.rows[1].tokens == hf_greedy(hf.zeroed_copy(ref, low), ps[4])
    with Engine(m, slots=4, max_len=48) as plain:
        assert hinted < 0.6 * plain.bytes_per_slot()  # (9 + 3*48 + 48) vs 4*(48 + 48) token-layers
    budget = 20 * plain.bytes_per_slot() / 1e9  # staging kept small here: the cache is what is compared
    with Engine(m, kv_budget_gb=budget, max_len=48, policies=pair, private_len=NEW, prefill_tokens=1) as sized:
        assert sized.slots > 1.6 * 20


def test_default_size_and_max_slots(monkeypatch):
    """Without slots or a budget: a few slots on CPU (never more than the job's rows); on CUDA a budget
    of the free memory, capped at the job's rows (memory query faked here)."""
    from retmask.engine import default_size

    m = tiny("llama")
    assert default_size(m, rows=100, cpu_slots=4) == {"slots": 4}
    assert default_size(m, rows=3, cpu_slots=4) == {"slots": 3}
    with Engine(m, slots=1, max_len=64) as one:
        per = one.bytes_per_slot()
        staged = one.staging_bytes(5)
    with Engine(m, kv_budget_gb=50 * per / 1e9, max_len=64, max_slots=7) as eng:
        assert eng.slots == 7
    with Engine(m, kv_budget_gb=(5 * per + staged + 1) / 1e9, max_len=64, max_slots=7) as eng:  # +1: float
        assert eng.slots == 5
    with Engine(m, kv_budget_gb=5 * per / 1e9, max_len=64, max_slots=7) as eng:
        assert eng.slots < 5  # the staging of a prefill pass comes out of the same budget

    class FakeParam:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(m, "parameters", lambda: iter([FakeParam()]))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 10**9, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * 10**9)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 30 * 10**9)
    assert default_size(m, rows=12, cpu_slots=4) == {"kv_budget_gb": 7.0, "max_slots": 12}
    # 10 GB that PyTorch freed (a closed engine's cache) but its allocator holds count as free too
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * 10**9)
    assert default_size(m, rows=12, cpu_slots=4) == {"kv_budget_gb": 14.0, "max_slots": 12}


def test_close_frees_the_cache_and_refuses_to_generate():
    """A closed engine drops its KV cache (a second engine in the same process, e.g. the rejected side
    of --reject-model, gets that memory) and refuses to generate."""
    import sys

    m = tiny("llama")
    with Engine(m, slots=2, max_len=32) as eng:
        (r,) = list(eng.generate([Group([5, 6, 7], [ORIGINAL])], GenConfig(max_new_tokens=2)))
        assert len(r.rows[0].tokens) == 2
        k = eng.k[0]
    assert eng.k == [] and eng.v == [] and eng.pk == [] and eng.pv == []
    assert sys.getrefcount(k) == 2  # this test's name and getrefcount's argument: the engine holds none
    with pytest.raises(RuntimeError, match="closed"):
        list(eng.generate([Group([5, 6, 7], [ORIGINAL])], GenConfig(max_new_tokens=2)))


def test_segments_default_and_budget():
    """One pool segment per slot when a segment costs at most half a row's private KV, else one per
    group of slots; a budget with explicit segments pays for them first."""
    m = tiny("llama")
    pair = [ORIGINAL, Policy(HEADS)]
    with Engine(m, slots=4, max_len=48, policies=pair, private_len=NEW) as eng:  # 1 pooled layer of 4: cheap
        assert eng.n_segments == 4
        assert eng.bytes_per_slot() == eng._token_bytes() * (NEW + 1 + 3 * 49 + 48)  # + 1 per layer: the spare
    gen_pair = [ORIGINAL, Policy(HEADS, "generated")]  # every layer pooled, 9 private tokens: dear
    with Engine(m, slots=4, max_len=48, policies=gen_pair, private_len=NEW) as eng:
        assert eng.pool_layers == 4 and eng.n_segments == 2
        assert eng.bytes_per_slot() == eng._token_bytes() * (4 * (NEW + 1) + 4 * 48 / 2)
        seg, row = eng.bytes_per_segment(), eng.bytes_per_slot(with_pool=False)
    with Engine(m, kv_budget_gb=(3 * seg + 5.5 * row) / 1e9, max_len=48, policies=gen_pair, private_len=NEW,
                segments=3, prefill_tokens=1) as eng:  # staging: 1 token x 4 layers, within the half row
        assert (eng.n_segments, eng.slots) == (3, 5)
    with pytest.raises(ValueError, match="segments=0"):
        Engine(m, slots=4, max_len=48, segments=0)
    with pytest.raises(ValueError, match="besides 3 pool segments"):
        Engine(m, kv_budget_gb=3 * seg / 1e9, max_len=48, policies=gen_pair, private_len=NEW, segments=3)


RANDOM_STOPS = GenConfig(max_new_tokens=14, sampling=Sampling(temperature=2.0), eos_ids=tuple(range(0, 128, 4)), seed=3)


def _pairs_run(m, ps, **engine_kw):
    """Tokens per group and the engine's counts for RetMask pairs on `ps`, rows stopping at random."""
    pair = [ORIGINAL, Policy(HEADS)]
    with Engine(m, max_len=48, policies=pair, private_len=14, **engine_kw) as eng:
        res = {r.key: [row.tokens for row in r.rows] for r in
               eng.generate([Group(p, pair, seeds=[3, 4], key=i)  # one fixed pair of seeds for every group
                             for i, p in enumerate(ps)], RANDOM_STOPS)}
        return res, dict(eng.stats), eng.slot_utilization


def test_segment_per_slot_lets_a_finished_row_take_the_next_group():
    """A group holds its pool segment until its last row ends. With one segment per pair of slots, the
    slot of a row that stopped early idles until its partner stops; with one per slot it takes the next
    group at once: fewer steps, a higher slot use, the same tokens (`stats` counts what ran)."""
    m = tiny("llama")
    ps = prompts(seed=5, lens=(6, 9, 4, 11, 7, 5, 8, 10, 3, 12, 6, 9, 7, 4, 10, 5))
    (res2, st2, use2), (res4, st4, use4) = (_pairs_run(m, ps, slots=4, segments=s) for s in (2, 4))
    assert res2 == res4
    lengths = [len(t) for rows in res4.values() for t in rows]
    assert len(set(lengths)) > 3  # rows of one group do stop at different steps here
    for st in (st2, st4):
        assert st["row_steps"] == sum(lengths) and st["slot_steps"] == 4 * st["steps"]
    assert st4["steps"] < st2["steps"] and use4 > use2


def test_admit_rows_batches_prefill_passes():
    """With rows ending at random steps, admitting at every free slot costs a prefill pass nearly
    every step; waiting for admit_rows admissible rows makes fewer, larger passes: the same tokens."""
    m = tiny("llama")
    pair = [ORIGINAL, Policy(HEADS)]
    g = torch.Generator().manual_seed(8)
    ps = [torch.randint(3, 97, (int(n),), generator=g).tolist() for n in torch.randint(2, 12, (40,), generator=g)]
    for segments in (None, 8):  # one pool segment per slot, or per pair of slots (free segments bound admission)
        (res2, st2, _), (res8, st8, _) = (_pairs_run(m, ps, slots=16, admit_rows=a, segments=segments) for a in (2, 8))
        assert len(res8) == len(ps) and res2 == res8
        assert st8["prefills"] < st2["prefills"] / 2, (segments, st2, st8)
        assert st2["prefills"] > st2["steps"] / 3  # the case it is for: passes on a large share of steps
    with pytest.raises(ValueError, match="admit_rows"):
        Engine(m, slots=4, max_len=48, admit_rows=0)
    with Engine(m, slots=64, max_len=48, policies=pair) as eng:
        assert eng.admit_rows == 4  # slots // 16
    with Engine(m, slots=8, max_len=48, policies=pair, admit_rows=100) as eng:
        assert eng.admit_rows == 8  # never more than the slots


def test_the_queue_tail_is_admitted_without_waiting_for_admit_rows():
    """When the queue holds fewer rows than admit_rows (after dropping the groups that will be
    skipped), its last group joins as soon as it fits. 4 slots, admit_rows 4, 1-row groups: row 0
    stops at step 2 (EOS), rows 1-3 run 10 steps; the fifth prompt takes row 0's slot after step 2,
    so the run takes max(10, 2 + its length) steps, not 10 + its length; a too-long sixth prompt is
    skipped and does not hold it back."""
    m = tiny("llama")
    g = torch.Generator().manual_seed(11)
    for _ in range(50):  # prompts whose greedy continuations make the stop pattern above
        ps = [torch.randint(3, 97, (6,), generator=g).tolist() for _ in range(5)]
        free = [hf_greedy(m, p, 10) for p in ps]
        eos = free[0][1]
        if free[0][0] != eos and all(eos not in f for f in free[1:4]) and eos not in free[4][:3]:
            break
    else:
        pytest.fail("no prompt set with the needed stop pattern")
    n5 = free[4].index(eos) + 1 if eos in free[4] else 10
    with Engine(m, slots=4, max_len=40, admit_rows=4, on_too_long="skip") as eng:
        out = {r.key: r.rows[0].tokens for r in eng.generate(
            [Group(p, [ORIGINAL], key=i) for i, p in enumerate(ps + [list(range(3, 60))])],
            GenConfig(max_new_tokens=10, eos_ids=(eos,)))}
        assert eng.stats["steps"] == max(10, 2 + n5), (eng.stats, n5)
        assert eng.skipped == 1 and sorted(out) == [0, 1, 2, 3, 4] and len(out[4]) == n5


def test_prefill_passes_stay_within_prefill_tokens(family):
    """Groups admitted together are prefilled in passes of at most prefill_tokens rows x tokens (the
    chunk cut to fit as well): the same tokens as `generate`, and no decoder-layer call over the bound."""
    _, m, ref, zeroed = family
    ps = prompts()
    seen = []

    def watch(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen.append(h.shape[0] * h.shape[1])

    for bound in (None, 40):
        kw = {} if bound is None else {"prefill_tokens": bound}
        with Engine(m, slots=12, max_len=48, chunk=64, **kw) as eng:
            hook = m.model.layers[-1].register_forward_pre_hook(watch, with_kwargs=True)  # after the engine's
            try:
                res = {r.key: r for r in eng.generate([Group(p, [ORIGINAL, Policy(HEADS)], key=i)
                                                       for i, p in enumerate(ps)], GenConfig(max_new_tokens=NEW))}
            finally:
                hook.remove()
        for i, p in enumerate(ps):
            assert res[i].rows[0].tokens == hf_greedy(ref, p) and res[i].rows[1].tokens == hf_greedy(zeroed, p)
        if bound is None:
            assert max(seen) == 12 * 29  # every group in one pass: 12 rows x the longest prompt
        else:
            assert max(seen) <= bound
        seen.clear()
    with pytest.raises(ValueError, match="prefill_tokens=0"):
        Engine(m, slots=2, max_len=48, prefill_tokens=0)


def _prefix_tree_size(seqs) -> int:
    """Tokens in the prefix tree of `seqs`: the least a prefill that computes each distinct prefix once does."""
    return len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})


def _niah_like(seed=5):
    """Prompts that share a haystack up to a needle placed at several depths, two identical ones and an
    unrelated one (a prompt's first len - 1 tokens are prefilled)."""
    g = torch.Generator().manual_seed(seed)
    hay = torch.randint(3, 90, (44,), generator=g).tolist()
    needle = [93, 94, 95]
    ps = [hay[:c] + needle + hay[c:40] for c in (40, 30, 20, 10, 0, 35)] + [hay[:44], hay[:44]]
    return ps + [torch.randint(3, 90, (25,), generator=g).tolist()]


@pytest.mark.parametrize("slots", [1, 3, 9])
def test_prefix_reuse_computes_each_prefix_once_and_changes_nothing(family, slots):
    """Groups in prefix order reuse the KV of every prefix a segment holds: the prompt tokens computed are
    exactly the prefix tree's (one slot, a few, all at once), and each row's tokens, argmax and logits
    equal a run without reuse and a full forward of the plain model."""
    _, m, ref, _ = family
    ps = _niah_like()
    order = prefix_order(ps)
    assert order == sorted(range(len(ps)), key=lambda i: tuple(ps[i]))  # lexicographic
    cfg = GenConfig(max_new_tokens=6, return_argmax=True, keep_logits=True)
    out, stats = {}, {}
    for reuse in (0, 8):
        with Engine(m, slots=slots, max_len=56, chunk=7, reuse_prefix=reuse) as eng:
            out[reuse] = {r.key: r for r in eng.generate([Group(ps[i], [ORIGINAL], key=i) for i in order], cfg)}
            stats[reuse] = eng.stats
    total = sum(len(p) - 1 for p in ps)
    assert (stats[0]["prompt_tokens"], stats[0]["reused_tokens"]) == (total, 0)
    assert stats[8]["prompt_tokens"] == _prefix_tree_size([p[:-1] for p in ps]) < 0.55 * total
    assert stats[8]["prompt_tokens"] + stats[8]["reused_tokens"] == total
    assert sum(out[8][i].reused for i in range(len(ps))) == stats[8]["reused_tokens"]
    assert out[8][8].reused == 0  # the unrelated prompt
    for i, p in enumerate(ps):
        a, b = out[0][i].rows[0], out[8][i].rows[0]
        assert a.tokens == b.tokens and torch.equal(a.argmax, b.argmax), i
        with torch.no_grad():
            full = ref(torch.tensor([p + b.tokens[:-1]])).logits[0, len(p) - 1:]
        torch.testing.assert_close(b.logits, full.float(), atol=2e-4, rtol=1e-4)


def test_prefix_reuse_never_takes_kv_another_bitmap_computed(family):
    """Groups with a head off over the prompt (scope all) mixed with original and scope-`generated` groups on
    prompts that share prefixes: every row equals `generate` on its model, and a segment filled by a group
    that pooled only its lowest layers never stands in for an intact prompt's upper layers."""
    _, m, ref, zeroed = family
    ps = _niah_like(seed=6)[:6]
    pols = [[ORIGINAL], [ORIGINAL, Policy(HEADS)], [Policy(HEADS, "generated")]]
    groups = [Group(p, pols[i % 3], key=i) for i, p in enumerate(ps)]
    with Engine(m, slots=2, max_len=56, chunk=5, reuse_prefix=8) as eng:
        res = {r.key: r for r in eng.generate(groups, GenConfig(max_new_tokens=NEW))}
        assert eng.stats["reused_tokens"] > 0
    for i, p in enumerate(ps):
        rows = res[i].rows
        if i % 3 == 2:
            assert rows[0].tokens == generated_scope_greedy(ref, zeroed, p), i
            continue
        assert rows[0].tokens == hf_greedy(ref, p), i
        if i % 3 == 1:
            assert rows[1].tokens == hf_greedy(zeroed, p), i
    # one segment: an unrelated prompt fills it, an ablated group writes only its layer 0, and an original
    # group on the ablated group's prompt must not take the segment's stale upper layers for that prompt
    x, p = _niah_like(seed=7)[-1], ps[0]
    seq = [Group(x, [ORIGINAL], key=0), Group(p, [Policy(HEADS)], key=1), Group(p, [ORIGINAL], key=2)]
    with Engine(m, slots=1, max_len=56, chunk=5, reuse_prefix=8) as eng:
        res = {r.key: r for r in eng.generate(seq, GenConfig(max_new_tokens=NEW))}
    assert res[2].reused == 0 and res[2].rows[0].tokens == hf_greedy(ref, p)
    assert res[1].rows[0].tokens == hf_greedy(zeroed, p)
    with pytest.raises(ValueError, match="reuse_prefix=-1"):
        Engine(m, slots=1, max_len=48, reuse_prefix=-1)


def test_common_prefix_across_block_boundaries():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, 5000)
    for n in (0, 1, 255, 256, 257, 1279, 1280, 1281, 4999, 5000):
        b = a.copy()
        if n < len(b):
            b[n] += 1
        assert common_prefix(a, b) == n
        assert common_prefix(a[:n], a) == n and common_prefix(a, a[:n]) == n


def test_prefix_reuse_with_triton_kernels(monkeypatch):
    """The prefill kernel over a reused prefix (queries placed after it, padding in front of them) gives
    the full forward's logits."""
    monkeypatch.setenv("RETMASK_BACKEND", "triton")
    m, ref = tiny("llama"), tiny("llama")  # the same weights; ref keeps transformers' eager attention
    ps = _niah_like()[:6]
    with Engine(m, slots=3, max_len=56, chunk=7, reuse_prefix=8) as eng:
        res = {r.key: r for r in eng.generate([Group(ps[i], [ORIGINAL], key=i) for i in prefix_order(ps)],
                                              GenConfig(max_new_tokens=3, keep_logits=True))}
        assert eng.stats["prompt_tokens"] == _prefix_tree_size([p[:-1] for p in ps])
    for i, p in enumerate(ps):
        with torch.no_grad():
            full = ref(torch.tensor([p + res[i].rows[0].tokens[:-1]])).logits[0, len(p) - 1:]
        torch.testing.assert_close(res[i].rows[0].logits, full.float(), atol=2e-4, rtol=1e-4)
    # each stream's prompt KV in a pool segment (private_len = new tokens), two groups per pass: the decode
    # kernel reads a segment per stream at every layer above the shared depth
    zeroed = hf.zeroed_copy(ref, HEADS)
    pols = [ORIGINAL, Policy(HEADS), Policy(HEADS, "generated")]
    with Engine(m, slots=6, max_len=56, chunk=7, reuse_prefix=8, policies=pols, private_len=3) as eng:
        assert eng.pool_layers == 4 and eng.n_segments == 4
        res = {r.key: r for r in eng.generate([Group(ps[i], pols, key=i) for i in prefix_order(ps)],
                                              GenConfig(max_new_tokens=3, keep_logits=True))}
        assert eng.stats["reused_tokens"] > 0
    for i, p in enumerate(ps):
        for row, model in zip(res[i].rows[:2], (ref, zeroed)):
            with torch.no_grad():
                full = model(torch.tensor([p + row.tokens[:-1]])).logits[0, len(p) - 1:]
            torch.testing.assert_close(row.logits, full.float(), atol=2e-4, rtol=1e-4)
        assert res[i].rows[2].tokens == generated_scope_greedy(ref, zeroed, p, 3)


def test_rows_that_read_the_prompt_alike_compute_it_once(family):
    """In a group of the original, two scope-`generated` rows and a scope-`all` row, the three rows that read
    the prompt intact are one prefill stream above the shared depth: the prefill runs 2 rows, not 4, and
    every row still equals its definition."""
    _, m, ref, zeroed = family
    ps = prompts(seed=8, lens=(19, 11))
    pols = [ORIGINAL, Policy(HEADS, "generated"), Policy(HEADS), Policy(HEADS, "generated", name="again")]
    seen = []

    def watch(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[:2])

    with Engine(m, slots=4, max_len=40, chunk=64) as eng:
        hook = m.model.layers[-1].register_forward_pre_hook(watch, with_kwargs=True)  # after the engine's
        try:
            res = {r.key: r for r in eng.generate([Group(p, pols, key=i) for i, p in enumerate(ps)],
                                                  GenConfig(max_new_tokens=NEW))}
        finally:
            hook.remove()
    assert [s for s in seen if s[1] > 1] == [torch.Size([2, 18]), torch.Size([2, 10])]  # the two prefills
    for i, p in enumerate(ps):
        rows = res[i].rows
        assert rows[0].tokens == hf_greedy(ref, p) and rows[2].tokens == hf_greedy(zeroed, p)
        assert rows[1].tokens == rows[3].tokens == generated_scope_greedy(ref, zeroed, p)


def test_prefix_reuse_survives_a_refilled_buffer_and_a_failed_prefill():
    """A segment holds a copy of its prompt's tokens (a caller may refill its own buffer), and a prefill that
    fails part-way leaves its segments holding nothing: a later call never copies KV it does not have."""
    m, ref = tiny("llama"), tiny("llama")
    g = torch.Generator().manual_seed(0)
    buf = np.array(torch.randint(3, 90, (20,), generator=g).tolist(), dtype=np.int64)
    other = torch.randint(3, 90, (20,), generator=g).tolist()
    cfg = GenConfig(max_new_tokens=3, keep_logits=True)

    def exact(res, p):
        with torch.no_grad():
            full = ref(torch.tensor([list(p) + res.rows[0].tokens[:-1]])).logits[0, len(p) - 1:]
        torch.testing.assert_close(res.rows[0].logits, full.float(), atol=2e-4, rtol=1e-4)

    with Engine(m, slots=1, max_len=32, chunk=64, reuse_prefix=4) as eng:
        list(eng.generate([Group(buf, [ORIGINAL])], cfg))
        buf[10:] = torch.randint(3, 90, (10,), generator=g).numpy()  # the same first 10 tokens, a new rest
        (res,) = eng.generate([Group(buf.tolist(), [ORIGINAL])], cfg)
        assert res.reused == 10
        exact(res, buf)

        def boom(module, args, kwargs):
            raise RuntimeError("out of memory")

        hook = m.model.layers[2].register_forward_pre_hook(boom, with_kwargs=True)
        try:
            with pytest.raises(RuntimeError, match="out of memory"):
                list(eng.generate([Group(other, [ORIGINAL])], cfg))  # overwrites the segment, then fails
        finally:
            hook.remove()
        (res,) = eng.generate([Group(buf.tolist(), [ORIGINAL])], cfg)
        assert res.reused == 0
        exact(res, buf)
    with Engine(m, slots=2, max_len=32, reuse_prefix=10**9) as big:  # capped at max_len
        assert big.reuse_prefix == 32


def test_held_prefix_lookup_equals_a_scan_of_every_segment():
    """The lexicographic index finds the longest prefix any segment holds (as a scan of all would), a tie
    goes to a preferred (free) segment when one is near, and a segment whose content is replaced is forgotten."""
    eng = Engine(tiny("llama"), slots=1, segments=40, max_len=80, reuse_prefix=5)
    rng = np.random.default_rng(1)
    hay, needle = rng.integers(3, 9, 70), rng.integers(90, 96, 4)  # few distinct ids: many ties
    prompt = lambda c, n=70: np.concatenate([hay[:c], needle, hay[c:n]])  # noqa: E731
    for s in range(40):
        eng._segs.hold(s, prompt(int(rng.integers(0, 70)), int(rng.integers(30, 71))), (0, 4, ()))
    eng._segs.hold(7, prompt(60), (0, 4, ()))
    eng._segs.hold(8, prompt(60), (0, 4, ()))
    eng._segs.hold(7, None)  # replaced by a prompt with a head off: holds nothing now
    for c in list(range(0, 70, 3)) + [60]:
        a = prompt(c)
        scan = max((common_prefix(a, eng._segs.ids[s]), s) for s in range(40) if eng._segs.ids[s] is not None)
        n, seg = eng._held_prefix(a)
        assert n == (scan[0] if scan[0] >= 5 else 0)
        assert seg == -1 or common_prefix(a, eng._segs.ids[seg]) == n
        ties = [s for s in range(40) if eng._segs.ids[s] is not None and common_prefix(a, eng._segs.ids[s]) == n]
        if n and len(ties) > 1:  # a tie goes to a preferred segment among the nearest in the index
            near = eng._held_prefix(a)[1]
            assert eng._held_prefix(a, prefer=[t for t in ties if t != near])[1] in ties
            assert eng._held_prefix(a, prefer=[t for t in ties if t != near])[1] != near
    assert eng._held_prefix(prompt(60))[1] != 7
    eng.close()


@pytest.mark.parametrize("slots,private_len", [(4, None), (12, None), (36, None), (4, 6), (12, 6), (36, 6)])
def test_prefix_reuse_for_groups_with_heads_off_over_the_prompt(family, slots, private_len):
    """NIAH's causal check: groups of the original, a scope-`all` ablation, a scope-`generated` one and a
    scope-`all` set from layer 0 (so the group shares no layer) reuse each stream's prefix: from a slot that
    held a row with its bitmap (full private caches), or from a segment that held the stream (private_len =
    new tokens: each stream's prompt KV in a pool segment, stored once for the rows that read it alike).
    Every row equals its definition and a run without reuse. The tokens computed are the prefix tree's,
    plus one for the prompt held whole (each stream computes at least its last prompt token), with one
    group at a time, 3, or all 9 admitted together (prefilled in two passes: a root per cluster first)."""
    _, m, ref, zeroed = family
    ps = _niah_like()
    pols = [ORIGINAL, Policy(HEADS), Policy(HEADS, "generated"), Policy(HeadSet.from_list("0-1,3-3"), name="low")]
    order = prefix_order(ps)
    out, stats = {}, {}
    for reuse in (0, 8):
        with Engine(m, slots=slots, max_len=56, chunk=7, reuse_prefix=reuse, policies=pols,
                    private_len=private_len) as eng:
            by_stream = private_len is not None
            assert (eng.pool_layers, eng.group_segs) == ((4, 3) if by_stream else (0, 1))
            seen = []

            def check(_):  # which segment each decoding row reads its prompt from, at the top layer
                act = [s for s in range(eng.slots) if not eng._idle[s]]
                if act:  # (after a step that ended every row: none)
                    seen.append((len(act), Counter(eng.row_seg[-1, act].tolist())))

            out[reuse] = {r.key: r for r in eng.generate([Group(ps[i], pols, key=i) for i in order],
                                                        GenConfig(max_new_tokens=6, keep_logits=True), check)}
            stats[reuse] = eng.stats
            # every group's 4 rows decode together: its original and scope-`generated` rows read one segment,
            # the two scope-`all` rows one each (full private caches: no row reads a segment there)
            for n, c in seen:
                if by_stream:
                    assert -1 not in c and sorted(c.values()) == sorted([1, 1, 2] * (n // 4)), (n, c)
                else:
                    assert set(c) == {-1}, c
            assert seen
    assert stats[8]["reused_tokens"] > 0.3 * stats[0]["prompt_tokens"]
    assert stats[8]["prompt_tokens"] == _prefix_tree_size([p[:-1] for p in ps]) + 1
    for i, p in enumerate(ps):
        for a, b in zip(out[0][i].rows, out[8][i].rows):
            assert a.tokens == b.tokens, (i, a.policy)
            torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
        rows = out[8][i].rows
        assert rows[0].tokens == hf_greedy(ref, p, 6) and rows[1].tokens == hf_greedy(zeroed, p, 6)
        assert rows[2].tokens == generated_scope_greedy(ref, zeroed, p, 6)


def test_a_finished_rows_prompt_kv_survives_idle_decode_steps(family):
    """A finished row's slot idles while other rows decode: its writes go to a spare column, so the prompt
    KV it holds stays whole, and a later group with its bitmap reuses it exactly."""
    _, m, ref, zeroed = family
    ps = _niah_like()
    x, y = prompts(seed=11, lens=(20, 20))
    cfg = GenConfig(max_new_tokens=12, keep_logits=True)
    with Engine(m, slots=3, max_len=56, chunk=7, reuse_prefix=8) as eng:
        list(eng.generate([Group(x, [ORIGINAL], key="x"), Group(ps[0], [Policy(HEADS)], key="a")], cfg))
        slot = 1  # a's row (slots are taken in order)
        held = [(eng.k[l][slot, :, :40].clone(), eng.v[l][slot, :, :40].clone()) for l in range(1, 4)]
        list(eng.generate([Group(y, [ORIGINAL])], cfg))  # slot 1 idles for 12 decode steps
        for l, (k, v) in zip(range(1, 4), held):
            assert torch.equal(eng.k[l][slot, :, :40], k) and torch.equal(eng.v[l][slot, :, :40], v), l
        (c,) = eng.generate([Group(ps[1], [Policy(HEADS)] * 3)], cfg)
    assert c.reused == 30  # the haystack before c's needle, from a's slot
    for row in c.rows:
        with torch.no_grad():
            full = zeroed(torch.tensor([ps[1] + row.tokens[:-1]])).logits[0, len(ps[1]) - 1:]
        torch.testing.assert_close(row.logits, full.float(), atol=2e-4, rtol=1e-4)
        assert row.tokens == hf_greedy(zeroed, ps[1], 12)
