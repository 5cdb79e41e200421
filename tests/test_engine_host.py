"""What the engine's launches and prefill passes never do: read a value out of a device tensor.

On a GPU such a read (`.item()`, `bool(t)`, `nonzero`, ...) waits for every kernel queued before it,
so a decode launch or a prefill pass that holds one stalls the host behind the step in flight and
loses the overlap of host and GPU. On CPU it costs nothing and passes unseen, and the CUDA test that
catches it needs a GPU. So here a dispatch mode follows which tensors hold device data (the model's
weights, the engine's cache and state, whatever `upload` brings up, and everything
computed from them) and records each host read of one while the engine launches a decode step
(forward, sampler, copies) or prefills, transformers' code included. The kernels are left out: on a
GPU they are the Triton launchers (no value reads by design), on CPU the PyTorch references, which
may read. Collecting a step reads its tokens after waiting on its event, by design."""

import traceback

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine_common import HEADS, family_models, prompts
from retmask import decoding, prefill, sampling
from retmask.engine import ORIGINAL, Engine, GenConfig, Group, Policy
from retmask.heads import HeadSet
from retmask.sampling import Sampling
from tiny_models import FAMILIES

aten = torch.ops.aten
# ops whose result the host must read before it can go on (a GPU sync)
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten._unique2.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor}


class DeviceReads(TorchDispatchMode):
    """Follows device data through every op; records the host reads of it while `on` is set."""

    def __init__(self):
        super().__init__()
        self.on, self.seen = False, []
        self._dev: dict[int, list] = {}  # storage address -> weak refs to the device storages there

    def mark(self, out):
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                s = t.untyped_storage()
                self._dev.setdefault(s.data_ptr(), []).append(StorageWeakRef(s))

    def on_device(self, t) -> bool:
        if not isinstance(t, torch.Tensor) or not t.untyped_storage().nbytes():
            return False
        refs = [r for r in self._dev.get(t.untyped_storage().data_ptr(), ()) if not r.expired()]  # freed: reused
        return bool(refs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(self.on_device(t) for t in tree_leaves((args, kwargs))):
            if self.on and func in HOST_READS:
                self.seen.append(f"{func} at {_where()}")
            self.mark(out)
        return out


def _where() -> str:
    """The innermost frame of retmask or transformers that issued the op."""
    for f in reversed(traceback.extract_stack()):
        if ("/retmask/" in f.filename or "/transformers/" in f.filename) and "test_" not in f.filename:
            return f"{f.filename.split('/site-packages/')[-1]}:{f.lineno} {f.line}"
    return "?"


def _watched_run(monkeypatch, m, groups, cfg, **engine_kw):
    mode = DeviceReads()

    def scoped(fn, on):
        def run(*a, **k):
            was, mode.on = mode.on, on
            try:
                return fn(*a, **k)
            finally:
                mode.on = was

        return run

    def brought_up(fn):
        def run(*a, **k):
            out = fn(*a, **k)
            mode.mark(out)
            return out

        return run

    monkeypatch.setattr(decoding, "upload", brought_up(decoding.upload))  # to_device's copies go through it too
    monkeypatch.setattr(decoding, "masked_decode", scoped(decoding.masked_decode, False))  # the kernels
    monkeypatch.setattr(prefill, "masked_attention", scoped(prefill.masked_attention, False))
    monkeypatch.setattr(sampling, "gumbel_argmax", scoped(sampling.gumbel_argmax, False))
    monkeypatch.setattr(Engine, "_launch", scoped(Engine._launch, True))
    monkeypatch.setattr(prefill.PrefillRunner, "run", scoped(prefill.PrefillRunner.run, True))
    with Engine(m, **engine_kw) as eng:
        mode.mark([*m.parameters(), *m.buffers(), *(t for t in tree_leaves(vars(eng)) if isinstance(t, torch.Tensor))])
        with mode:
            res = list(eng.generate(groups, cfg))
    return res, eng.stats, mode.seen


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("decode,reuse,slots", [("eager", 0, 5), ("static", 0, 5), ("static", 8, 12)])
def test_launches_and_prefills_read_no_device_values(name, decode, reuse, slots, monkeypatch):
    """Llama, Qwen3 and OLMo-3 (sliding layers); eager and static decode steps; left-padded, chunked
    prefill batches; groups of 1 to 3 rows sharing 0 to all layers; prompts sharing prefixes, with
    prefix reuse off and on (blocks taken from the prefix cache); sampling with top-k and top-p cuts; slots
    refilled while steps run (overlap on): no host read of device data in any launch or prefill. transformers' mask
    preparation holds one (its packed-sequence check reads `.all()` of the position ids) unless the
    engine hands it a prepared mask."""
    _, m, *_ = family_models(name)
    pols = [[ORIGINAL, Policy(HEADS)], [ORIGINAL], [Policy(HEADS, "generated"), ORIGINAL,
                                                    Policy(HeadSet.from_list("0-1"))]]
    hay, *tails = prompts(5, (36, 3, 5, 2, 4, 6))
    ps = [hay[:cut] + tail for cut, tail in zip((18, 28, 28, 36, 6), tails)] + [hay[:22]]
    groups = [Group(p, pols[i % 3], key=i) for i, p in enumerate(sorted(ps))]
    cfg = GenConfig(max_new_tokens=4, return_argmax=True, sampling=Sampling(temperature=0.7, top_k=20, top_p=0.9))
    res, stats, seen = _watched_run(monkeypatch, m, groups, cfg, slots=slots, max_len=48, chunk=6, decode=decode,
                                    overlap=True, reuse_prefix=reuse, block_size=16)
    assert len(res) == len(ps) and stats["prefills"] >= 3 and (stats["steps"] >= 8 or reuse)  # slots refilled
    assert (stats["reused_tokens"] > 0) == (reuse > 0)
    assert seen == [], f"{len(seen)} host reads of device data, first: {seen[:3]}"


def test_the_check_sees_a_host_read_and_only_of_device_data(monkeypatch):
    """The check is not blind: a read of the engine's device state inside a launch is caught, with
    where it happened, and a read of a host tensor there is not."""
    _, m, *_ = family_models("llama")
    groups = [Group(p, [ORIGINAL, Policy(HEADS)], key=i) for i, p in enumerate(prompts(3, (6, 9)))]
    launch = Engine._launch

    def host_read(self, st, cfg, prev):
        bool(st.keep_host.any())  # host data: allowed
        return launch(self, st, cfg, prev)

    monkeypatch.setattr(Engine, "_launch", host_read)
    _, _, seen = _watched_run(monkeypatch, m, groups, GenConfig(max_new_tokens=3), slots=4, max_len=24)
    assert seen == []

    def device_read(self, st, cfg, prev):
        int(self.kv_len.max())  # device data: a sync on a GPU
        return host_read(self, st, cfg, prev)

    monkeypatch.setattr(Engine, "_launch", device_read)
    _, _, seen = _watched_run(monkeypatch, m, groups, GenConfig(max_new_tokens=3), slots=4, max_len=24)
    assert len(seen) == 3 and all("_local_scalar_dense" in s and "test_engine_host" not in s for s in seen), seen
