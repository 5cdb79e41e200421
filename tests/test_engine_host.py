"""What the engine's forward passes and token picks never do on the host: read a value out of a device
tensor.

On a GPU such a read (`.item()`, `bool(t)`, `nonzero`, ...) waits for every kernel queued before it,
so a prefill or an eager decode step that holds one stalls the host behind the step in flight and
loses the overlap of host and GPU. On CPU it costs nothing and passes unseen; here a dispatch mode
records every such op that transformers' forward (or the engine's hooks inside it) issues while the
engine runs prefill and decode, and while it picks the next tokens (top-k and top-p cuts). The
kernels are left out: on a GPU they are the Triton launchers (no value reads by design), on CPU the
PyTorch references, which may read."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine_common import HEADS, family_models, prompts
from retmask import decoding, sampling
from retmask.decoding import DecodeContext
from retmask.engine import ORIGINAL, Engine, GenConfig, Group, Policy
from retmask.prefill import PrefillPass
from retmask.sampling import Sampling
from tiny_models import FAMILIES

aten = torch.ops.aten
# ops whose result the host must read before it can go on (a GPU sync)
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten._unique2.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor}


class HostReads(TorchDispatchMode):
    """Records the host-read ops dispatched while `on` is set (in a forward or a token pick, outside the kernels)."""

    def __init__(self):
        super().__init__()
        self.on, self.seen = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and func in HOST_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("decode", ["eager", "static"])
def test_forward_passes_read_no_device_values(name, decode, monkeypatch):
    """Prefill (left-padded batches of prompts of different lengths, chunked), decode steps (eager and
    static) over Llama, Qwen3 and OLMo-3 (sliding layers) and the sampler's cuts: no host read anywhere
    outside the kernels. transformers' mask preparation holds one (its packed-sequence check reads
    `.all()` of the position ids) unless the engine hands it a prepared mask."""
    _, m, *_ = family_models(name)
    mode = HostReads()

    def pause(fn):  # a kernel: its reads are not counted (see the module docstring)
        def paused(*a, **k):
            on, mode.on = mode.on, False
            try:
                return fn(*a, **k)
            finally:
                mode.on = on

        return paused

    def watch(fn):
        def watched(*a, **k):
            mode.on = True
            try:
                return fn(*a, **k)
            finally:
                mode.on = False

        return watched

    for cls in (PrefillPass, DecodeContext):
        monkeypatch.setattr(cls, "attend", pause(cls.attend))
    monkeypatch.setattr(sampling, "gumbel_argmax", pause(sampling.gumbel_argmax))
    monkeypatch.setattr(decoding, "next_tokens", watch(decoding.next_tokens))
    hooks = [m.model.register_forward_pre_hook(lambda *_: setattr(mode, "on", True)),
             m.model.register_forward_hook(lambda *_: setattr(mode, "on", False))]
    ps = prompts(5, (17, 4, 11, 2, 9))
    groups = [Group(p, [ORIGINAL, Policy(HEADS)], key=i) for i, p in enumerate(ps)]
    cfg = GenConfig(max_new_tokens=4, sampling=Sampling(temperature=0.7, top_k=20, top_p=0.9))
    try:
        with Engine(m, slots=6, max_len=40, chunk=6, decode=decode) as eng, mode:
            res = list(eng.generate(groups, cfg))
    finally:
        for h in hooks:
            h.remove()
    assert len(res) == len(ps) and eng.stats["prefills"] >= 2 and eng.stats["steps"] >= 4
    assert mode.seen == [], f"host reads: {sorted(set(mode.seen))} ({len(mode.seen)} in all)"
