"""Gumbel-max sampling in one pass over the logits (the reference is `reference.gumbel_argmax_reference`).

A row's token is `argmax_v (logits[v] * inv_t + g(seed, step, v))` over the tokens whose scaled
score `logits[v] * inv_t` is at least the row's `floor` (top-k / top-p cut; none: every token),
where `g = -log(-log(u))` is Gumbel noise from a counter hash: `u` in (0, 1) is splitmix64 of
(seed, step, v). All of it in float64. So the token depends on the row's seed, its step and its
own logits only: never on the other rows of the batch, their order, or the device.

The reference materializes the (B, V) noise in float64: at B = 512 and V = 128K that is about 20
elementwise passes over 0.5 GB each, milliseconds per decode step on an H200 (a large share of a
batched decode step). The Triton kernel reads the logits once and makes the noise in registers:
one program per (row, vocabulary split), each keeping a per-lane running best, then a (B, splits)
reduction. Ties go to the lowest token id in both, as `torch.argmax`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_sampling
from ._launch import alloc, interpreting, sm_count
from .reference import C1, C2, C3

_C1 = tl.constexpr(C1)
_C2 = tl.constexpr(C2)
_C3 = tl.constexpr(C3)


@triton.jit
def _gumbel_split(
    LOGITS, SEED, STEP, FLOOR, INV_T, BEST, IDX, stride_b, V, SPLIT_LEN,
    HAS_FLOOR: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    lo = s * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, V)
    seed = tl.load(SEED + b).to(tl.uint64)
    step = tl.load(STEP + b).to(tl.uint64)
    h0 = seed * _C1 + step * _C2 + _C1  # the row's part of the hash input (wraps mod 2**64)
    floor = float("-inf")
    if HAS_FLOOR:
        floor = tl.load(FLOOR + b)
    inv_t = tl.load(INV_T)  # float64 (a scalar argument would reach the GPU as float32)
    row = LOGITS + b.to(tl.int64) * stride_b
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float64)
    best_i = tl.full([BLOCK], 0, tl.int32) + lo
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        m = idx < hi
        sc = tl.load(row + idx, mask=m, other=float("-inf")).to(tl.float64) * inv_t
        x = h0 + idx.to(tl.uint64) * _C3
        x = (x ^ (x >> 30)) * _C2
        x = (x ^ (x >> 27)) * _C3
        x = x ^ (x >> 31)
        u = ((x >> 12).to(tl.float64) + 0.5) * 2.220446049250313e-16  # / 2**52, exact; in (0, 1)
        key = sc - tl.log(-tl.log(u))  # float64: libdevice's log on CUDA
        key = tl.where(m & (sc >= floor), key, float("-inf"))
        better = key > best  # strict: each lane keeps its first (lowest) best token
        best = tl.where(better, key, best)
        best_i = tl.where(better, idx, best_i)
    top = tl.max(best, 0)
    first = tl.min(tl.where(best == top, best_i, V), 0)  # the lowest token id reaching the top
    tl.store(BEST + b * tl.num_programs(1) + s, top)
    tl.store(IDX + b * tl.num_programs(1) + s, first)


_INV_T: dict[tuple, torch.Tensor] = {}


def _inv_t_tensor(inv_t: float, dev: torch.device) -> torch.Tensor:
    """1/T as a float64 device tensor (the kernel scales in float64), made once per value and device and
    kept (a few bytes each; never freed, so no queued kernel or captured graph reads a reused block): a
    fresh one would be a host-to-device copy that waits for the GPU at every decode step."""
    key = (inv_t, dev)
    if key not in _INV_T:
        t = torch.tensor([inv_t], dtype=torch.float64)
        _INV_T[key] = t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t.to(dev)
    return _INV_T[key]


def gumbel_argmax_triton(logits, seed, step, inv_t: float, floor=None, *, block: int = 1024) -> torch.Tensor:
    """Triton launcher of `gumbel_argmax`; inputs as there."""
    check_sampling(logits, seed, step, inv_t, floor)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    b, v = logits.shape
    dev = logits.device
    if b == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    if interpreting(logits):
        block, splits = 64, max(1, min(3, triton.cdiv(v, 64)))
    else:  # enough programs to fill the GPU at any batch, each at least a few blocks long
        splits = max(1, min(triton.cdiv(2 * sm_count(dev), b), triton.cdiv(v, 4 * block)))
    split_len = triton.cdiv(triton.cdiv(v, splits), block) * block
    splits = triton.cdiv(v, split_len)
    best = alloc(b, splits, dtype=torch.float64, device=dev)
    idx = alloc(b, splits, dtype=torch.int32, device=dev)
    fl = floor.to(dev, torch.float64).contiguous() if floor is not None else best
    _gumbel_split[(b, splits)](
        logits, seed.to(dev, torch.int64).contiguous(), step.to(dev, torch.int64).contiguous(), fl,
        _inv_t_tensor(float(inv_t), dev), best, idx,
        logits.stride(0), v, split_len, HAS_FLOOR=floor is not None, BLOCK=block,
    )
    # the first split holding the row's maximum (argmax keeps the first), then its token
    return idx.gather(1, best.argmax(1, keepdim=True)).squeeze(1).to(torch.int64)
