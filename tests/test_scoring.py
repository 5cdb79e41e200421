"""The retrieval score as a pure function, against a per-head loop written from the definition."""

import pytest
import torch

from retmask.niah import find_span
from retmask.scoring import counted, retrieval_scores, rouge1_recall


def loop_oracle(prompt, span, gen, argmax):
    """Literal transcription of the definition: per step, per layer, per head."""
    T, L, H = argmax.shape
    out = torch.zeros(L, H, dtype=torch.float64)
    s, e = span
    for t in range(T):
        for l in range(L):
            for h in range(H):
                i = int(argmax[t, l, h])
                if s <= i < e and i < len(prompt) and prompt[i] == gen[t]:
                    out[l, h] += 1 / (e - s)
    return out


def test_hand_case():
    prompt = [5, 6, 7, 8, 9, 10]  # answer span = tokens 7 8 9 at [2, 5)
    gen = [7, 8, 9, 3]
    am = torch.full((4, 2, 2), 0, dtype=torch.long)
    am[0, 0, 0], am[1, 0, 0], am[2, 0, 0] = 2, 3, 4  # head (0,0) copies all three: 3 hits
    am[0, 1, 1] = 3  # points into the span but at token 8 while 7 is generated: no hit
    am[1, 1, 1] = 3  # token 8 generated, points at 8: one hit
    am[3, 0, 1] = 5  # outside the span
    am[2, 1, 0] = -1  # a head that is off
    got = retrieval_scores(prompt, (2, 5), gen, am)
    want = torch.tensor([[1.0, 0.0], [0.0, 1 / 3]])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("seed", range(5))
def test_random_against_loop(seed):
    g = torch.Generator().manual_seed(seed)
    P, T, L, H = 40, 12, 3, 5
    prompt = torch.randint(0, 6, (P,), generator=g).tolist()  # small vocab: many token matches
    gen = torch.randint(0, 6, (T,), generator=g).tolist()
    am = torch.randint(-1, P + T, (T, L, H), generator=g)
    span = (10, 17)
    got = retrieval_scores(prompt, span, gen, am)
    torch.testing.assert_close(got.double(), loop_oracle(prompt, span, gen, am))
    assert got.sum() > 0  # the case exercises hits


def test_no_span_and_shapes():
    am = torch.zeros(3, 2, 2, dtype=torch.long)
    assert retrieval_scores([1, 2, 3], (-1, -1), [1, 2, 3], am).abs().sum() == 0
    with pytest.raises(ValueError, match="argmax"):
        retrieval_scores([1], (0, 1), [1], torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="generated_ids"):
        retrieval_scores([1], (0, 1), [1, 2], am)


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
