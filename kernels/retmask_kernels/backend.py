"""Which implementation runs: Triton for CUDA tensors; on other devices the CPU backend (`cpu.py`: torch's
fused SDPA for the prefill, a batched product for the decode) and the PyTorch reference sampler."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKEND_ENV = "RETMASK_BACKEND"  # "auto" (default), "triton", "cpu" or "reference"
_CHOICES = ("auto", "triton", "cpu", "reference")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_choice() -> str:
    """RETMASK_BACKEND, checked: 'auto', 'triton', 'cpu' or 'reference' (a job checks it before loading a
    model). 'cpu' is the torch backend for tensors on any device, 'reference' the float32 reference."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{BACKEND_ENV}={choice!r} is not a backend; use one of {', '.join(_CHOICES)}")
    if choice == "triton" and not triton_available():
        raise ValueError(f"{BACKEND_ENV}=triton but triton is not installed; pip install triton")
    return choice


def resolve_backend(t: torch.Tensor) -> str:
    """'triton', 'cpu' or 'reference' for inputs living where `t` lives, honouring RETMASK_BACKEND. 'cpu' is
    what runs without Triton (a function with no CPU backend of its own runs the reference there)."""
    choice = backend_choice()
    if choice in ("reference", "cpu"):
        return choice
    on_gpu = t.device.type == "cuda"
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if choice == "triton":
        if not on_gpu and not interp:
            raise ValueError(
                f"{BACKEND_ENV}=triton with tensors on {t.device}: Triton runs CUDA tensors, or CPU "
                "tensors under TRITON_INTERPRET=1 (set before importing retmask)"
            )
        return "triton"
    return "triton" if on_gpu and triton_available() else "cpu"
