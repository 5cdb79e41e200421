"""Small helpers the launchers share: interpreter detection, dot precision, sizes."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreting(t: torch.Tensor) -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1) on CPU tensors."""
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_interpreter_dtype(q: torch.Tensor) -> None:
    """The interpreter's bfloat16 dot products are wrong (numpy has no bfloat16): refuse them rather than
    return garbage. Compiled kernels on a GPU run bfloat16 as usual."""
    if q.dtype == torch.bfloat16 and interpreting(q):
        raise ValueError("q: bfloat16 under TRITON_INTERPRET=1 gives wrong dot products in Triton's interpreter; "
                         "use float16 or float32 there, or the reference backend (RETMASK_BACKEND=reference)")


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact fp32 dots (PyTorch's default); tf32 would cost ~1e-3 relative error."""
    return "ieee" if dtype == torch.float32 else "tf32"


POISON = False  # tests set this: every buffer a launcher allocates starts as NaN / a sentinel int


def alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill; poisoned when POISON is set, so a test sees any
    element (of an output or of an intermediate) that the kernels failed to write."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan") if dtype.is_floating_point else -7)
    return t


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (queried once per device, never at import)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def on_device(t):
    """Context making the GPU of `t` (a tensor or a device) the current one: Triton launches, CUDA
    graph captures and replays use the current device and stream, not their tensors' device (a model
    on cuda:1 while cuda:0 is current). A no-op elsewhere."""
    dev = t.device if isinstance(t, torch.Tensor) else torch.device(t)
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()

