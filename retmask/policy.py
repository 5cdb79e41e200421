"""What the engine is asked and what it answers: policies (heads off + mask scope), groups (one prompt
and a row per policy), generation settings, and results."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .heads import HeadSet
from .sampling import Sampling

SCOPES = ("all", "generated")


@dataclass(frozen=True)
class Policy:
    """Heads to switch off (None: the original) and where: scope `all` (every position, the
    paper's zeroed-column checkpoint) or `generated` (generated positions only; the prompt is read
    by the intact model)."""

    heads: HeadSet | None = None
    scope: str = "all"
    name: str = ""

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}: use 'all' or 'generated'")
        if self.heads is not None and not isinstance(self.heads, HeadSet):
            raise ValueError(f"heads: expected a HeadSet or None (the original), got {type(self.heads).__name__}; "
                             "build one with HeadSet.from_list('15-30,24-27') or HeadSet.from_scores(...)")
        if self.heads is not None and len(self.heads) == 0:
            object.__setattr__(self, "heads", None)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return "original" if self.heads is None else f"off{len(self.heads)}-{self.scope}"

    @property
    def prompt_heads(self) -> tuple:
        """The heads this policy switches off over the prompt, sorted (empty: it reads the prompt intact);
        rows with equal values compute the same prompt KV."""
        return () if self.heads is None or self.scope == "generated" else tuple(sorted(self.heads))

    def prompt_depth(self, n_layers: int) -> int:
        """Layers whose prompt KV this policy leaves identical to the original's."""
        if self.heads is None or self.scope == "generated":
            return n_layers
        return self.heads.lowest_layer


ORIGINAL = Policy(None, "all", "original")


@dataclass
class Group:
    prompt: Sequence[int]
    policies: Sequence[Policy]
    # one per row; default: GenConfig.seed + the row's index among all rows of the generate() call, so
    # no two rows of a call draw the same noise
    seeds: Sequence[int] | None = None
    key: Any = None


@dataclass
class RowResult:
    policy: str
    tokens: list[int]
    finish: str  # "eos", "stop", "length"
    argmax: torch.Tensor | None = None  # (T, layers, heads) key positions, -1 for heads off
    logits: torch.Tensor | None = None  # (T, vocab) when GenConfig.keep_logits


@dataclass
class GroupResult:
    key: Any
    prompt_len: int
    rows: list[RowResult]
    reused: int = 0  # prompt tokens whose KV was copied from a segment or slot holding them (prefix reuse)


@dataclass(frozen=True)
class GenConfig:
    max_new_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    eos_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    return_argmax: bool = False
    keep_logits: bool = False
    seed: int = 0

    def __post_init__(self):
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an int >= 1")
        if not isinstance(self.sampling, Sampling):
            raise ValueError(f"sampling: expected a retmask.sampling.Sampling, got {type(self.sampling).__name__}")
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r}: expected an int")
        if isinstance(self.eos_ids, (str, bytes)) or not all(map(is_int, _items("eos_ids", self.eos_ids))):
            raise ValueError(f"eos_ids={self.eos_ids!r}: expected token ids (ints), e.g. (2,) or [128001, 128009]")
        if isinstance(self.stop_strings, str):
            raise ValueError(f"stop_strings={self.stop_strings!r}: expected a tuple of strings, e.g. "
                             f"({self.stop_strings!r},), not one string (each character would stop a row)")
        if not all(isinstance(s, str) and s for s in _items("stop_strings", self.stop_strings)):
            raise ValueError(f"stop_strings={self.stop_strings!r}: expected non-empty strings")
        for flag in ("return_argmax", "keep_logits"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r}: expected True or False")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))


def check_request(groups: list, cfg, vocab: int) -> None:
    """The types and token ids of what `Engine.generate` is given, with a ValueError naming the group: a
    GenConfig; Groups whose prompt is a 1-D sequence of ids in [0, vocab) (a list, numpy or torch integer
    array), whose policies are a list of Policy and whose seeds are ints."""
    if not isinstance(cfg, GenConfig):
        raise ValueError(f"cfg: expected a GenConfig, got {type(cfg).__name__}")
    for i, g in enumerate(groups):
        if not isinstance(g, Group):
            raise ValueError(f"groups[{i}]: expected a Group, got {type(g).__name__}")
        where = f"group {i} (key {g.key!r})"
        p = g.prompt
        if isinstance(p, torch.Tensor):
            ok = p.dim() == 1 and not (p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool)
            a = p.detach().cpu().numpy() if ok else None
        else:
            a = np.asarray(p) if isinstance(p, (list, tuple, np.ndarray)) else None
            ok = a is not None and a.ndim == 1 and (a.size == 0 or np.issubdtype(a.dtype, np.integer))
        if not ok:
            raise ValueError(f"{where}: prompt must be a 1-D sequence of token ids (list of ints, numpy or torch "
                             f"integer array), got {type(p).__name__}")
        if a.size and (a.min() < 0 or a.max() >= vocab):
            raise ValueError(f"{where}: token ids must lie in [0, {vocab}) (the model's vocabulary); got min "
                             f"{a.min()}, max {a.max()}")
        if not isinstance(g.policies, (list, tuple)) or not all(isinstance(x, Policy) for x in g.policies):
            raise ValueError(f"{where}: policies must be a list of Policy (one per row)")
        if g.seeds is not None and (not isinstance(g.seeds, (list, tuple)) or not all(map(is_int, g.seeds))):
            raise ValueError(f"{where}: seeds must be a list of ints (one per row) or None")


def is_int(v) -> bool:
    """An int (Python or numpy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _items(name: str, v) -> tuple:
    try:
        return tuple(v)
    except TypeError:
        raise ValueError(f"{name}={v!r}: expected a tuple") from None


def stream_keys(policies) -> list[tuple]:
    """The prompt bitmaps of a group's prefill streams (heads off over the prompt; () for intact), in the
    order of their first rows."""
    return list(dict.fromkeys(p.prompt_heads for p in policies))


def n_streams(policies) -> int:
    """Distinct prompt bitmaps among `policies`: the rows a group's prefill computes above its shared depth."""
    return len(stream_keys(policies))
