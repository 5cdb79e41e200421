"""The engine's paged cache on tiny random models (CPU): sizing, admission and preemption by blocks, slot
refill, prefill batches, prompts read alike computed once, and the prefix cache; every case checks its
tokens against transformers' own generation or a run that cannot differ."""

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


def _budget(m, blocks: int, max_len: int, block_size: int = 16, prefill_tokens: int = 64) -> float:
    """The kv_budget_gb that gives `blocks` usable blocks (plus the trash block): the pool, and a prefill
    pass staging the pool's worth of tokens or `staging_tokens`, whichever is less."""
    from retmask.cache_plan import plan_for_model, staging_tokens

    bb = plan_for_model(m, max_len=max_len, block_size=block_size, slots=1).block_bytes
    n, cap = blocks + 1, staging_tokens(prefill_tokens, max_len)
    stage = min(n * block_size, cap) * bb // block_size
    return (n * bb + stage + 0.5) / 1e9


@pytest.mark.parametrize("block_size", [16, 32])
def test_a_small_pool_preempts_and_changes_no_token(family, block_size):
    """Pairs on a pool that holds about two of them at their longest: rows that outgrow it preempt the
    newest group, which is recomputed from its prompt when it returns. Greedy rows equal `generate` on the
    plain and zeroed models; sampled rows with random stops equal a run on a pool that never runs dry;
    every block is free again at the end."""
    _, m, ref, zeroed = family
    pair = [ORIGINAL, Policy(HEADS)]
    ps = prompts(seed=4, lens=(20, 9, 17, 12, 15, 6, 19, 11))
    new = 40
    per_group = 2 * -(-19 // block_size) + 2 * -(-new // block_size)
    kw = dict(max_len=64, block_size=block_size, prefill_tokens=64, slots=8)
    with Engine(m, kv_budget_gb=_budget(m, 2 * per_group, 64, block_size), **kw) as eng:
        res = {r.key: r for r in eng.generate([Group(p, pair, key=i) for i, p in enumerate(ps)],
                                              GenConfig(max_new_tokens=new))}
        assert eng.stats["preemptions"] > 0 and eng.stats["peak_rows"] >= 4
        assert eng.blocks.n_used == 0
        eng.blocks.check()
        sampled = {r.key: [row.tokens for row in r.rows] for r in eng.generate(
            [Group(p, pair, seeds=[3, 4], key=i) for i, p in enumerate(ps)], RANDOM_STOPS)}
        pre = eng.stats["preemptions"]
    for i, p in enumerate(ps):
        assert res[i].rows[0].tokens == hf_greedy(ref, p, new) and res[i].rows[1].tokens == hf_greedy(zeroed, p, new)
    with Engine(m, **kw) as roomy:
        assert sampled == {r.key: [row.tokens for row in r.rows] for r in roomy.generate(
            [Group(p, pair, seeds=[3, 4], key=i) for i, p in enumerate(ps)], RANDOM_STOPS)}
        assert roomy.stats["preemptions"] == 0
    assert pre > 0


def test_default_size_and_max_slots(monkeypatch):
    """Without slots or a budget: a few slots on CPU (never more than the job's rows); on CUDA a budget
    of the free memory, capped at the job's rows (memory query faked here)."""
    from retmask.engine import default_size

    m = tiny("llama")
    assert default_size(m, rows=100, cpu_slots=4) == {"slots": 4}
    assert default_size(m, rows=3, cpu_slots=4) == {"slots": 3}
    with Engine(m, kv_budget_gb=_budget(m, 50, 64), max_len=64, block_size=16, prefill_tokens=64,
                max_slots=7) as eng:
        assert eng.slots == 7 and eng.plan.usable_blocks == 50
    with Engine(m, kv_budget_gb=_budget(m, 5, 64), max_len=64, block_size=16, prefill_tokens=64) as eng:
        assert eng.slots == 5  # without max_slots: as many rows as could each hold a block

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
    assert eng.k == [] and eng.v == []
    assert sys.getrefcount(k) == 2  # this test's name and getrefcount's argument: the engine holds none
    with pytest.raises(RuntimeError, match="closed"):
        list(eng.generate([Group([5, 6, 7], [ORIGINAL])], GenConfig(max_new_tokens=2)))


RANDOM_STOPS = GenConfig(max_new_tokens=14, sampling=Sampling(temperature=2.0), eos_ids=tuple(range(0, 128, 4)), seed=3)


def _pairs_run(m, ps, **engine_kw):
    """Tokens per group and the engine's counts for RetMask pairs on `ps`, rows stopping at random."""
    pair = [ORIGINAL, Policy(HEADS)]
    with Engine(m, max_len=48, **engine_kw) as eng:
        res = {r.key: [row.tokens for row in r.rows] for r in
               eng.generate([Group(p, pair, seeds=[3, 4], key=i)  # one fixed pair of seeds for every group
                             for i, p in enumerate(ps)], RANDOM_STOPS)}
        eng.blocks.check()
        assert eng.blocks.n_used == 0  # every row's and group's blocks freed (prompt blocks may stay cached)
        return res, dict(eng.stats), eng.slot_utilization


def test_a_finished_row_frees_its_slot_for_the_next_group():
    """A row that stops frees its slot and its blocks at once (its group's prompt blocks stay until the
    group's last row ends): 4 slots give the same tokens as 16, every slot-step is counted, and no block
    is left held."""
    m = tiny("llama")
    ps = prompts(seed=5, lens=(6, 9, 4, 11, 7, 5, 8, 10, 3, 12, 6, 9, 7, 4, 10, 5))
    (res4, st4, use4), (res16, st16, _) = (_pairs_run(m, ps, slots=s) for s in (4, 16))
    assert res4 == res16
    lengths = [len(t) for rows in res4.values() for t in rows]
    assert len(set(lengths)) > 3  # rows of one group do stop at different steps here
    assert st4["row_steps"] == sum(lengths) and st4["slot_steps"] == 4 * st4["steps"]
    assert st4["peak_rows"] == 4 and use4 > 0.6


def test_admit_rows_batches_prefill_passes():
    """With rows ending at random steps, admitting at every free slot costs a prefill pass nearly
    every step; waiting for admit_rows admissible rows makes fewer, larger passes: the same tokens."""
    m = tiny("llama")
    g = torch.Generator().manual_seed(8)
    ps = [torch.randint(3, 97, (int(n),), generator=g).tolist() for n in torch.randint(2, 12, (40,), generator=g)]
    (res2, st2, _), (res8, st8, _) = (_pairs_run(m, ps, slots=16, admit_rows=a) for a in (2, 8))
    assert len(res8) == len(ps) and res2 == res8
    assert st8["prefills"] < st2["prefills"] / 2, (st2, st8)
    assert st2["prefills"] > st2["steps"] / 3  # the case it is for: passes on a large share of steps
    with pytest.raises(ValueError, match="admit_rows"):
        Engine(m, slots=4, max_len=48, admit_rows=0)
    with Engine(m, slots=64, max_len=48) as eng:
        assert eng.admit_rows == 4  # slots // 16
    with Engine(m, slots=8, max_len=48, admit_rows=100) as eng:
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


def _block_tree_size(seqs, bs: int = 16) -> int:
    """Tokens a prefill computes when every distinct run of leading whole blocks of `seqs` is computed once
    (the prefix cache holds whole blocks) and each prompt's partial last block is its own."""
    full = {tuple(s[:k * bs]) for s in seqs for k in range(1, len(s) // bs + 1)}
    return bs * len(full) + sum(len(s) % bs for s in seqs)


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
    """Groups in prefix order take every whole block of their prefix the cache holds: the prompt tokens
    computed are exactly the block prefix tree's (one slot, a few, all at once), and each row's tokens,
    argmax and logits equal a run without reuse and a full forward of the plain model."""
    _, m, ref, _ = family
    ps = _niah_like()
    order = prefix_order(ps)
    assert order == sorted(range(len(ps)), key=lambda i: tuple(ps[i]))  # lexicographic
    cfg = GenConfig(max_new_tokens=6, return_argmax=True, keep_logits=True)
    out, stats = {}, {}
    for reuse in (0, 8):
        with Engine(m, slots=slots, max_len=56, chunk=7, reuse_prefix=reuse, block_size=16) as eng:
            out[reuse] = {r.key: r for r in eng.generate([Group(ps[i], [ORIGINAL], key=i) for i in order], cfg)}
            stats[reuse] = eng.stats
    total = sum(len(p) - 1 for p in ps)
    assert (stats[0]["prompt_tokens"], stats[0]["reused_tokens"]) == (total, 0)
    assert stats[8]["prompt_tokens"] == _block_tree_size([p[:-1] for p in ps]) < 0.7 * total
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
    with Engine(m, slots=2, max_len=56, chunk=5, reuse_prefix=8, block_size=16) as eng:
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
    # an ablated group alone writes its layer 0 as the intact model computes it (its base blocks) and its
    # upper layers with the head off: an original group on that prompt takes neither for its upper layers
    x, p = _niah_like(seed=7)[-1], ps[0]
    seq = [Group(x, [ORIGINAL], key=0), Group(p, [Policy(HEADS)], key=1), Group(p, [ORIGINAL], key=2)]
    with Engine(m, slots=1, max_len=56, chunk=5, reuse_prefix=8, block_size=16) as eng:
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
    with Engine(m, slots=3, max_len=56, chunk=7, reuse_prefix=8, block_size=16) as eng:
        res = {r.key: r for r in eng.generate([Group(ps[i], [ORIGINAL], key=i) for i in prefix_order(ps)],
                                              GenConfig(max_new_tokens=3, keep_logits=True))}
        assert eng.stats["prompt_tokens"] == _block_tree_size([p[:-1] for p in ps])
    for i, p in enumerate(ps):
        with torch.no_grad():
            full = ref(torch.tensor([p + res[i].rows[0].tokens[:-1]])).logits[0, len(p) - 1:]
        torch.testing.assert_close(res[i].rows[0].logits, full.float(), atol=2e-4, rtol=1e-4)
    # each stream's prompt blocks, two groups per pass: the decode kernel reads a segment per stream at
    # every layer above the shared depth, through its block table
    zeroed = hf.zeroed_copy(ref, HEADS)
    pols = [ORIGINAL, Policy(HEADS), Policy(HEADS, "generated")]
    with Engine(m, slots=6, max_len=56, chunk=7, reuse_prefix=8, block_size=16) as eng:
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
    """The cache keys blocks by the prompt's tokens when it was computed (a caller may refill its own
    buffer), and a prefill that fails part-way leaves none of its blocks findable: a later call never takes
    KV that was not computed, and the blocks cached before the failure still serve, exactly."""
    m, ref = tiny("llama"), tiny("llama")
    g = torch.Generator().manual_seed(0)
    buf = np.array(torch.randint(3, 90, (40,), generator=g).tolist(), dtype=np.int64)
    other = torch.randint(3, 90, (40,), generator=g).tolist()
    cfg = GenConfig(max_new_tokens=3, keep_logits=True)

    def exact(res, p):
        with torch.no_grad():
            full = ref(torch.tensor([list(p) + res.rows[0].tokens[:-1]])).logits[0, len(p) - 1:]
        torch.testing.assert_close(res.rows[0].logits, full.float(), atol=2e-4, rtol=1e-4)

    with Engine(m, slots=1, max_len=48, chunk=64, reuse_prefix=4, block_size=16) as eng:
        list(eng.generate([Group(buf, [ORIGINAL])], cfg))
        buf[20:] = torch.randint(3, 90, (20,), generator=g).numpy()  # the same first 20 tokens, a new rest
        (res,) = eng.generate([Group(buf.tolist(), [ORIGINAL])], cfg)
        assert res.reused == 16  # one whole block
        exact(res, buf)

        def boom(module, args, kwargs):
            raise RuntimeError("out of memory")

        hook = m.model.layers[2].register_forward_pre_hook(boom, with_kwargs=True)
        try:
            with pytest.raises(RuntimeError, match="out of memory"):
                list(eng.generate([Group(other, [ORIGINAL])], cfg))  # takes blocks, then fails
        finally:
            hook.remove()
        assert eng.blocks.n_used == 0
        eng.blocks.check()
        (res,) = eng.generate([Group(other, [ORIGINAL])], cfg)
        assert res.reused == 0
        exact(res, other)
        (res,) = eng.generate([Group(buf.tolist(), [ORIGINAL])], cfg)
        assert res.reused == 32
        exact(res, buf)
    with Engine(m, slots=2, max_len=32, reuse_prefix=10**9) as big:  # capped at max_len
        assert big.reuse_prefix == 32


@pytest.mark.parametrize("slots", [4, 12, 36])
def test_prefix_reuse_for_groups_with_heads_off_over_the_prompt(family, slots):
    """NIAH's causal check: groups of the original, a scope-`all` ablation, a scope-`generated` one and a
    scope-`all` set from layer 0 (so the group shares no layer) take each stream's cached blocks (stored once
    for the rows that read the prompt alike). Every row equals its definition and a run without reuse. The
    tokens computed are the block prefix tree's, with one group at a time, 3, or all 9 admitted together
    (prefilled in two passes: a root per cluster first)."""
    _, m, ref, zeroed = family
    ps = _niah_like()
    pols = [ORIGINAL, Policy(HEADS), Policy(HEADS, "generated"), Policy(HeadSet.from_list("0-1,3-3"), name="low")]
    order = prefix_order(ps)
    out, stats = {}, {}
    for reuse in (0, 8):
        with Engine(m, slots=slots, max_len=56, chunk=7, reuse_prefix=reuse, block_size=16) as eng:
            seen = []

            def check(_):  # which segment each decoding row reads its prompt from, at the top layer
                act = [s for s in range(eng.slots) if not eng._idle[s]]
                if act:  # (after a step that ended every row: none)
                    seen.append((len(act), Counter(eng.row_seg[-1, act].tolist())))

            out[reuse] = {r.key: r for r in eng.generate([Group(ps[i], pols, key=i) for i in order],
                                                        GenConfig(max_new_tokens=6, keep_logits=True), check)}
            stats[reuse] = eng.stats
            # every group's 4 rows decode together: its original and scope-`generated` rows read one segment,
            # the two scope-`all` rows one each
            for n, c in seen:
                assert -1 not in c and sorted(c.values()) == sorted([1, 1, 2] * (n // 4)), (n, c)
            assert seen
    assert stats[8]["reused_tokens"] > 0.3 * stats[0]["prompt_tokens"]
    assert stats[8]["prompt_tokens"] == _block_tree_size([p[:-1] for p in ps])
    for i, p in enumerate(ps):
        for a, b in zip(out[0][i].rows, out[8][i].rows):
            assert a.tokens == b.tokens, (i, a.policy)
            torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
        rows = out[8][i].rows
        assert rows[0].tokens == hf_greedy(ref, p, 6) and rows[1].tokens == hf_greedy(zeroed, p, 6)
        assert rows[2].tokens == generated_scope_greedy(ref, zeroed, p, 6)


def test_a_finished_groups_blocks_survive_idle_decode_steps(family):
    """A finished group's full prompt blocks stay cached while other rows decode (idle rows write only to
    the trash block, new blocks come from the free list first), and a later group with its bitmap takes
    them exactly."""
    _, m, ref, zeroed = family
    ps = _niah_like()
    x, y = prompts(seed=11, lens=(20, 20))
    cfg = GenConfig(max_new_tokens=12, keep_logits=True)
    with Engine(m, slots=3, max_len=56, chunk=7, reuse_prefix=8, block_size=16) as eng:
        list(eng.generate([Group(x, [ORIGINAL], key="x"), Group(ps[0], [Policy(HEADS)], key="a")], cfg))
        cached = sorted(eng.blocks._key)
        assert len(cached) == 1 + 2 * 2  # x: one block; a: two, for its base and for its stream
        held = [(eng.k[l][cached].clone(), eng.v[l][cached].clone()) for l in range(4)]
        list(eng.generate([Group(y, [ORIGINAL])], cfg))  # 12 decode steps with two slots idle
        for l, (k, v) in enumerate(held):
            assert torch.equal(eng.k[l][cached], k) and torch.equal(eng.v[l][cached], v), l
        (c,) = eng.generate([Group(ps[1], [Policy(HEADS)] * 3)], cfg)
    assert c.reused == 16  # the haystack before c's needle, in whole blocks, from a's
    for row in c.rows:
        with torch.no_grad():
            full = zeroed(torch.tensor([ps[1] + row.tokens[:-1]])).logits[0, len(ps[1]) - 1:]
        torch.testing.assert_close(row.logits, full.float(), atol=2e-4, rtol=1e-4)
        assert row.tokens == hf_greedy(zeroed, ps[1], 12)


def test_the_incremental_core_adds_steps_and_aborts(family):
    """`start`/`add`/`step`/`abort`/`finish`, the loop `generate` runs and a server drives: a group added
    while others decode and the groups left after aborting one running and one queued group give the
    tokens of a plain `generate` over the same groups; an aborted group's blocks are freed at once and it
    never returns; every block is free after `finish`."""
    _, m, ref, zeroed = family
    pair = [ORIGINAL, Policy(HEADS)]
    ps = prompts(seed=9, lens=(14, 20, 9, 17, 12))
    cfg = GenConfig(max_new_tokens=NEW)
    with Engine(m, slots=4, max_len=48, block_size=16) as eng:
        want = {r.key: [row.tokens for row in r.rows]
                for r in eng.generate([Group(p, pair, key=i) for i, p in enumerate(ps)], cfg)}
        eng.start(cfg, max_group_rows=2)
        for i in (0, 1, 2, 3):
            eng.add(Group(ps[i], pair, key=i))
        got = {}
        for r in eng.step():  # admits groups 0 and 1 (4 slots), prefills them, one decode step
            got[r.key] = r
        assert eng.abort(1) and eng.abort(3)  # 1 is decoding, 3 is queued
        assert not eng.abort("no such key")
        assert 1 not in eng._run_state.st.groups and all(g.key != 3 for g in eng._run_state.queue)
        eng.add(Group(ps[4], pair, key=4))  # joins while 0 decodes
        while eng.busy:
            for r in eng.step():
                got[r.key] = r
        eng.finish()
        assert eng.blocks.n_used == 0
        eng.blocks.check()
    assert sorted(got) == [0, 2, 4]
    for k, r in got.items():
        assert [row.tokens for row in r.rows] == want[k]
        assert r.rows[0].tokens == hf_greedy(ref, ps[k]) and r.rows[1].tokens == hf_greedy(zeroed, ps[k])
