"""Next-token choice per row: greedy, or sampling that depends only on (row seed, step).

Sampling is Gumbel-max over the filtered logits (temperature, top-k, top-p), with the Gumbel noise
drawn from a counter-based hash of (seed, step, token id). So a row's tokens depend on its seed
and its own logits alone, never on which rows share its batch or on the order of slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M64 = (1 << 64) - 1


def _s64(x: int) -> int:  # a uint64 constant as the int64 torch holds
    return x - (1 << 64) if x >= 1 << 63 else x


_C1, _C2, _C3 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def uniform(seed: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) floats in (0, 1) from splitmix64 of (seed, step, index); seed, step: (B,) int64."""
    idx = torch.arange(n, device=seed.device, dtype=torch.int64)
    x = seed[:, None] * _C1 + step[:, None] * _C2 + idx[None, :] * _C3  # wraps mod 2**64
    x = x + _C1
    x = (x ^ _lsr(x, 30)) * _C2
    x = (x ^ _lsr(x, 27)) * _C3
    x = x ^ _lsr(x, 31)
    return (_lsr(x, 11).double() + 0.5) / float(1 << 53)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must lie in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = no limit)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_tokens(logits: torch.Tensor, cfg: Sampling, seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> tokens (B,) int64."""
    if cfg.greedy:
        return logits.argmax(-1)
    scores = logits.float() / cfg.temperature  # (B, V)
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        kth = scores.topk(cfg.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        srt, order = scores.sort(dim=-1, descending=True)
        probs = srt.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        drop = before >= cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        scores = scores.scatter(-1, order, srt.masked_fill(drop, float("-inf")))
    dev = scores.device  # the (B, V) noise is made where the logits are, never on the host
    u = uniform(seed.to(dev, torch.int64), step.to(dev, torch.int64), scores.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    return (scores.double() + gumbel).argmax(-1)
