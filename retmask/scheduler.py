"""Scheduling by blocks: the rules that decide when a waiting group is admitted and which rows take a
block at a step. Pure functions over host arrays, shared by the engine and by the capacity benchmark's
simulation (`benchmarks/bench_capacity.py`), so the benchmark measures the rules the engine runs.

- A group is admitted when the free blocks hold its prompt (once per segment, as if nothing were
  cached) and a first block per row, beside a reserve of one block per running row: each running row
  takes its next block within `block_size` steps, so admitting into that reserve would preempt a group
  soon after.
- At each step, every running row whose next private position starts a block takes one.
- When too few blocks are free for that, the most recently admitted group is preempted (its blocks
  freed, requeued first); the oldest group is never preempted, so a group that fits the pool alone
  always finishes.
"""

from __future__ import annotations

import numpy as np

from .cache_plan import blocks_for


def group_need(prompt_len: int, n_segs: int, rows: int, block_size: int) -> int:
    """Blocks a group takes at admission: its prompt (all but the last token) per segment, and a first
    block per row."""
    return blocks_for(max(prompt_len - 1, 0), block_size) * n_segs + rows


def rows_needing_blocks(active: np.ndarray, n_run: np.ndarray, max_new: int, block_size: int) -> np.ndarray:
    """Rows whose next decode step writes the first position of a block (a row past its last step writes
    to the trash block and takes none)."""
    return np.flatnonzero(active & (n_run < max_new) & (n_run % block_size == 0))


def admission_room(n_free: int, n_active: int, step_need: int) -> int:
    """Blocks waiting groups may take now: the free ones less the next step's and a reserve of one per
    running row (that row's next block)."""
    return n_free - step_need - n_active
