"""The retrieval score (both rules) as pure functions, against per-head loops written from the definitions."""

import pytest
import torch

from retmask.niah import find_span
from retmask.scoring import counted, paper_retrieval_scores, retrieval_scores, retrieval_scores_by_rule, rouge1_recall


def loop_oracle(prompt, span, gen, argmax):
    """Literal transcription of the definition: per step, per layer, per head."""
    T, L, H = argmax.shape
    out = torch.zeros(L, H, dtype=torch.float64)
    s, e = span
    for t in range(T):
        for layer in range(L):
            for h in range(H):
                i = int(argmax[t, layer, h])
                if s <= i < e and i < len(prompt) and prompt[i] == gen[t]:
                    out[layer, h] += 1 / (e - s)
    return out


def paper_loop_oracle(prompt, span, gen, argmax):
    """The paper's |g_h ∩ k| / |k|: per head, the set of span positions its argmax copied from at any step."""
    T, L, H = argmax.shape
    s, e = span
    hits = {(layer, h): set() for layer in range(L) for h in range(H)}
    for t in range(T):
        for layer in range(L):
            for h in range(H):
                i = int(argmax[t, layer, h])
                if s <= i < e and i < len(prompt) and prompt[i] == gen[t]:
                    hits[layer, h].add(i)
    out = torch.zeros(L, H, dtype=torch.float64)
    if s >= 0 and e > s:
        for (layer, h), g in hits.items():
            out[layer, h] = len(g) / (e - s)
    return out


def both(prompt, span, gen, am):
    got = retrieval_scores_by_rule(prompt, span, gen, am)
    assert set(got) == {"reference", "paper"}
    torch.testing.assert_close(got["reference"], retrieval_scores(prompt, span, gen, am), atol=0, rtol=0)
    torch.testing.assert_close(got["paper"], paper_retrieval_scores(prompt, span, gen, am), atol=0, rtol=0)
    assert got["paper"].dtype == got["reference"].dtype == torch.float32
    return got["reference"], got["paper"]


def test_hand_case():
    prompt = [5, 6, 7, 8, 9, 10]  # answer span = tokens 7 8 9 at [2, 5)
    gen = [7, 8, 9, 3]
    am = torch.full((4, 2, 2), 0, dtype=torch.long)
    am[0, 0, 0], am[1, 0, 0], am[2, 0, 0] = 2, 3, 4  # head (0,0) copies all three: 3 hits
    am[0, 1, 1] = 3  # points into the span but at token 8 while 7 is generated: no hit
    am[1, 1, 1] = 3  # token 8 generated, points at 8: one hit
    am[3, 0, 1] = 5  # outside the span
    am[2, 1, 0] = -1  # a head that is off
    ref, paper = both(prompt, (2, 5), gen, am)
    want = torch.tensor([[1.0, 0.0], [0.0, 1 / 3]])  # every hit at a distinct position: the rules agree
    torch.testing.assert_close(ref, want)
    torch.testing.assert_close(paper, want)


def test_repeated_hits_count_again_under_reference_once_under_paper():
    prompt = [5, 6, 7, 7, 9, 10]  # answer span [2, 5) = tokens 7 7 9
    gen = [7, 7, 7, 7, 9]
    am = torch.zeros(5, 1, 3, dtype=torch.long)
    am[:4, 0, 0] = 2  # head 0 copies position 2 at four steps
    am[4, 0, 0] = 4  # and position 4 once
    am[:4, 0, 1] = torch.tensor([2, 3, 2, 3])  # head 1 alternates between the two 7s
    am[:, 0, 2] = 1  # head 2 never looks into the span
    ref, paper = both(prompt, (2, 5), gen, am)
    torch.testing.assert_close(ref, torch.tensor([[5 / 3, 4 / 3, 0.0]]))  # above 1: hits count again
    torch.testing.assert_close(paper, torch.tensor([[2 / 3, 2 / 3, 0.0]]))  # positions {2, 4} and {2, 3}


@pytest.mark.parametrize("span", [(3, 6), (3, 8), (5, 9), (6, 9), (-1, -1), (4, 4), (5, 3)])
def test_spans_at_the_prompt_edge_and_empty(span):
    """A span ending at or past the prompt's end is cut there (|k| stays end - start); a span starting at
    the end, (-1, -1) or start >= end scores zero under both rules."""
    prompt = [1, 2, 3, 4, 4, 4]  # P = 6
    gen = [4, 4, 4, 4]
    am = torch.tensor([[[3, 4], [5, 6]], [[4, 4], [5, 7]], [[5, 5], [3, 8]], [[3, 2], [4, 6]]])  # (4, 2, 2)
    ref, paper = both(prompt, span, gen, am)
    torch.testing.assert_close(ref.double(), loop_oracle(prompt, span, gen, am))
    torch.testing.assert_close(paper.double(), paper_loop_oracle(prompt, span, gen, am))
    if span in ((3, 6), (3, 8)):
        assert ref.sum() > 0 and (ref > paper).any()  # hits, some repeated
        assert paper[0, 0] == 3 / (span[1] - span[0])  # positions 3, 4, 5: the last prompt token counts
    if span[0] >= 6 or span[0] < 0 or span[1] <= span[0]:
        assert ref.abs().sum() == 0 and paper.abs().sum() == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_against_loop(seed):
    g = torch.Generator().manual_seed(seed)
    P, T, L, H = 40, 12, 3, 5
    prompt = torch.randint(0, 6, (P,), generator=g).tolist()  # small vocab: many token matches
    gen = torch.randint(0, 6, (T,), generator=g).tolist()
    am = torch.randint(-1, P + T, (T, L, H), generator=g)
    span = (10, 17)
    ref, paper = both(prompt, span, gen, am)
    torch.testing.assert_close(ref.double(), loop_oracle(prompt, span, gen, am))
    torch.testing.assert_close(paper.double(), paper_loop_oracle(prompt, span, gen, am))
    assert ref.sum() > 0  # the case exercises hits
    assert ((paper >= 0) & (paper <= 1)).all() and (paper <= ref + 1e-6).all()


@pytest.mark.parametrize("seed", range(3))
def test_paper_rule_stays_in_unit_interval_when_heads_copy_at_every_step(seed):
    """Heads that sit in the span at every step and always copy: the reference rule passes 1, the paper rule
    reaches 1 exactly when every span position was hit."""
    g = torch.Generator().manual_seed(seed)
    P, T, L, H = 20, 30, 2, 3
    prompt = [7] * P  # every position holds the generated token: every look into the span is a hit
    gen = [7] * T
    span = (4, 9)
    am = torch.randint(4, 9, (T, L, H), generator=g)
    am[:5, 0, 0] = torch.arange(4, 9)  # head (0, 0) visits every span position
    ref, paper = both(prompt, span, gen, am)
    torch.testing.assert_close(ref, torch.full((L, H), T / 5))
    torch.testing.assert_close(paper.double(), paper_loop_oracle(prompt, span, gen, am))
    assert paper[0, 0] == 1 and paper.max() <= 1


def test_no_span_and_shapes():
    am = torch.zeros(3, 2, 2, dtype=torch.long)
    assert retrieval_scores([1, 2, 3], (-1, -1), [1, 2, 3], am).abs().sum() == 0
    for fn in (retrieval_scores, paper_retrieval_scores):
        assert fn([1, 2, 3], (0, 2), [1, 2, 3], am).shape == (2, 2)
        assert fn([], (0, 2), [1, 2, 3], am).abs().sum() == 0  # an empty prompt has nothing to copy
        with pytest.raises(ValueError, match="argmax"):
            fn([1], (0, 1), [1], torch.zeros(3, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="generated_ids"):
            fn([1], (0, 1), [1, 2], am)


def test_find_span_overlap_rule():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    assert find_span(prompt, [4, 5, 6]) == (3, 6)
    assert find_span(prompt, [9, 10]) == (-1, -1)
    # 9 of 10 distinct tokens is not > 90 %: no match; 10 of 10 is
    ans = list(range(100, 110))
    assert find_span([0] + ans[:9] + [0], ans) == (-1, -1)
    assert find_span([0] + ans + [0], ans) == (1, 11)


def test_rouge_recall_rule():
    assert rouge1_recall("sigma jade plum forty", "the code is sigma jade plum forty .") == pytest.approx(100)
    r = rouge1_recall("sigma jade plum forty", "sigma jade")
    assert r == pytest.approx(50) and not counted(r)
    assert counted(rouge1_recall("walking in the parks", "walk in the park"))  # stemmed
