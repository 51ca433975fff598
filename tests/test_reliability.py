"""Bad input, config disagreement between ranks, soak (flat memory, right answers) and determinism."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from epruntime import EPMoE, init_runtime
from epruntime.layer.reference import reference_moe
from epruntime.parallel.health import RankFailure, is_collective_failure
from epruntime.parallel.runtime import Runtime, shutdown_runtime
from tests.distributed import _free_port, run_world
from tests.factories import layer_weights, make_config, rel_err, tokens

ROOT = Path(__file__).resolve().parents[1]


def test_bad_activations_are_rejected_with_the_fix() -> None:
    cfg = make_config()
    rt = init_runtime(cfg)
    try:
        layer = EPMoE.random(cfg.model, rt, seed=0)
        h = cfg.model.hidden_size
        with pytest.raises(ValueError, match=rf"expected x of shape \[T, {h}\] \(model.hidden_size\), got \(4, 3\)"):
            layer(torch.zeros(4, 3))
        with pytest.raises(ValueError, match="expected x of shape"):
            layer(torch.zeros(2, 4, h))
        with pytest.raises(TypeError, match=r"expected dtype torch.float32 \(model.dtype\), got torch.bfloat16"):
            layer(torch.zeros(4, h, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="expected x on cpu, got meta"):
            layer(torch.zeros(4, h, device="meta"))
        assert layer(torch.zeros(4, h)).shape == (4, h)  # the layer still works after rejecting bad input
    finally:
        shutdown_runtime()


def test_ranks_that_disagree_on_the_config_fail_at_start_up() -> None:
    """Two real ranks started with different --set values: both exit 2 naming the section, no hang."""
    port = _free_port()
    procs = []
    for rank, hidden in ((0, 256), (1, 128)):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, "-m", "epruntime", "run", "--config", "configs/cpu-sim.yaml",
               "--set", "topology.ranks_per_node=1", "--set", f"model.hidden_size={hidden}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        err = p.communicate(timeout=120)[1]
        assert p.returncode == 2, err
        assert "epruntime: error: model: rank(s) [1] run a different model section than rank 0" in err
        assert "Traceback" not in err


def _soak(rt: Runtime, sd: dict[str, torch.Tensor], iters: int) -> dict[str, float]:
    """Varying batches (zero, skewed, large); RSS growth after warm-up and the worst error."""
    layer = EPMoE.from_hf_state_dict(rt.cfg.model, sd, rt)
    skewed = dict(sd, **{"gate.e_score_correction_bias": sd["gate.e_score_correction_bias"].clone()})
    skewed["gate.e_score_correction_bias"][3] = 50.0  # every token picks expert 3
    skewed_layer = EPMoE.from_hf_state_dict(rt.cfg.model, skewed, rt)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * page

    worst, start = 0.0, 0
    for i in range(iters):
        n = [0, 1, 40, 7, 200, 33][(i + rt.rank) % 6]
        x = tokens(n, rt.cfg.model.hidden_size, 1000 * i + rt.rank)
        use_skewed = i % 5 == 4
        y = (skewed_layer if use_skewed else layer)(x)
        if i % 7 == 0:
            worst = max(worst, rel_err(y, reference_moe(x, skewed if use_skewed else sd, rt.cfg.model)))
        if i == 20:
            start = rss()
    return {"rss_growth_bytes": rss() - start, "max_rel_err": worst}


def test_soak_keeps_memory_flat_and_outputs_right() -> None:
    cfg = make_config(2, 2, runtime={"dispatcher": "hierarchical"})
    results = run_world(_soak, cfg, layer_weights(cfg, 8), 200)
    for r in results:
        assert r["max_rel_err"] <= 1e-5
        assert r["rss_growth_bytes"] < 16 * 2**20, r  # bounded: no per-iteration leak over 180 layers


def _outputs(rt: Runtime, sd: dict[str, torch.Tensor], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    layer = EPMoE.from_hf_state_dict(rt.cfg.model, sd, rt)
    per_rank = len(xs) // rt.world_size
    mine = torch.cat(xs[rt.rank * per_rank : (rt.rank + 1) * per_rank])
    return [layer(mine), layer(mine)]


def test_deterministic_runs_are_bit_identical_and_world_sizes_agree() -> None:
    base = make_config(2, 2, runtime={"deterministic": True})
    sd = layer_weights(base, 13)
    xs = [tokens(12, base.model.hidden_size, 70 + i) for i in range(4)]
    first = run_world(_outputs, base, sd, xs)
    again = run_world(_outputs, base, sd, xs)
    for (a1, a2), (b1, _) in zip(first, again, strict=True):
        assert torch.equal(a1, a2) and torch.equal(a1, b1)  # repeated forwards and repeated runs
    full = torch.cat([outs[0] for outs in first])
    for nnodes, rpn, dispatcher in ((1, 1, "flat"), (1, 2, "flat"), (1, 4, "hierarchical"), (2, 2, "flat")):
        cfg = make_config(nnodes, rpn, runtime={"deterministic": True, "dispatcher": dispatcher})
        other = torch.cat([outs[0] for outs in run_world(_outputs, cfg, sd, xs)])
        assert rel_err(other, full) <= 1e-6, (nnodes, rpn, dispatcher)


def _tp_batches(rt: Runtime, counts: list[int]) -> str:
    """One forward with ``counts[rank]`` tokens; the error each rank raised."""
    layer = EPMoE.random(rt.cfg.model, rt, seed=0)
    try:
        layer(tokens(counts[rt.rank], rt.cfg.model.hidden_size, rt.rank))
    except (ValueError, RankFailure) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_unequal_tokens_in_an_expert_tp_group_are_refused_on_every_rank() -> None:
    """The ranks of a TP group share their tokens: different counts used to abort inside gloo (SIGABRT)."""
    cfg = make_config(1, 4, runtime={"moe_tp": 2})
    messages = run_world(_tp_batches, cfg, [5, 5, 4, 6])  # group 0 agrees, group 1 does not
    rule = "runtime.moe_tp: the 2 ranks of an expert-TP group share their tokens and must each get the same number"
    for message in messages[2:]:  # the group that disagrees: every rank raises, before any other collective
        assert message.startswith(f"ValueError: {rule}, got between 4 and 6"), message
    for message in messages[:2]:  # its peers find it gone and quote its error
        assert message.startswith("RankFailure:") and rule in message, message


def test_only_backend_errors_count_as_a_peer_failure() -> None:
    """A shape error is a plain RuntimeError too: it is this rank's bug, not a sign that a peer died."""
    with pytest.raises(RuntimeError) as shape_error:
        torch.ones(3) + torch.ones(4)
    assert not is_collective_failure(shape_error.value)
    assert not is_collective_failure(ValueError("gloo"))  # only RuntimeErrors and DistErrors come from backends
    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4711"
    assert is_collective_failure(RuntimeError(gloo))
    assert is_collective_failure(RuntimeError("Timed out waiting 6000ms for recv operation to complete"))
    assert is_collective_failure(dist.DistBackendError("NCCL error: remote process exited"))


def _local_bug(rt: Runtime) -> str:
    """Rank 1 hits a shape bug inside the layer; what each rank's failure handling says."""
    layer = EPMoE.random(rt.cfg.model, rt, seed=0)
    if rt.rank == 1:
        layer.router.forward = lambda x: (torch.ones(3) + torch.ones(4), None)
    try:
        layer(tokens(4, rt.cfg.model.hidden_size, rt.rank))
    except RankFailure as exc:
        return f"RankFailure: {exc}"
    except RuntimeError as exc:
        return f"own: {exc}"
    return "no error"


def test_a_local_bug_is_reported_as_its_own_rank_not_blamed_on_peers() -> None:
    cfg = make_config(1, 2, runtime={"timeout_s": 5})
    zero, one = run_world(_local_bug, cfg)
    assert one.startswith("own: The size of tensor a (3) must match")
    assert zero.startswith("RankFailure: rank 0:") and "rank 1 failed: RuntimeError" in zero, zero
