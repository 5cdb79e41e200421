"""Test set-up: Triton runs in its CPU interpreter unless a GPU run asks otherwise."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
# on a GPU: the prefill kernel's first config only, no autotuning per shape (the tests check
# results, not speed; the benchmarks tune). Set before retmask.kernels is imported.
os.environ.setdefault("RETMASK_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (bf16 and large shapes); skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and TRITON_INTERPRET=0")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the kernels allocate starts as NaN (floats) or -7 (ints)."""
    from retmask.kernels import _launch

    monkeypatch.setattr(_launch, "POISON", True)


@pytest.fixture
def free_port() -> int:
    """A TCP port nobody listens on now, for a multi-process run's rendezvous (a fixed one collides when two
    suites run at once)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
