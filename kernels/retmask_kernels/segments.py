"""Rows grouped by the shared segment they read: what the shared decode kernel walks."""

from __future__ import annotations

from typing import NamedTuple

import torch


class SegmentLayout(NamedTuple):
    """`order`: row indices sorted by segment (rows with no segment first, stable); `starts[g]`:
    index in `order` of segment g's first row; `counts[g]`: its rows. All int32, shaped like
    `row_seg` with the last dimension B (order) or G (starts, counts)."""

    order: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor

    def select(self, i: int) -> "SegmentLayout":
        """The layout of entry i of a batched layout (e.g. one layer of an (L, B) row_seg)."""
        return SegmentLayout(self.order[i], self.starts[i], self.counts[i])


def segment_layout(row_seg: torch.Tensor, n_seg: int) -> SegmentLayout:
    """Group rows by segment, for `(B,)` or batched `(..., B)` row_seg (-1: no segment).

    Device ops only (no host sync). `masked_decode` computes this itself on every call; a caller
    whose row_seg changes only when rows join or leave (the engine) computes it then and passes
    `seg_layout=`, saving the sort at every layer of every step."""
    seg64 = row_seg.to(torch.int64)
    order = torch.argsort(seg64, dim=-1, stable=True).to(torch.int32)
    counts = torch.zeros(*seg64.shape[:-1], n_seg + 1, dtype=torch.int32, device=row_seg.device)
    counts.scatter_add_(-1, seg64 + 1, torch.ones_like(seg64, dtype=torch.int32))
    starts = (torch.cumsum(counts, -1) - counts)[..., 1:].to(torch.int32).contiguous()
    return SegmentLayout(order.contiguous(), starts, counts[..., 1:].contiguous())
