"""Next-token choice per row: greedy, or sampling that depends only on (row seed, step).

Sampling is Gumbel-max (`retmask.kernels.gumbel_argmax`: one pass over the logits on CUDA) with
noise from a counter-based hash of (seed, step, token id), over the tokens that survive the
top-k and top-p cuts, each cut expressed as a per-row score floor. So a row's tokens depend on its
seed and its own logits alone, never on which rows share its batch, the order of slots, or the
device.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .kernels import gumbel_argmax


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit

    def __post_init__(self):
        real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731
        if not real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature={self.temperature!r}: must be a finite number >= 0 (0 = greedy)")
        if self.temperature > 0 and not 1 / self.temperature < math.inf:
            raise ValueError(f"temperature={self.temperature!r}: too small to divide the logits by; use 0 for greedy")
        if not real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must lie in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an int >= 0 (0 = no limit)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def score_floor(logits: torch.Tensor, cfg: Sampling) -> torch.Tensor | None:
    """(B,) float64 floor on the scores `logits / temperature` that the top-k and top-p cuts leave
    (None when neither cuts). Top-k keeps the scores at least the k-th largest; top-p then keeps,
    of those, the highest scores down to the first whose cumulative probability (mass before it
    plus its own) reaches top_p. Both cut by value, so tokens tied with the last kept one are kept
    too, whatever order a sort gives them."""
    v = logits.shape[-1]
    cut_k = 0 < cfg.top_k < v
    if not cut_k and cfg.top_p >= 1.0:
        return None
    # Sort (or top-k) the logits in their own dtype, a quarter of float64's bytes for bf16: x * (1/T)
    # never decreases as x grows, so sorting commutes with it, and the sorted logits scaled in
    # float64 are the kernel's scores bit for bit.
    inv_t = 1.0 / cfg.temperature
    if not cut_k:
        srt = logits.sort(dim=-1, descending=True).values.double() * inv_t
    else:
        srt = logits.topk(cfg.top_k, dim=-1).values.double() * inv_t  # sorted, descending
        if cfg.top_p >= 1.0:
            return srt[:, -1]
    probs = torch.softmax(srt, dim=-1)  # renormalized over the top-k when cut
    before = probs.cumsum(-1) - probs  # mass strictly before each sorted score
    # the last kept position; >= 0 (clamped for a row with no finite score, whose floor is then -inf)
    last = ((before < cfg.top_p).sum(-1, keepdim=True) - 1).clamp(min=0)
    return srt.gather(-1, last).squeeze(-1)


def next_tokens(logits: torch.Tensor, cfg: Sampling, seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> tokens (B,) int64 on the logits' device; seed, step: (B,) int64."""
    if cfg.greedy:
        return logits.argmax(-1)
    return gumbel_argmax(logits, seed, step, 1.0 / cfg.temperature, score_floor(logits, cfg))
