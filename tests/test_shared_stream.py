"""Where the shared expert runs: beside the dispatch only in ``overlap`` mode, in stream order otherwise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from epruntime import EPMoE, init_runtime
from epruntime.config import dispatchers as registry
from epruntime.parallel.runtime import shutdown_runtime
from tests.factories import make_config, tokens


class RecordingSide:
    """Stands in for the side CUDA stream: records what is launched on it."""

    def __init__(self) -> None:
        self.launched = 0

    def launch(self, fn):
        self.launched += 1
        return fn()

    def join(self) -> None:
        pass


@pytest.mark.parametrize("recv_hook", [False, True])
def test_only_overlap_uses_the_side_stream_and_not_beside_a_receive_hook(monkeypatch, recv_hook: bool) -> None:
    flat = registry.backend("flat")
    monkeypatch.setitem(registry._BY_NAME, "flat", dataclasses.replace(flat, recv_hook=recv_hook))
    cfg = make_config()
    rt = init_runtime(cfg)
    try:
        layer = EPMoE.random(cfg.model, rt, seed=0)
        x = tokens(6, cfg.model.hidden_size, 1)
        reference = layer(x)
        for mode, beside in (("serial", 0), ("defer", 0), ("overlap", 0 if recv_hook else 1)):
            layer.shared_mode, layer.side = mode, RecordingSide()
            assert torch.equal(layer(x), reference)
            assert layer.side.launched == beside, mode
    finally:
        shutdown_runtime()
    assert registry.backend("deepep_low_latency").recv_hook and not registry.backend("deepep").recv_hook
