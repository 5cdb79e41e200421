"""Hugging Face integration: one attention function and one mask function, both named "retmask".

`attach(model)` registers them with transformers' AttentionInterface / AttentionMaskInterface and
switches the model to them: no copied modeling files, no weight edits. What the attention function
does depends on the active context (a contextvar):

- inside `Engine` work, the engine's context owns the KV cache and the masks;
- inside `policies(model, keep)`, plain `model(...)` / `model.generate(...)` calls run with the
  given per-row keep bitmap (HF's own cache and masks, the heads switched off per row);
- with no context, the model runs as the original (every head on).

Switching a head off zeroes its attention output: exactly what zeroing its columns of `o_proj` does.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retmask.kernels import masked_attention

from .heads import HeadSet

NAME = "retmask"  # no "flash" or "sdpa" in it: those switch code paths inside transformers
SUPPORTED = ("llama", "qwen3", "olmo3")

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("retmask_attention_context", default=None)


@dataclass(frozen=True)
class Dims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int


def dims(model) -> Dims:
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Dims(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads, hd,
                c.vocab_size)


def _mask_fn(*args, **kwargs):
    """Inside engine work the engine builds its own masks: skip HF's (no (Sq, Skv) tensor on long
    prompts). Otherwise HF's boolean SDPA mask, None when the mask is plain causal."""
    if _ACTIVE.get() is not None and getattr(_ACTIVE.get(), "owns_masks", False):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def engine_mask(device) -> torch.Tensor:
    """The `attention_mask` the engine passes to every forward it runs: an empty 4D mask, which
    transformers takes as already prepared and hands to the layers untouched (the engine's attention
    ignores it and applies its own masks). Without it, a forward given `position_ids` and no mask looks
    for packed sequences in them, and `if (...).all()` there reads the GPU: a sync in every prefill
    pass and eager decode step."""
    return torch.empty(0, 0, 0, 0, dtype=torch.bool, device=device)


def _attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                  **kwargs):
    """query (B, Hq, S, D) after RoPE; key/value (B, Hkv, Skv, D) after the cache update.
    Returns ((B, S, Hq, D), None)."""
    ctx = _ACTIVE.get()
    if ctx is not None and getattr(ctx, "owns_masks", False):
        return ctx.attend(module, query, key, value, scaling, sliding_window), None
    keep = ctx.keep_for(module.layer_idx, query.shape[0]) if ctx is not None else None
    return plain_attention(query, key, value, attention_mask, scaling, sliding_window, keep), None


def plain_attention(query, key, value, attention_mask, scaling, sliding_window, keep):
    """HF-cache attention with an optional keep bitmap (B, Hq). (B, S, Hq, D) out."""
    if attention_mask is None:  # plain causal: the kernel's bottom-right alignment is HF's too
        return masked_attention(query, key, value, keep, window=sliding_window, scale=scaling).transpose(1, 2)
    mask = attention_mask
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2  # additive float mask -> bool
    mask = mask[..., : key.shape[-2]]
    mask = mask | ~mask.any(-1, keepdim=True)  # padding queries see everything: finite junk, never NaN
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    if keep is not None:
        out = out.masked_fill(~keep[:, :, None, None], 0.0)
    return out.transpose(1, 2).contiguous()


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _attention_fn)
    AttentionMaskInterface.register(NAME, _mask_fn)


def check_model(model) -> None:
    """A clear error for something that is not a loaded transformers causal LM."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"model: expected a loaded transformers causal LM (AutoModelForCausalLM.from_pretrained), got "
                         f"{type(model).__name__}")


def check_supported(model) -> None:
    """A loaded causal LM of an architecture the engine runs, or a clear error."""
    check_model(model)
    mt = getattr(model.config, "model_type", None)
    if mt not in SUPPORTED:
        raise ValueError(f"model_type {mt!r} is not supported; retmask runs {', '.join(SUPPORTED)} models")


def attach(model):
    """Switch a loaded causal LM to retmask attention (in place); returns the model."""
    check_supported(model)
    register()
    model.set_attn_implementation(NAME)
    return model


def keep_bitmap(heads_per_row: list[HeadSet | None], d: Dims, device=None) -> torch.Tensor:
    """(B, L, Hq) bool: False where row b switches head (l, h) off. None = the original policy."""
    keep = torch.ones(len(heads_per_row), d.n_layers, d.n_heads, dtype=torch.bool)
    for b, hs in enumerate(heads_per_row):
        if hs is None:
            continue
        if not isinstance(hs, HeadSet):
            raise ValueError(f"rows[{b}]: expected a HeadSet (heads off) or None (the original), got "
                             f"{type(hs).__name__}")
        hs.validate(d.n_layers, d.n_heads)
        for layer, h in hs:
            keep[b, layer, h] = False
    return keep.to(device) if device is not None else keep


class _PlainPolicies:
    owns_masks = False

    def __init__(self, keep: torch.Tensor):
        self.keep = keep  # (B, L, Hq)
        self.layer_on = keep.view(keep.shape[0], keep.shape[1], -1).all(-1).all(0)  # (L,) every head on
        self.layer_on_list = self.layer_on.tolist()

    def keep_for(self, layer: int, batch: int):
        if self.layer_on_list[layer]:
            return None
        if batch != self.keep.shape[0]:
            raise ValueError(f"policies: the keep bitmap has {self.keep.shape[0]} rows but the model ran a batch of "
                             f"{batch}; give one policy per row of the batch (beam search and "
                             "num_return_sequences multiply rows)")
        return self.keep[:, layer]


@contextlib.contextmanager
def policies(model, rows: list[HeadSet | None] | torch.Tensor):
    """Run plain `model(...)` / `model.generate(...)` with one policy per batch row.

    rows: a HeadSet (heads off) or None (original) per row, or a (B, L, Hq) bool keep bitmap.
    The model must have been `attach`ed."""
    check_model(model)
    if model.config._attn_implementation != NAME:
        raise ValueError("policies: call retmask.hf.attach(model) first (the model does not use retmask attention)")
    d = dims(model)
    device = next(model.parameters()).device
    if not isinstance(rows, (torch.Tensor, list, tuple)) or not len(rows):
        got = "an empty list" if isinstance(rows, (list, tuple)) else type(rows).__name__
        raise ValueError(f"policies: rows must be a list with a HeadSet or None per batch row, or a (B, L, Hq) bool "
                         f"keep bitmap; got {got}")
    keep = rows if isinstance(rows, torch.Tensor) else keep_bitmap(list(rows), d)
    if keep.dim() != 3 or tuple(keep.shape[1:]) != (d.n_layers, d.n_heads) or keep.dtype != torch.bool:
        raise ValueError(f"policies: expected a (B, {d.n_layers}, {d.n_heads}) bool keep bitmap, got "
                         f"{tuple(keep.shape)} {keep.dtype}")
    token = _ACTIVE.set(_PlainPolicies(keep.to(device)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def active(ctx):
    """Make an engine context the active one for the calls inside."""
    token = _ACTIVE.set(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)


def zeroed_copy(model, heads: HeadSet):
    """A deep copy whose o_proj input columns for `heads` are zero: the paper's ablated checkpoint.
    For tests and baselines; the engine never edits weights."""
    import copy

    d = dims(model)
    heads.validate(d.n_layers, d.n_heads)
    m = copy.deepcopy(model)
    layers = m.model.layers
    with torch.no_grad():
        for layer, h in heads:
            layers[layer].self_attn.o_proj.weight[:, h * d.head_dim : (h + 1) * d.head_dim] = 0
    return m
