"""The expert-parallel layer over real gloo worlds equals transformers' DeepseekV3MoE and the reference."""

from __future__ import annotations

import pytest
import torch

from epruntime.layer.moe import EPMoE
from epruntime.layer.reference import reference_moe
from epruntime.parallel.runtime import Runtime, init_runtime, shutdown_runtime
from tests.cases import LayerCase
from tests.distributed import run_world
from tests.factories import hf_moe, layer_weights, make_config, rel_err, tokens

DSV3_ROUTING = dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4)


def _forward_cases(rt: Runtime, cases: list[LayerCase]) -> list[torch.Tensor]:
    outs = []
    for case in cases:
        layer = case.layer(rt)
        assert layer.experts.num_experts == rt.topo.experts_per_rank  # only this rank's experts are kept
        outs.append(layer(case.xs[rt.rank].to(rt.cfg.model.torch_dtype)))
    return outs


def _cases(cfg, counts_per_case: dict[str, list[int]], seed: int) -> list[LayerCase]:
    """One case per entry of ``counts_per_case`` (name: tokens per rank); every second one loads fused weights."""
    h = cfg.model.hidden_size
    return [
        LayerCase(
            name,
            layer_weights(cfg, seed + i, bias_scale=5.0),
            [tokens(n, h, 1000 * seed + 10 * i + r) for r, n in enumerate(counts)],
            fused=i % 2 == 1,
        )
        for i, (name, counts) in enumerate(counts_per_case.items())
    ]


def _check_against_hf(cfg, cases: list[LayerCase], outs_by_rank: list[list[torch.Tensor]]) -> None:
    for i, case in enumerate(cases):
        x_all = case.x_all()  # [T_all, H]
        expected = hf_moe(cfg, case.sd)(x_all.unsqueeze(0)).squeeze(0)  # [T_all, H]
        got = torch.cat([outs[i] for outs in outs_by_rank])
        assert got.shape == x_all.shape, case.name
        assert rel_err(got, expected) <= 1e-5, case.name
        assert rel_err(got, reference_moe(x_all, case.sd, cfg.model)) <= 1e-5, f"{case.name} vs reference"


TOPOLOGIES = [(1, 2), (2, 2), (2, 4)]


@pytest.mark.parametrize(("nnodes", "ranks_per_node"), TOPOLOGIES)
def test_ep_equals_transformers(nnodes: int, ranks_per_node: int) -> None:
    world = nnodes * ranks_per_node
    for model, seed in ((dict(), 0), (dict(DSV3_ROUTING, hidden_size=48, moe_intermediate_size=24), 7)):
        cfg = make_config(nnodes, ranks_per_node, **model)
        counts = {
            "even": [24] * world,
            "uneven, possibly zero": [(7 * r + 3) % 19 for r in range(world)],
            "rank 0 has no tokens": [0] + [9] * (world - 1),
        }
        cases = _cases(cfg, counts, seed)
        _check_against_hf(cfg, cases, run_world(_forward_cases, cfg, cases))


def test_ep_one_rank_world_in_process() -> None:
    """With no launcher, init_runtime gives a 1-rank world; the API of the README works as written."""
    cfg = make_config(2, 2)  # the YAML topology is replaced by a 1-rank world without a launcher
    rt = init_runtime(cfg)
    try:
        assert rt.world_size == 1 and rt.launcher == "none"
        case = _cases(rt.cfg, {"one rank": [40]}, 3)
        _check_against_hf(rt.cfg, case, [_forward_cases(rt, case)])
        layer = EPMoE.random(rt.cfg.model, rt, seed=0)
        assert layer(torch.zeros(0, rt.cfg.model.hidden_size)).shape == (0, rt.cfg.model.hidden_size)
    finally:
        shutdown_runtime()


def test_all_tokens_to_one_expert_and_all_ranks_empty() -> None:
    cfg = make_config(2, 2, num_experts_per_tok=1)
    biased = layer_weights(cfg, 11)
    biased["gate.e_score_correction_bias"][9] = 100.0  # every token chooses expert 9 (rank 2)
    h = cfg.model.hidden_size
    cases = [
        LayerCase("all tokens to expert 9", biased, [tokens(n, h, 50 + r) for r, n in enumerate([13, 0, 5, 21])]),
        LayerCase("all ranks empty", layer_weights(cfg, 12), [tokens(0, h, 0)] * 4),
    ]
    _check_against_hf(cfg, cases, run_world(_forward_cases, cfg, cases))


def _bf16_error(rt: Runtime, sd: dict[str, torch.Tensor], xs: list[torch.Tensor]) -> float:
    bf16 = {k: v.bfloat16() if k.startswith(("experts", "shared")) else v for k, v in sd.items()}
    y = EPMoE.from_hf_state_dict(rt.cfg.model, bf16, rt)(xs[rt.rank].bfloat16())
    assert y.dtype == torch.bfloat16
    return rel_err(y, reference_moe(xs[rt.rank].bfloat16(), bf16, rt.cfg.model))


def test_bf16_path_within_bf16_tolerance() -> None:
    cfg = make_config(2, 2, dtype="bfloat16")
    sd = layer_weights(cfg, 4)
    xs = [tokens(32, cfg.model.hidden_size, 60 + r) for r in range(4)]
    assert max(run_world(_bf16_error, cfg, sd, xs)) <= 3e-2
