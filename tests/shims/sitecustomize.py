"""Put on PYTHONPATH by the sharded-training tests, for their launched processes only.

On a machine without an accelerator, accelerate runs every multi-process config as DDP over gloo
(its MULTI_CPU type), whatever `distributed_type` the config names, so the shipped FSDP and
DeepSpeed ZeRO-3 configs would go untested on CPU. With RETMASK_SHARDED_ON_CPU=1 this makes
accelerate's backend choice answer "multi-GPU over gloo" (ACCELERATE_TORCH_DEVICE=cpu keeps the
tensors on the CPU), so it takes its FSDP / DeepSpeed path: FSDP2's fully_shard and full-state-dict
gather, DeepSpeed's partitioned ZeRO-3 parameters (DS_ACCELERATOR=cpu) and its 16-bit save.
Nothing else in accelerate, transformers, TRL or retmask is changed.
"""

import os

if os.environ.get("RETMASK_SHARDED_ON_CPU") == "1":
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    _init = PartialState.__init__

    def _init_not_cpu(self, cpu: bool = False, **kwargs):
        _init(self, False, **kwargs)  # the trainer asks for cpu=True on a CPU-only machine

    PartialState._prepare_backend = _prepare_backend
    PartialState.__init__ = _init_not_cpu
