"""How an engine runs, as one frozen dataclass checked once: the CLI builds it from its flags, the jobs
derive what they need with `dataclasses.replace` (a `max_len` from their prompts, a size when none was
given), and `Engine(model, tok, config)` takes it whole."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

from .cache_plan import DEFAULT_BLOCK_SIZE, check_block_size
from .policy import is_int

DECODE_MODES = ("auto", "eager", "static", "graph")


@dataclass(frozen=True)
class EngineConfig:
    """An engine's settings (`Engine` documents each). `max_len` None: the job sets it from its longest
    prompt (an engine built directly takes 4096). Neither `slots` nor `kv_budget_gb`: the job sizes it
    (`engine.default_size`); an engine built directly needs one of them."""

    slots: int | None = None
    kv_budget_gb: float | None = None
    max_slots: int | None = None
    max_len: int | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    chunk: int | None = None
    prefill_tokens: int = 32768
    sharing: bool = True
    reuse_prefix: int = 128
    admit_rows: int | None = None
    decode: str = "auto"
    overlap: bool | None = None
    on_too_long: str = "error"

    def __post_init__(self):
        for name in ("slots", "max_slots", "max_len", "chunk", "prefill_tokens", "admit_rows", "reuse_prefix"):
            v = getattr(self, name)
            if v is not None and not is_int(v):
                raise ValueError(f"{name}={v!r}: expected an int")
        for name, lo in (("slots", 1), ("max_slots", 1), ("chunk", 1), ("prefill_tokens", 1), ("admit_rows", 1),
                         ("max_len", 2), ("reuse_prefix", 0)):
            v = getattr(self, name)
            if v is not None and v < lo:
                extra = {"reuse_prefix": " (0 turns prefix caching off)", "max_slots": " (or None: as many as the "
                         "budget holds)", "admit_rows": " (or None: max(rows per group, slots // 16))"}.get(name, "")
                raise ValueError(f"{name}={v}: must be >= {lo}{extra}")
        kv = self.kv_budget_gb
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, numbers.Real) or not 0 < kv < float("inf")):
            raise ValueError(f"kv_budget_gb={kv!r}: must be a finite number > 0")
        check_block_size(self.block_size)
        if not isinstance(self.sharing, bool):
            raise ValueError(f"sharing={self.sharing!r}: expected True or False")
        if self.on_too_long not in ("error", "skip"):
            raise ValueError(f"on_too_long={self.on_too_long!r}: use 'error' or 'skip'")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode={self.decode!r}: use one of {', '.join(DECODE_MODES)}")
        if self.overlap is not None and not isinstance(self.overlap, bool):
            raise ValueError(f"overlap={self.overlap!r}: expected True, False or None (on for CUDA)")

    @property
    def sized(self) -> bool:
        """Whether the memory is given (slots or a budget)."""
        return self.slots is not None or self.kv_budget_gb is not None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
