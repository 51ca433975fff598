"""Rebalancing while running (runtime.rebalance_every): outputs equal the reference before and after every
rebalance, only the changed slots move (by the bytes), every rank holds the same placement, the predicted
busiest/mean drops, FP8 blocks move with their scales, expert-TP slices move within their EP sub-world, and a rank
killed mid-rebalance ends the job naming the stage.

``pytest -s`` prints each rebalance's event (bytes, stall, the all-to-all of the same bytes, balance).
``python -m tests.test_rebalance kill RANK`` is one rank of the dead-rank job (started by the test).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from epruntime import EPMoE, init_runtime
from epruntime.io.fp8 import quantize_block_fp8
from epruntime.layer import rebalance as rebalance_module
from epruntime.layer.experts import LocalExperts
from epruntime.layer.reference import reference_moe
from epruntime.layer.slot_transfer import align, move_slots, plan_moves
from epruntime.parallel.health import run_or_exit
from epruntime.parallel.runtime import Runtime
from tests.distributed import _free_port, run_world
from tests.factories import layer_weights, make_config, rel_err, tokens

ROOT = Path(__file__).resolve().parents[1]
E, H, I = 16, 64, 32  # SMALL_MODEL's routed experts, hidden and intermediate sizes
EVERY, CALLS, T = 3, 7, 24  # rebalances after calls 3 and 6 (swaps after 4 and 7 in the background); tokens per call
BIAS = 6.0  # a large correction bias: a few experts take most of the routes


def _expected_slots(sd: dict, experts: list[int], tp_rank: int, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What an EP rank's slots must hold: ``w13 [S, 2I/tp, H]`` and ``w2 [S, H, I/tp]`` of ``experts``."""
    part = slice(tp_rank * I // tp, (tp_rank + 1) * I // tp)
    w13 = [
        torch.cat([sd[f"experts.{e}.gate_proj.weight"][part], sd[f"experts.{e}.up_proj.weight"][part]]) for e in experts
    ]
    w2 = [sd[f"experts.{e}.down_proj.weight"][:, part] for e in experts]
    return torch.stack(w13), torch.stack(w2)


def _run_rebalancing(rt: Runtime, sd: dict, background: bool) -> dict:
    """CALLS forwards of a rebalancing layer; each output against the reference, each slot against its expert."""
    layer = EPMoE.from_hf_state_dict(rt.cfg.model, sd, rt)
    layer.rebalancer.background = background
    tp, ep_rank = rt.layout.tp, rt.layout.ep.rank
    per_node = E // rt.topo.nnodes if rt.cfg.model.max_nodes_per_token else None  # node-limited routing
    rows, errors, weights_ok = [layer.placement.phy2log.tolist()], [], []
    for call in range(CALLS):
        x = tokens(T, H, 100 * call + rt.rank // tp.size)  # the ranks of a TP group share their tokens
        y = layer(x)  # swaps after calls EVERY and 2 * EVERY (+ 1 in the background)
        errors.append(rel_err(y, reference_moe(x, sd, rt.cfg.model, per_node)))
        rows.append(layer.placement.phy2log.tolist())
        w13, w2 = _expected_slots(sd, layer.placement.experts_of(ep_rank), tp.rank, tp.size)
        weights_ok.append(torch.equal(layer.experts.w13, w13) and torch.equal(layer.experts.w2, w2))
    y = layer(tokens(T, H, 999 + rt.rank // tp.size))  # one more forward on the final placement
    errors.append(rel_err(y, reference_moe(tokens(T, H, 999 + rt.rank // tp.size), sd, rt.cfg.model, per_node)))
    return {"rows": rows, "errors": errors, "weights_ok": weights_ok, "events": layer.rebalancer.events,
            "remap": layer.remap, "calls": layer.rebalancer.calls}  # fmt: skip


def _remote_moves(old: list[int], new: list[int], slots_per_rank: int) -> int:
    """Expert slices that must cross ranks from ``old`` to ``new``: per rank, the experts of its changed slots that
    it did not hold (an expert needed in two slots crosses once)."""
    need = set()
    for p, (was, e) in enumerate(zip(old, new, strict=True)):
        rank = p // slots_per_rank
        if was != e and e not in old[rank * slots_per_rank : (rank + 1) * slots_per_rank]:
            need.add((rank, e))
    return len(need)


CASES = {  # id: (nnodes, ranks_per_node, redundant, runtime extras, placement in the background, model extras)
    "1x2": (1, 2, 2, {"dispatcher": "flat"}, False, {}),
    "1x2-background": (1, 2, 2, {"dispatcher": "flat"}, True, {}),
    "2x2": (2, 2, 4, {"dispatcher": "hierarchical"}, False, {}),
    "2x2-tp2": (2, 2, 4, {"dispatcher": "hierarchical", "moe_tp": 2, "shared_expert_tp": 2}, False, {}),  # EP world 2
    "2x2-node-limited": (2, 2, 4, {"dispatcher": "hierarchical"}, False, {"max_nodes_per_token": 1}),
}


@pytest.mark.parametrize(("nnodes", "rpn", "redundant", "extra", "background", "model"), CASES.values(), ids=CASES)
def test_rebalance_moves_only_changed_slots_and_outputs_equal_the_reference(
    nnodes: int, rpn: int, redundant: int, extra: dict, background: bool, model: dict
) -> None:
    runtime = {"redundant_experts": redundant, "rebalance_every": EVERY, "load_window": EVERY, **extra}
    cfg = make_config(nnodes, rpn, runtime=runtime, **model)
    sd = layer_weights(cfg, 5, bias_scale=BIAS)
    outs = run_world(_run_rebalancing, cfg, sd, background)
    tp = extra.get("moe_tp", 1)
    ep_world, slots = nnodes * rpn // tp, E + redundant
    s = slots // ep_world
    first = outs[0]
    assert first["rows"][0] == [p % E for p in range(slots)]  # contiguous with R > 0: the replicas wrap around
    for out in outs:
        assert max(out["errors"]) <= 1e-5, out["errors"]
        assert all(out["weights_ok"]), out["weights_ok"]  # every slot holds its expert's slice, bit for bit
        assert out["rows"] == first["rows"]  # every rank (every EP sub-world) holds the same placement
        assert out["calls"] == CALLS + 1 and len(out["events"]) == CALLS // EVERY
    events = first["events"]
    for event in events:
        print(f"\n{nnodes}x{rpn} tp{tp} R={redundant}{' background' * background}: {event}")
    late = int(background)  # in the background, call EVERY + 1 runs on the old placement
    initial, after_first = first["rows"][0], first["rows"][EVERY + late]
    assert after_first != initial and events[0]["changed"] and first["remap"]
    assert first["rows"][1 : EVERY + late] == [initial] * (EVERY - 1 + late)
    assert events[0]["busiest_over_mean_after"] < events[0]["busiest_over_mean_before"]
    if model.get("max_nodes_per_token"):  # a rebalanced replica sits on its expert's node (the initial wrap may not)
        home = [[e // (E // nnodes) == p // (slots // nnodes) for p, e in enumerate(row)] for row in first["rows"]]
        assert not all(home[0]) and all(all(h) for h in home[EVERY + late :])
    for n, event in enumerate(events):
        swap = EVERY * (n + 1) + late
        assert (event["load_call"], event["call"]) == (EVERY * (n + 1), swap)
        old, new = first["rows"][swap - 1], first["rows"][swap]
        changed = sum(a != b for a, b in zip(old, new, strict=True))
        remote = _remote_moves(old, new, s)
        assert event["slots_changed"] == changed and event["local_copies"] == changed - remote
        assert event["bytes_per_slot"] == 3 * I * H * 4 // tp  # one fp32 expert slice
        assert event["bytes_moved"] == remote * 3 * I * H * 4  # the slices of every TP index, summed over ranks
        assert sum(o["events"][n]["bytes_sent"] for o in outs) == event["bytes_moved"]
        assert event["stall_ms"] >= max(o["events"][n]["stall_ms_rank"] for o in outs) - 1e-9
        assert (event["all_to_all_ms"] is None) == (remote == 0)


def _fp8_rebalance(rt: Runtime, sd: dict) -> dict:
    """FP8 experts (as grouped_gemm: deep_gemm keeps them) rebalanced from a given load; no forward (CPU)."""
    layer = EPMoE.from_hf_state_dict(rt.cfg.model, sd, rt)
    w13, w2 = _expected_slots(sd, layer.placement.experts_of(rt.layout.ep.rank), 0, 1)
    layer.experts = LocalExperts(rt.cfg.model, w13, w2, "deep_gemm")  # 128 x 128 blocks, scales beside them
    load = torch.ones(E, dtype=torch.int64)
    load[[3, 4, 5]] = 1000  # three hot experts, all on rank 0 in the contiguous placement
    event = layer.rebalancer.rebalance(load)
    experts = layer.placement.experts_of(rt.layout.ep.rank)
    want = [quantize_block_fp8(w) for w in _expected_slots(sd, experts, 0, 1)]
    got = [
        (layer.experts.w13_weight, layer.experts.w13_scale_inv),
        (layer.experts.w2_weight, layer.experts.w2_scale_inv),
    ]
    same = all(
        torch.equal(g.view(torch.uint8), w.weight.view(torch.uint8)) and torch.equal(sc, w.scale_inv)
        for (g, sc), w in zip(got, want, strict=True)
    )
    blocks_shared = layer.experts.w13.weight.data_ptr() == layer.experts.w13_weight.data_ptr()  # moved in place
    return {"event": event, "same": same, "in_place": blocks_shared, "row": layer.placement.phy2log.tolist()}


def test_fp8_blocks_move_with_their_scales() -> None:
    cfg = make_config(1, 2, runtime={"redundant_experts": 2, "rebalance_every": 1000})
    sd = layer_weights(cfg, 2)
    outs = run_world(_fp8_rebalance, cfg, sd)
    event = outs[0]["event"]
    print(f"\nfp8 1x2: {event}")
    assert event["changed"] and all(o["same"] and o["in_place"] for o in outs)
    assert outs[0]["row"] == outs[1]["row"]
    # an FP8 slice: 3 I H bytes of values, one fp32 scale per 128 x 128 block of each matrix (one block each here)
    assert event["bytes_per_slot"] == 3 * I * H + 2 * 4
    assert event["bytes_moved"] == _remote_moves([p % E for p in range(E + 2)], outs[0]["row"], 9) * (3 * I * H + 8)


def test_plan_prefers_the_destination_then_its_node_then_the_lowest_rank() -> None:
    # 4 ranks x 2 slots, 2 ranks per node; old: rank0 [0 1] rank1 [2 3] rank2 [4 5] rank3 [6 0]
    old = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    new = torch.tensor([0, 0, 2, 6, 4, 5, 3, 3])  # slot 1: 0 (local on rank 0); slot 3: 6 (only on rank 3)
    plan = plan_moves(old, new, slots_per_rank=2, ranks_per_node=2)
    by_slot = {m.dest_slot: m for m in plan.moves}
    assert sorted(by_slot) == [1, 3, 6, 7]
    assert (by_slot[1].src_rank, by_slot[1].src_slot) == (0, 0) and plan.is_local(by_slot[1])
    assert (by_slot[3].src_rank, by_slot[3].src_slot) == (3, 6)  # rank 1 (node 0) gets 6 from rank 3 (node 1)
    assert (by_slot[6].src_rank, by_slot[6].src_slot) == (1, 3) and not plan.is_local(by_slot[6])
    assert by_slot[7].duplicate and plan.is_local(by_slot[7])  # rank 3 receives 3 once, for both slots
    assert plan.sends(1) == {3: [by_slot[6]]} and plan.receives(1) == {3: [by_slot[3]]} and plan.sends(0) == {}
    near = plan_moves(torch.tensor([7, 0, 1, 2, 7, 3, 5, 6]), torch.tensor([7, 0, 1, 2, 7, 3, 5, 7]), 2, 2)
    assert [(m.src_rank, m.src_slot) for m in near.moves] == [(2, 4)]  # rank 3 takes 7 from its node, not rank 0


def _swap_slots(rt: Runtime, old: list[int], new: list[int]) -> dict:
    """``move_slots`` on two per-slot tensors (fp32 and FP8) whose rows name the expert they hold."""
    s = len(old) // rt.world_size
    mine = torch.tensor(old[rt.rank * s : (rt.rank + 1) * s], dtype=torch.float32)  # [S]
    dense = mine[:, None] * 10 + torch.arange(4.0)  # [S, 4]
    fp8 = (mine[:, None, None] + torch.zeros(2, 2)).to(torch.float8_e4m3fn)  # [S, 2, 2]
    plan = plan_moves(torch.tensor(old), torch.tensor(new), s, ranks_per_node=2)
    sent = move_slots([dense, fp8], plan, rt.layout.ep.rank, rt.layout.ep.world)
    return {"dense": dense, "fp8": fp8.float(), "sent": sent}


def test_move_slots_swaps_between_ranks_and_keeps_what_is_still_read() -> None:
    old = [0, 1, 2, 3, 4, 5]  # rank 0 holds 0 1 2, rank 1 holds 3 4 5
    new = [3, 1, 0, 0, 0, 5]  # a swap of slots 0 and 3 whose old contents are still read, a copy, a duplicate
    outs = run_world(_swap_slots, make_config(1, 2), old, new)
    for rank, out in enumerate(outs):
        want = torch.tensor(new[rank * 3 : (rank + 1) * 3], dtype=torch.float32)
        assert torch.equal(out["dense"], want[:, None] * 10 + torch.arange(4.0))
        assert torch.equal(out["fp8"], want[:, None, None].expand(3, 2, 2))
        assert out["sent"] == 4 * 4 + 4  # one slot each way: 4 fp32 and 4 FP8 values


def test_align_keeps_every_rank_load_and_moves_less() -> None:
    old = torch.tensor([p % 8 for p in range(12)])  # 4 ranks x 3 slots, 2 nodes
    new = torch.tensor([4, 5, 0, 6, 7, 1, 0, 1, 2, 3, 2, 3])  # old's nodes and ranks, shuffled
    aligned = align(old, new, slots_per_rank=3, ranks_per_node=2, num_experts=8, keep_nodes=False)
    ranks = lambda row: sorted(sorted(row[r * 3 : (r + 1) * 3].tolist()) for r in range(4))  # noqa: E731
    assert ranks(aligned) == ranks(new)  # the same multisets of experts per rank, only relabelled
    assert (aligned != old).sum() < (new != old).sum()
    kept = align(old, new, 3, 2, 8, keep_nodes=True)
    assert sorted(kept[:6].tolist()) == sorted(new[:6].tolist())  # node-limited: each node keeps its experts


# ---------------------------------------------------------------- a rank killed mid-rebalance


def _job(fault_rank: int) -> None:
    """One rank of a 1 x 2 job that rebalances every 2 calls; ``fault_rank`` kills itself inside the transfer."""
    cfg = make_config(1, 2, runtime={"timeout_s": 6.0, "redundant_experts": 2, "rebalance_every": 2})
    rt = init_runtime(cfg)
    layer = EPMoE.from_hf_state_dict(cfg.model, layer_weights(cfg, 5, bias_scale=BIAS), rt)
    moving = rebalance_module.move_slots

    def die_in_transfer(*args: object) -> int:
        if rt.rank == fault_rank:
            print(f"FAULT {time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return moving(*args)

    rebalance_module.move_slots = die_in_transfer
    run_or_exit(lambda: [layer(tokens(T, H, i)) for i in range(4)])
    print(f"rank {rt.rank} finished", flush=True)


def test_rank_killed_mid_rebalance_ends_the_job_naming_the_stage() -> None:
    port, world, fault_rank = _free_port(), 2, 1
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
        command = [sys.executable, "-m", "tests.test_rebalance", "kill", str(fault_rank)]
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, -signal.SIGKILL], outs
    assert "FAULT" in outs[fault_rank]
    assert "[rank 0] error: rank 0: moe layer > rebalance > transfer failed; no word from rank(s) [1]" in outs[0], outs


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "kill":
        _job(int(sys.argv[2]))
