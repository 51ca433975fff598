"""Redundant experts and placements: physical slots, replica choice, per-slot weights, load counts, skew."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from epruntime import EPMoE
from epruntime.config.errors import ConfigError
from epruntime.config.placement_file import check_placement_rows
from epruntime.eplb import zipf_load
from epruntime.layer.router import route
from epruntime.layer.synthetic import synthetic_state_dict
from epruntime.parallel.placement import ExpertPlacement
from epruntime.parallel.runtime import Runtime
from tests.distributed import run_world
from tests.factories import hf_moe, layer_weights, make_config, rel_err, tokens

E = 16  # SMALL_MODEL's routed experts


def _placement_file(tmp_path: Path, rows: list[list[int]]) -> str:
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"phy2log": rows}))
    return str(path)


def _random_row(redundant: int, slots_per_rank: int, seed: int) -> list[int]:
    """Every expert once in random slots, then ``redundant`` replicas; one rank gets two copies of one expert."""
    gen = torch.Generator().manual_seed(seed)
    row = torch.randperm(E, generator=gen).tolist()
    extra = torch.randint(0, E, (redundant,), generator=gen).tolist()
    extra[-1] = row[E - 1]  # the last slot's rank also holds slot E - 1 when they share a rank
    row += extra
    last_rank = (E + redundant - 1) // slots_per_rank
    assert (E - 1) // slots_per_rank == last_rank, "the duplicate must share a rank"
    return row


def _layer_outputs(rt: Runtime, sd: dict, counts: list[int]) -> dict:
    layer = EPMoE.from_hf_state_dict(rt.cfg.model, sd, rt)
    x = tokens(counts[rt.rank], rt.cfg.model.hidden_size, 10 + rt.rank // rt.layout.tp.size)  # a TP group shares x
    y = layer(x)
    return {
        "y": y,
        "routed": layer.load.routed.clone(),
        "received": int(layer.load.received),
        "calls": layer.load.calls,
    }


CASES = [  # (dispatcher, nnodes, ranks_per_node, redundant, runtime extras)
    ("flat", 1, 3, 2, {}),  # an EP world of 3 does not divide 16 experts
    ("hierarchical", 2, 2, 4, {"shared_expert": "defer"}),
    ("lowlatency", 1, 3, 2, {"shared_expert": "serial"}),
    ("auto", 2, 2, 4, {}),
    ("hierarchical", 2, 2, 2, {"moe_tp": 2, "shared_expert_tp": 2}),  # EP world 2 inside the 4 ranks
]


@pytest.mark.parametrize(("dispatcher", "nnodes", "rpn", "redundant", "extra"), CASES)
def test_redundant_experts_in_a_random_placement_equal_transformers(
    tmp_path: Path, dispatcher: str, nnodes: int, rpn: int, redundant: int, extra: dict
) -> None:
    ep_world = nnodes * rpn // extra.get("moe_tp", 1)
    row = _random_row(redundant, (E + redundant) // ep_world, seed=nnodes * 10 + rpn)
    runtime = {"dispatcher": dispatcher, "redundant_experts": redundant, "placement": _placement_file(tmp_path, [row]),
               "max_tokens_per_rank": 16, "tokens_per_rank": 16, **extra}  # fmt: skip
    cfg = make_config(nnodes, rpn, runtime=runtime)
    sd = layer_weights(cfg, 3, bias_scale=5.0)
    counts = [16, 5, 0, 11][: nnodes * rpn]
    if extra.get("moe_tp"):  # the ranks of a TP group share their tokens
        counts = [16, 16, 7, 7]
    outs = run_world(_layer_outputs, cfg, sd, counts)
    tp = extra.get("moe_tp", 1)
    x = torch.cat([tokens(c, cfg.model.hidden_size, 10 + r // tp) for r, c in enumerate(counts)][::tp])
    y = torch.cat([o["y"] for o in outs[::tp]])
    expected = hf_moe(cfg, sd)(x.unsqueeze(0)).squeeze(0)
    assert rel_err(y, expected) <= 1e-5
    k = cfg.model.num_experts_per_tok
    tokens_routed = sum(counts) // tp
    routed = sum(o["routed"] for o in outs[::tp])  # [E] summed over the EP world
    assert int(routed.sum()) == tokens_routed * k and all(o["calls"] == 1 for o in outs)
    assert sum(o["received"] for o in outs[::tp]) == tokens_routed * k  # every pair reached one slot


def test_replica_choice_prefers_own_rank_then_node_then_a_node_already_used() -> None:
    # EP world of 4 ranks, 2 per node, 3 slots per rank: 12 slots over experts 0..7
    row = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 5, 6]
    #      rank0    rank1    rank2    rank3    (nodes: ranks 0-1 -> node 0, ranks 2-3 -> node 1)
    p = ExpertPlacement.from_row(row, 8, ep_world=4, ranks_per_node=2)
    assert p.experts_of(2) == [6, 7, 0] and p.logcnt.tolist() == [2, 2, 1, 1, 1, 2, 2, 1]
    slots = p.choose(torch.tensor([[0, 1, 5, 7]]), ep_rank=2)[0].tolist()  # a token on rank 2 (node 1)
    assert slots[0] == 8  # expert 0: the replica on its own rank (slot 8), not slot 0
    assert slots[1] == 9  # expert 1: on its own node (rank 3's slot 9)
    assert slots[3] == 7  # expert 7: its only replica
    assert slots[2] == 10  # expert 5: node 1 is used already (slot 10 on rank 3), not slot 5 on node 0
    far = p.choose(torch.tensor([[5, 2], [5, 3]]), ep_rank=0)  # rank 0 (node 0): expert 5 has slot 5 on node 0
    assert far[:, 0].tolist() == [5, 5]
    # no replica nearby and no node in use: spread by pair position over the replicas
    spread = p.choose(torch.tensor([[6], [6], [6], [6]]), ep_rank=0)[:, 0].tolist()  # 6 lives on 6 (n1) and 11 (n1)
    assert sorted(set(spread)) == [6, 11] and spread.count(6) == spread.count(11) == 2
    again = p.choose(torch.tensor([[6], [6], [6], [6]]), ep_rank=0)[:, 0].tolist()
    assert again == spread  # deterministic


def test_placement_file_errors_name_the_field_and_fix(tmp_path: Path) -> None:
    def cfg_with(rows: object, redundant: int = 2) -> None:
        path = tmp_path / "p.json"
        path.write_text(json.dumps({"phy2log": rows}) if not isinstance(rows, str) else rows)
        make_config(1, 2, runtime={"redundant_experts": redundant, "placement": str(path)})

    full = [*range(E), 0, 1]
    with pytest.raises(ConfigError, match=r"row 0 has 17 slots, expected model.n_routed_experts \+ runtime.redun"):
        cfg_with([full[:-1]])
    with pytest.raises(ConfigError, match=r"row 1 has no replica of expert\(s\) \[15\]"):
        cfg_with([full, [*range(15), 0, 1, 2]])
    with pytest.raises(ConfigError, match=r"row 0 holds 16, not a logical expert id in \[0, 16\)"):
        cfg_with([[*range(E), 16, 0]])
    with pytest.raises(ConfigError, match="not valid JSON"):
        cfg_with("{phy2log")
    with pytest.raises(ConfigError, match=r"expected \{\"phy2log\""):
        cfg_with("[1, 2]")
    with pytest.raises(ConfigError, match="no such file"):
        make_config(1, 2, runtime={"redundant_experts": 2, "placement": str(tmp_path / "none.json")})
    with pytest.raises(ConfigError, match=r"runtime.redundant_experts: 2 extra slots need a placement that uses them"):
        make_config(1, 2, runtime={"redundant_experts": 2})
    with pytest.raises(ConfigError, match=r"runtime.redundant_experts: 16 experts \+ 1 redundant = 17 slots"):
        cfg_with([[*range(E), 0]], redundant=1)
    with pytest.raises(ConfigError, match=r"model.n_routed_experts: 16 experts are not divisible by the world size 3"):
        make_config(1, 3)
    with pytest.raises(ConfigError, match=r"runtime.placement: p.json has 2 rows for 3 MoE layers"):
        check_placement_rows("p.json", 2, 3)
    check_placement_rows("p.json", 1, 3)  # one row serves every layer


def test_node_limited_routing_needs_each_replica_on_its_experts_node(tmp_path: Path) -> None:
    model = {"max_nodes_per_token": 1, "num_experts_per_tok": 2}
    home = [*range(8), 0, 1, *range(8, 16), 8, 9]  # node 0: experts 0-7 (+0, 1); node 1: 8-15 (+8, 9)
    path = _placement_file(tmp_path, [home])
    make_config(2, 1, runtime={"redundant_experts": 4, "placement": path}, **model)
    away = [*range(8), 0, 8, *range(8, 16), 9, 1]  # expert 8's replica on node 0
    with pytest.raises(ConfigError, match=r"row 0 puts expert 8 on node 0, but model.max_nodes_per_token routes by"):
        make_config(2, 1, runtime={"redundant_experts": 4, "placement": _placement_file(tmp_path, [away])}, **model)


def test_routing_skew_makes_popularity_follow_zipf() -> None:
    """cpu-sim's model: Zipf(1.0) skew gives the busiest of 8 contiguous ranks about twice the mean load."""
    cfg = make_config(
        hidden_size=256, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, moe_intermediate_size=32
    ).model
    sd = synthetic_state_dict(cfg, seed=0, experts=(), routing_skew=1.0)
    x = torch.randn(8192, cfg.hidden_size, generator=torch.Generator().manual_seed(5))  # fresh tokens
    idx, _ = route(x, sd["gate.weight"], sd["gate.e_score_correction_bias"], cfg)
    share = torch.bincount(idx.reshape(-1), minlength=256).double() / idx.numel()  # [E]
    target = zipf_load(1, 256, 1.0, seed=0, cap=1 / 8)[0]
    assert torch.corrcoef(torch.stack([share.log1p(), target.log1p()]))[0, 1] > 0.9
    per_rank, wanted = share.view(8, 32).sum(dim=1), target.view(8, 32).sum(dim=1)  # contiguous over 8 ranks
    busiest, planned = float(per_rank.max() / per_rank.mean()), float(wanted.max() / wanted.mean())
    assert busiest > 1.4 and abs(busiest - planned) < 0.1 * planned  # the busiest rank as Zipf predicts
    flat = synthetic_state_dict(cfg, seed=0, experts=())
    idx, _ = route(x, flat["gate.weight"], flat["gate.e_score_correction_bias"], cfg)
    even = torch.bincount(idx.reshape(-1), minlength=256).view(8, 32).sum(dim=1).double()
    assert float(even.max() / even.mean()) < busiest  # the random gate alone is less skewed


def _model_logits(rt: Runtime, path: str, ids: list[torch.Tensor]) -> tuple[torch.Tensor, list[list[int]], int]:
    from epruntime.io.checkpoint import CheckpointReader
    from epruntime.models import DeepseekEP

    reader = CheckpointReader(path)
    model = DeepseekEP.from_pretrained(reader, rt)
    slots = [layer.placement.experts_of(rt.layout.ep.rank) for layer in model.moe_layers()]
    return model(ids[rt.rank]), slots, len(reader.log.keys)


def test_checkpoint_model_with_a_placement_per_layer_equals_transformers(tmp_path: Path) -> None:
    """Each MoE layer gets its own row; each rank reads only the experts its slots hold (a second replica once)."""
    pytest.importorskip("safetensors", reason="checkpoints need safetensors: pip install -e '.[models]'")
    from epruntime.io.checkpoint import CheckpointReader
    from tests.tiny_checkpoints import hf_logits, hf_model, write_checkpoints

    path = write_checkpoints(tmp_path / "ckpt")["sharded"]
    rows = [_random_row(2, 6, seed) for seed in (1, 2)]  # 18 slots over 3 ranks, one row per MoE layer
    runtime = {"redundant_experts": 2, "placement": _placement_file(tmp_path, rows)}
    cfg = make_config(1, 3, runtime=runtime).replace(model=CheckpointReader(path).moe_config())
    ids = [torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(r)) for r in range(3)]
    outs = run_world(_model_logits, cfg, str(path), ids)
    reference = hf_model(path)
    for rank, (logits, slots, _) in enumerate(outs):
        assert rel_err(logits, hf_logits(reference, ids[rank])) <= 1e-4
        assert slots == [row[rank * 6 : (rank + 1) * 6] for row in rows]  # row i for MoE layer i


def test_a_placement_with_too_few_rows_for_the_checkpoint_is_refused(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("safetensors", reason="checkpoints need safetensors: pip install -e '.[models]'")
    from epruntime.cli.checkpoint_config import generate_config
    from epruntime.io.checkpoint import CheckpointReader
    from tests.tiny_checkpoints import write_checkpoints

    reader = CheckpointReader(write_checkpoints(tmp_path / "ckpt")["single"])  # 2 MoE layers
    two = _placement_file(tmp_path, [_random_row(2, 6, seed) for seed in (1, 2)])
    common = ["topology.ranks_per_node=3", "runtime.redundant_experts=2", f"runtime.placement={two}"]
    assert generate_config(reader, None, common, None).runtime.placement == two  # a row per MoE layer
    monkeypatch.setattr(type(reader), "num_layers", property(lambda self: 4))  # now 3 MoE layers (1-3)
    with pytest.raises(ConfigError, match=r"runtime.placement: .* has 2 rows for 3 MoE layers"):
        generate_config(reader, None, common, None)
