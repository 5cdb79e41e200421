"""The retrieval score of Wu et al. ("Retrieval Head Mechanistically Explains Long-Context
Factuality", `retrieval_head_detection.py`), as pure functions.

A decode step is a *hit* for a head when the head's attention argmax lies in the answer span k of
the prompt and the prompt token there equals the token generated at that step. Two rules turn hits
into one test's score:

- `reference` (the reference code's `retrieval_calculate`, the default): 1/|k| for every hit step.
  A span position copied at several steps counts each time, so a test's score may exceed 1.
- `paper` (the paper's |g_h ∩ k| / |k|): the set g_h of span positions the head hit, over |k|. Each
  position counts at most once per head and test, so scores lie in [0, 1].

A test counts only when the ROUGE-1 recall (stemmed) of the answer against the decoded response is
above 50 %; a head's score is the mean of its per-test scores over the counted tests.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

RULES = ("reference", "paper")


def retrieval_scores(prompt_ids, span: tuple[int, int], generated_ids, argmax: torch.Tensor) -> torch.Tensor:
    """One test's (layers, heads) retrieval scores under the `reference` rule, all heads at once on
    argmax's device.

    Args:
        prompt_ids: (P,) token ids of the prompt.
        span: (start, end) of the answer in the prompt, end exclusive; (-1, -1) for none. Positions
            at or past P are never hit (the span is cut at the prompt's end; |k| stays end - start).
        generated_ids: (T,) the token generated at each decode step.
        argmax: (T, layers, heads) int key position of each head's largest attention score at each
            step (-1 for a head that is off; positions >= P are generated tokens).
    Returns:
        float32 (layers, heads): sum over steps of 1/(end - start) for each hit (may exceed 1).
    """
    return retrieval_scores_by_rule(prompt_ids, span, generated_ids, argmax)["reference"]


def paper_retrieval_scores(prompt_ids, span: tuple[int, int], generated_ids, argmax: torch.Tensor) -> torch.Tensor:
    """One test's (layers, heads) retrieval scores under the `paper` rule, |g_h ∩ k| / |k|: the
    distinct span positions each head hit, over end - start (in [0, 1]). Arguments as `retrieval_scores`."""
    return retrieval_scores_by_rule(prompt_ids, span, generated_ids, argmax)["paper"]


def retrieval_scores_by_rule(prompt_ids, span: tuple[int, int], generated_ids,
                             argmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both rules' float32 (layers, heads) scores from one pass over the hits: {"reference", "paper"}.
    Arguments as `retrieval_scores`."""
    if argmax.dim() != 3:
        raise ValueError(f"argmax must be (steps, layers, heads), got shape {tuple(argmax.shape)}")
    dev = argmax.device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=dev).reshape(-1)  # (P,)
    gen = torch.as_tensor(generated_ids, dtype=torch.long, device=dev).reshape(-1)  # (T,)
    T, L, H = argmax.shape
    if gen.numel() != T:
        raise ValueError(f"generated_ids has {gen.numel()} tokens but argmax has {T} steps")
    start, end = int(span[0]), int(span[1])
    stop = min(end, prompt.numel())  # span positions past the prompt are never hit
    if start < 0 or end <= start or stop <= start or T == 0:
        return {r: torch.zeros(L, H, dtype=torch.float32, device=dev) for r in RULES}
    pos = argmax.long()  # (T, L, H)
    inside = (pos >= start) & (pos < stop)
    tok = prompt[pos.clamp(0, prompt.numel() - 1)]  # (T, L, H) prompt token at each argmax
    hit = inside & (tok == gen[:, None, None])  # (T, L, H)
    # hits per (head, span position), counted by scatter over the steps (no (T, L, H, span) one-hot)
    idx = (pos - start).clamp(0, stop - start - 1).permute(1, 2, 0)  # (L, H, T) span offset of each argmax
    per_pos = torch.zeros(L, H, stop - start, dtype=torch.int32, device=dev)
    per_pos.scatter_add_(-1, idx, hit.permute(1, 2, 0).to(torch.int32))  # (L, H, stop - start)
    return {"reference": hit.sum(0).to(torch.float32) / (end - start),
            "paper": (per_pos > 0).sum(-1).to(torch.float32) / (end - start)}


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1_recall(reference: str, response: str) -> float:
    """ROUGE-1 recall (stemmed) of `reference` in `response`, in percent (the reference's unit)."""
    return 100.0 * _scorer().score(reference, response)["rouge1"].recall


def counted(rouge: float) -> bool:
    return rouge > 50.0


def head_means(per_test: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean (layers, heads) score over counted tests (zeros when none)."""
    if not per_test:
        raise ValueError("no counted tests: nothing to average")
    return torch.stack([t.float() for t in per_test]).mean(0)
