"""Shared-expert modes (overlap, defer, serial) and expert tensor parallelism equal the reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from epruntime.cli.memtrack import peak_bytes
from epruntime.cli.shared_modes import compare_shared_modes
from epruntime.config.schema import ConfigError
from epruntime.layer.moe import EPMoE
from epruntime.layer.reference import reference_moe
from epruntime.parallel.runtime import Runtime, init_runtime, shutdown_runtime
from tests.distributed import run_world
from tests.factories import layer_weights, make_config, rel_err, tokens

MODES = ("overlap", "defer", "serial")


def _every_mode(rt: Runtime, sd: dict[str, torch.Tensor], xs: list[torch.Tensor]) -> dict:
    """This rank's output in every mode, and its shared expert's own output (for the TP1 check)."""
    x = xs[rt.rank // rt.cfg.runtime.moe_tp]  # the ranks of one TP group share their tokens
    layer = EPMoE.from_hf_state_dict(rt.cfg.model, sd, rt)
    outs = {}
    for mode in MODES:
        layer.shared_mode = mode
        outs[mode] = layer(x)
    outs["shared"] = layer.shared(x)
    return outs


TP_CASES = [  # (nnodes, ranks_per_node, moe_tp, shared_expert_tp)
    (1, 2, 2, 1),  # TP over the whole job: a one-rank EP world, nothing dispatched
    (1, 2, 2, 2),
    (2, 2, 1, 1),
    (2, 2, 2, 1),
    (2, 2, 2, 2),
    (2, 4, 1, 1),
    (2, 4, 2, 1),
    (2, 4, 2, 2),
]


@pytest.mark.parametrize(("nnodes", "ranks_per_node", "moe_tp", "shared_tp"), TP_CASES)
def test_modes_and_expert_tp_equal_reference(nnodes: int, ranks_per_node: int, moe_tp: int, shared_tp: int) -> None:
    for dispatcher in ("flat", "hierarchical"):
        cfg = make_config(
            nnodes, ranks_per_node, runtime={"moe_tp": moe_tp, "shared_expert_tp": shared_tp, "dispatcher": dispatcher}
        )
        sd = layer_weights(cfg, 21)
        no_shared = dataclasses.replace(cfg.model, n_shared_experts=0)
        groups = cfg.topology.world_size // moe_tp
        xs = [tokens(11 + 7 * g, cfg.model.hidden_size, 300 + g) for g in range(groups)]
        for rank, outs in enumerate(run_world(_every_mode, cfg, sd, xs)):
            expected = reference_moe(xs[rank // moe_tp], sd, cfg.model)
            for mode in MODES:
                assert rel_err(outs[mode], expected) <= 1e-5, (dispatcher, mode, rank)
            if shared_tp == 1 and moe_tp > 1:
                # The replicated shared expert is the whole of the reference's shared term (with minus without)
                shared = expected - reference_moe(xs[rank // moe_tp], sd, no_shared)
                assert rel_err(outs["shared"], shared) <= 1e-5, (dispatcher, rank)
                # Adding the replicated output before the all-reduce would count it moe_tp times:
                # that result is far from the reference, so the equality above rules it out.
                wrong = expected + (moe_tp - 1) * outs["shared"]
                assert rel_err(wrong, expected) > 1e-2


def test_block_quantized_tp_split_rejected_with_pointer_to_tp1() -> None:
    with pytest.raises(ConfigError, match=r"set runtime\.shared_expert_tp: 1"):
        make_config(
            2,
            2,
            runtime={"moe_tp": 2, "shared_expert_tp": 2},
            moe_intermediate_size=128,
            weight_block_size=[128, 128],
        )
    # the pointer's advice works: the same block-quantized model with the shared expert whole is accepted
    make_config(
        2, 2, runtime={"moe_tp": 2, "shared_expert_tp": 1}, moe_intermediate_size=128, weight_block_size=[128, 128]
    )
    with pytest.raises(ConfigError, match=r"runtime\.moe_tp: 3 does not divide topology\.ranks_per_node=2"):
        make_config(2, 2, runtime={"moe_tp": 3})
    with pytest.raises(ConfigError, match=r"runtime\.shared_expert_tp: must be 1"):
        make_config(2, 2, runtime={"moe_tp": 2, "shared_expert_tp": 3})


def test_defer_lowers_measured_peak_on_long_prefill() -> None:
    """One rank, 2048 tokens: defer frees the routed workspace before the shared activations exist."""
    cfg = make_config(runtime={"shared_expert": "serial"}, hidden_size=128, moe_intermediate_size=64)
    rt = init_runtime(cfg)
    try:
        layer = EPMoE.from_hf_state_dict(cfg.model, layer_weights(cfg, 2), rt)
        x = tokens(2048, 128, 9)
        peaks = {}
        for mode in MODES:
            layer.shared_mode = mode
            peaks[mode] = peak_bytes(lambda: layer(x), rt.device)
        assert peaks["defer"] < peaks["serial"]
        # serial holds the shared output [T, H] while the routed workspace peaks; defer does not.
        assert peaks["serial"] - peaks["defer"] >= 2048 * 128 * 4
        report = compare_shared_modes(layer, x, iters=2)  # overlap vs serial time: reported, not asserted
        assert set(report) == set(MODES)
        serial = report["serial"]
        assert serial["time_ms"] > 0 and serial["peak_bytes"] > 0
        for mode, r in report.items():  # each ratio is that mode's figure over serial's, from the same report
            assert r["time_ratio_to_serial"] == pytest.approx(r["time_ms"] / serial["time_ms"]), mode
            assert r["peak_ratio_to_serial"] == pytest.approx(r["peak_bytes"] / serial["peak_bytes"]), mode
        assert report["defer"]["peak_ratio_to_serial"] < 1.0
    finally:
        shutdown_runtime()
