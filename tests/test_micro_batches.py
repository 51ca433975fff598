"""``runtime.micro_batches``: the layer's tokens software-pipelined in chunks, exact against transformers."""

from __future__ import annotations

import pytest
import torch

from epruntime import EPMoE
from epruntime.config.errors import ConfigError
from epruntime.parallel.runtime import Runtime
from tests.distributed import run_world
from tests.factories import hf_moe, layer_weights, make_config, rel_err, tokens

MODES = ("overlap", "serial", "defer")


def _every_mode(rt: Runtime, sd: dict, counts: list[int]) -> dict[str, torch.Tensor]:
    layer = EPMoE.from_hf_state_dict(rt.cfg.model, sd, rt)
    x = tokens(counts[rt.rank], rt.cfg.model.hidden_size, 50 + rt.rank // rt.layout.tp.size)
    outs = {}
    for mode in MODES:
        layer.shared_mode = mode
        outs[mode] = layer(x)
    return outs


CASES = [  # (dispatcher, nnodes, ranks_per_node, micro_batches, runtime extras)
    ("flat", 1, 2, 2, {}),
    ("flat", 2, 2, 4, {}),
    ("hierarchical", 2, 2, 2, {}),
    ("hierarchical", 2, 2, 4, {}),
    ("lowlatency", 2, 2, 2, {}),
    ("lowlatency", 1, 2, 4, {}),
    ("auto", 2, 2, 2, {}),
    ("hierarchical", 2, 2, 2, {"moe_tp": 2}),
    ("flat", 2, 2, 4, {"moe_tp": 2, "shared_expert_tp": 2}),
]


@pytest.mark.parametrize(("dispatcher", "nnodes", "rpn", "chunks", "extra"), CASES)
def test_micro_batches_equal_transformers(dispatcher: str, nnodes: int, rpn: int, chunks: int, extra: dict) -> None:
    runtime = {"dispatcher": dispatcher, "micro_batches": chunks, "max_tokens_per_rank": 16, "tokens_per_rank": 16}
    cfg = make_config(nnodes, rpn, runtime={**runtime, **extra})
    tp = extra.get("moe_tp", 1)
    counts = [16, 9, 3, 0][: nnodes * rpn] if tp == 1 else [13, 13, 3, 3]  # uneven, one rank short of chunks
    sd = layer_weights(cfg, 8, bias_scale=5.0)
    outs = run_world(_every_mode, cfg, sd, counts)
    x = torch.cat([tokens(c, cfg.model.hidden_size, 50 + r // tp) for r, c in enumerate(counts)][::tp])
    expected = hf_moe(cfg, sd)(x.unsqueeze(0)).squeeze(0)
    for mode in MODES:
        assert rel_err(torch.cat([o[mode] for o in outs[::tp]]), expected) <= 1e-5, mode


def test_micro_batches_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"runtime\.micro_batches: must be positive"):
        make_config(runtime={"micro_batches": 0})
