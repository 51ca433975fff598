"""Expert placement algorithms: place logical experts (with redundant replicas) on physical slots and GPUs.

Pure functions on load tensors (DeepSeek EPLB's interface); moving experts while a job runs is the layer's
(:mod:`epruntime.layer.rebalance`)."""

from epruntime.eplb.loads import lognormal_load, zipf_load
from epruntime.eplb.metrics import balance, gpu_loads
from epruntime.eplb.placement import contiguous_placement, logical_maps, rebalance_experts

__all__ = [
    "balance",
    "contiguous_placement",
    "gpu_loads",
    "logical_maps",
    "lognormal_load",
    "rebalance_experts",
    "zipf_load",
]
