"""retmask: several attention-head policies of one model in one batched pass, and the RetMask pipeline."""

__version__ = "0.1.0"
