"""Two or more GPUs with DeepEP: the EP layer over deepep / deepep_low_latency equals flat and the reference."""

from __future__ import annotations

import pytest
import torch

from epruntime.config.kernel_limits import deep_ep_import_error
from epruntime.layer.moe import EPMoE
from epruntime.layer.reference import reference_moe
from epruntime.parallel.runtime import Runtime
from tests.distributed import run_world
from tests.factories import dispatcher_for, gpu_config, layer_weights, rel_err, tokens
from tests.gpu import gpu_count_reason

pytestmark = pytest.mark.gpu
WORLD = 2


def _skip_reason() -> str | None:
    reason = gpu_count_reason(WORLD)
    if reason is None and deep_ep_import_error() is not None:
        reason = f"deep_ep is not importable ({deep_ep_import_error()}); build it with docker/Dockerfile"
    return reason


def _outputs(rt: Runtime, sd: dict, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    layer = EPMoE.from_hf_state_dict(rt.cfg.model, sd, rt)
    x = xs[rt.rank].to(rt.device, torch.bfloat16)
    out = {}
    for name in ("flat", "deepep", "deepep_low_latency", "auto"):
        layer.dispatcher = dispatcher_for(rt, name)
        out[name] = layer(x).float().cpu()
    return out


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_deepep_layer_equals_flat() -> None:
    cfg = gpu_config(WORLD, "flat", 32)
    sd = {k: v.bfloat16() if k.startswith(("experts", "shared")) else v for k, v in layer_weights(cfg, 9).items()}
    xs = [tokens(n, 2048, 90 + r) for r, n in enumerate([32, 5][:WORLD])]
    outputs = run_world(_outputs, cfg, sd, xs)
    for rank, out in enumerate(outputs):
        ref = reference_moe(xs[rank].bfloat16(), sd, cfg.model)
        for name, y in out.items():
            assert rel_err(y, out["flat"]) <= 1e-2, name
            assert rel_err(y, ref) <= 3e-2, name
