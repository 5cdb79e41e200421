"""The retrieval score of Wu et al. ("Retrieval Head Mechanistically Explains Long-Context
Factuality", `retrieval_head_detection.py`), as pure functions.

For one needle test, a head scores 1/|span| at every decode step where its attention argmax lies in
the answer span of the prompt and the prompt token there equals the token generated at that step.
A test counts only when the ROUGE-1 recall (stemmed) of the answer against the decoded response is
above 50 %; a head's score is the mean of its per-test scores over the counted tests.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch


def retrieval_scores(prompt_ids, span: tuple[int, int], generated_ids, argmax: torch.Tensor) -> torch.Tensor:
    """One test's (layers, heads) retrieval scores, all heads at once on argmax's device.

    Args:
        prompt_ids: (P,) token ids of the prompt.
        span: (start, end) of the answer in the prompt, end exclusive; (-1, -1) for none.
        generated_ids: (T,) the token generated at each decode step.
        argmax: (T, layers, heads) int key position of each head's largest attention score at each
            step (-1 for a head that is off; positions >= P are generated tokens).
    Returns:
        float32 (layers, heads): sum over steps of 1/(end - start) for each hit.
    """
    if argmax.dim() != 3:
        raise ValueError(f"argmax must be (steps, layers, heads), got shape {tuple(argmax.shape)}")
    dev = argmax.device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=dev).reshape(-1)  # (P,)
    gen = torch.as_tensor(generated_ids, dtype=torch.long, device=dev).reshape(-1)  # (T,)
    T, L, H = argmax.shape
    if gen.numel() != T:
        raise ValueError(f"generated_ids has {gen.numel()} tokens but argmax has {T} steps")
    start, end = int(span[0]), int(span[1])
    out = torch.zeros(L, H, dtype=torch.float32, device=dev)
    if start < 0 or end <= start or T == 0 or prompt.numel() == 0:
        return out
    pos = argmax.long()  # (T, L, H)
    inside = (pos >= start) & (pos < min(end, prompt.numel()))
    tok = prompt[pos.clamp(0, prompt.numel() - 1)]  # (T, L, H) prompt token at each argmax
    hit = inside & (tok == gen[:, None, None])
    return hit.sum(0).to(torch.float32) / (end - start)


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
