"""How the engine sizes its KV memory, from the model's shape alone (no weights, no engine): the block
size, the blocks of the pool, the rows decoded together, and what one prefill pass stages.

`plan_cache` is the one place memory is decided. `Engine` sizes itself with it, and so do
`retmask niah --plan` and `causal.memory_plan`, without building anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Block sizes the decode kernel takes (tokens per block, a power of two).
BLOCK_SIZES = (16, 32, 64, 128, 256)
# 32 tokens: each token's K (or V) row of one KV head is head_dim contiguous elements (256 bytes at
# head_dim 128 in bf16, two full 128-byte sectors), so the decode kernel's loads are coalesced at any
# block size >= 16 and a 64-key Hopper tile spans two blocks at no cost. A smaller block wastes less
# (a sequence's last block is half empty on average: 16 tokens, 3 % of a 560-token chat row) and a
# larger one makes fewer table entries; 32 keeps allocated memory within a few percent of what is
# held at about 2 % table overhead.
DEFAULT_BLOCK_SIZE = 32
# Rows decoded together when only a KV budget is given: past this many, an 8B model's decode step
# on an H100 turns compute-bound, so more rows add latency without adding tokens per second.
DEFAULT_MAX_SLOTS = 512


def token_bytes(n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K/V bytes of one token at one layer."""
    elt = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return 2 * n_kv_heads * head_dim * elt


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size!r}: the kernels take {', '.join(map(str, BLOCK_SIZES))} "
                         f"tokens per block; use one of them (default {DEFAULT_BLOCK_SIZE})")
    return block_size


@dataclass(frozen=True)
class CachePlan:
    """The engine's memory: `n_blocks` blocks of `block_size` tokens at every layer (one of them the
    trash block idle rows write to), `slots` rows decoded together, and up to `staging_bytes` of K/V one
    prefill pass holds besides the pool."""

    n_layers: int
    block_size: int
    n_blocks: int
    slots: int
    block_bytes: int  # one block at every layer
    staging_bytes: int
    max_len: int

    @property
    def pool_bytes(self) -> int:
        return self.n_blocks * self.block_bytes

    @property
    def usable_blocks(self) -> int:
        """Blocks rows can hold (all but the trash block)."""
        return self.n_blocks - 1

    def describe(self) -> str:
        gb = self.pool_bytes / 1e9
        size = f"{gb:.3f} GB" if gb >= 0.1 else f"{self.pool_bytes / 1e6:.3f} MB"
        return (f"{self.usable_blocks} KV blocks of {self.block_size} tokens ({size}), {self.slots} rows decoded "
                "together")


def staging_tokens(prefill_tokens: int, max_len: int) -> int:
    """Most tokens (streams x padded prompt) one prefill pass stages at every layer: `prefill_tokens`, or
    a single group over it alone (its base and one stream, a pair's two prompt bitmaps, of at most
    `max_len`)."""
    return max(prefill_tokens, 2 * max_len)


def staging_bytes(n_layers: int, tok_bytes: int, prefill_tokens: int, max_len: int,
                  pool_tokens: int | None = None) -> int:
    """K/V bytes of `staging_tokens` at every layer, at most what the pool holds (a pass's prompts must
    fit the pool once computed)."""
    n = staging_tokens(prefill_tokens, max_len)
    return tok_bytes * n_layers * (n if pool_tokens is None else min(n, pool_tokens))


def plan_cache(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, *, max_len: int,
               block_size: int = DEFAULT_BLOCK_SIZE, slots: int | None = None, kv_budget_gb: float | None = None,
               max_slots: int | None = None, prefill_tokens: int = 32768) -> CachePlan:
    """Size the pool.

    `slots` alone: enough blocks for every row to hold `max_len` tokens of its own twice (what fixed slots
    of `max_len` with a pool segment each held: nothing ever waits for memory). `kv_budget_gb`: the blocks
    that fit the budget after one prefill pass's staging, and `max_slots` rows (default: as many as could
    each hold one block, at most `DEFAULT_MAX_SLOTS`). Both: the budget's blocks and those rows."""
    check_block_size(block_size)
    tb = token_bytes(n_kv_heads, head_dim, dtype)
    block_bytes = tb * n_layers * block_size
    cap = staging_tokens(prefill_tokens, max_len)
    if kv_budget_gb is None:
        if slots is None:
            raise ValueError("give slots (rows decoded together) or kv_budget_gb (KV memory to use)")
        # each row: its prompt twice (its stream's, and a base copy below the shared depth when no row of
        # its group reads the prompt intact) and its new tokens, each with a partly filled last block
        n_blocks = slots * (2 * blocks_for(max_len, block_size) + 1) + 1
        stage = staging_bytes(n_layers, tb, prefill_tokens, max_len, n_blocks * block_size)
        return CachePlan(n_layers, block_size, n_blocks, slots, block_bytes, stage, max_len)
    # the most blocks n with n blocks + the staging of min(cap, n x block_size) tokens within the budget:
    # while the pool holds fewer tokens than `cap`, a pass stages at most the pool's worth (half the budget)
    budget = kv_budget_gb * 1e9
    small = min(int(budget // (2 * block_bytes)), cap // block_size)
    large = int((budget - tb * n_layers * cap) // block_bytes)
    n_blocks = max(small, large if large * block_size > cap else 0)
    stage = staging_bytes(n_layers, tb, prefill_tokens, max_len, n_blocks * block_size)
    if n_blocks < 2:
        raise ValueError(f"kv_budget_gb={kv_budget_gb:.3g}: a block of {block_size} tokens at every layer takes "
                         f"{block_bytes / 1e6:.3f} MB, and as much again for a prefill pass to stage it, so not "
                         "one block per layer fits (the pool needs two: one holds, one is the trash block); raise "
                         "the budget")
    if slots is None:
        slots = min(max_slots or DEFAULT_MAX_SLOTS, n_blocks - 1)
    return CachePlan(n_layers, block_size, n_blocks, slots, block_bytes, stage, max_len)


def plan_for_model(model, **kw) -> CachePlan:
    """`plan_cache` for a loaded (or meta-device) Hugging Face model."""
    from .hf import dims

    d = dims(model)
    return plan_cache(d.n_layers, d.n_kv_heads, d.head_dim, next(model.parameters()).dtype, **kw)


def plan_for_config(config, dtype: torch.dtype = torch.bfloat16, **kw) -> CachePlan:
    """`plan_cache` for a transformers config (no model built)."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return plan_cache(config.num_hidden_layers, config.num_key_value_heads or config.num_attention_heads, hd,
                      dtype, **kw)


def group_blocks(prompt_len: int, rows: int, streams: int, separate_base: bool, max_new_tokens: int,
                 block_size: int) -> int:
    """Blocks one group holds at its longest: its prompt (all but the last token) once per prefill stream,
    plus a base copy below its shared depth when no stream reads the prompt intact, plus each row's new
    tokens (and the step a row rides along after its last)."""
    n = prompt_len - 1
    prompt = blocks_for(n, block_size) * (streams + (1 if separate_base else 0))
    return prompt + rows * blocks_for(max_new_tokens + 1, block_size)


__all__ = ["BLOCK_SIZES", "CachePlan", "DEFAULT_BLOCK_SIZE", "DEFAULT_MAX_SLOTS", "blocks_for", "check_block_size",
           "group_blocks", "plan_cache", "plan_for_config", "plan_for_model", "staging_bytes", "staging_tokens",
           "token_bytes"]
