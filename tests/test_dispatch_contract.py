"""The dispatcher contract: what every backend must do, checked on real worlds.

Every registered torch backend runs in one 2 nodes x 2 ranks gloo world (DeepEP's run on GPUs where
``deep_ep`` imports). Each rank's tokens carry their own identity in channel 0, so the checks can
say exactly which rows arrived where:

- shapes and counts: the normal layout receives each token once per destination rank with its
  top-k made local; the masked (low-latency) layout has ``masked_m[e]`` rows per local expert;
- round trip: combine of the identity expert stage gives ``x * destination ranks`` (normal: the
  expert stage weights, combine sums) or ``x * sum of weights`` (masked: combine weights);
- zero tokens, skewed routing (every token on one rank's experts) and capacity overflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from epruntime.config.kernel_limits import deep_ep_import_error
from epruntime.dispatch.base import MaskedDispatchResult
from epruntime.dispatch.lowlatency import CapacityError
from epruntime.dispatch.registry import NAMES, names_where
from epruntime.layer.moe import EPMoE
from epruntime.layer.reference import reference_moe
from epruntime.parallel.runtime import Runtime
from tests.distributed import run_world
from tests.factories import dispatcher_for, gpu_config, layer_weights, make_config, rel_err, tokens

DEEPEP_DISPATCHERS = names_where(needs_deepep=True)
CAPACITY_DISPATCHERS = names_where(capacity_bound=True)
MOVES_ROWS = names_where(local_on_one_rank=True)  # nothing to move on a one-rank EP world
TORCH_BACKENDS = [name for name in NAMES if name not in DEEPEP_DISPATCHERS]
CAPACITY = 8  # runtime.max_tokens_per_rank of the contract worlds
ID_BASE = 16  # x[t, 0] = ID_BASE * rank + t: exact in bf16 too for up to 15 ranks


@dataclass
class DispatchCase:
    """Every rank's tokens and their routes for one dispatch: no layer weights, the routing is given
    (unlike ``tests.cases.LayerCase``, whose routes come from the layer's router)."""

    name: str
    xs: list[torch.Tensor]  # [T_r, H] per rank; x[t, 0] = ID_BASE * rank + t identifies the token
    idx: list[torch.Tensor]  # [T_r, K] global expert ids per rank (distinct per token)
    weights: list[torch.Tensor]  # [T_r, K] fp32


def _case(name: str, counts: list[int], hidden: int, num_experts: int, k: int, seed: int, experts=None) -> DispatchCase:
    gen = torch.Generator().manual_seed(seed)
    pool = torch.arange(num_experts) if experts is None else torch.tensor(experts)
    xs, idx, weights = [], [], []
    for rank, t in enumerate(counts):
        x = torch.randn(t, hidden, generator=gen)
        x[:, 0] = ID_BASE * rank + torch.arange(t)
        xs.append(x)
        picks = [pool[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(t)]  # distinct per token
        idx.append(torch.stack(picks) if picks else torch.zeros(0, k, dtype=torch.int64))
        weights.append(torch.rand(t, k, generator=gen) + 0.1)
    return DispatchCase(name, xs, idx, weights)


def contract_cases(world: int, hidden: int, num_experts: int, k: int) -> list[DispatchCase]:
    """Uneven counts with an empty rank, all ranks empty, and every token on the last rank's experts."""
    e_local = num_experts // world
    counts = [(5 * r + 3) % (CAPACITY + 1) for r in range(world)]
    counts[1] = 0
    return [
        _case("uneven", counts, hidden, num_experts, k, 1),
        _case("empty", [0] * world, hidden, num_experts, k, 2),
        _case("skewed", [CAPACITY] * world, hidden, num_experts, k, 3, range((world - 1) * e_local, world * e_local)),
    ]


def _dispatch_cases(rt: Runtime, names: list[str], cases: list[DispatchCase]) -> dict[str, object]:
    """Per backend: per case the received layout and the identity round trip (CPU tensors), or the error."""
    dev, dtype = rt.device, rt.cfg.model.torch_dtype
    out: dict[str, object] = {}
    for name in names:
        try:
            dispatcher, runs = dispatcher_for(rt, name), []
            for case in cases:
                x = case.xs[rt.rank].to(dev, dtype)
                result = dispatcher.dispatch(x, case.idx[rt.rank].to(dev), case.weights[rt.rank].to(dev))
                back = dispatcher.combine(result.recv_x, result.handle)  # the identity expert stage
                if isinstance(result, MaskedDispatchResult):
                    layout = ("masked", result.recv_x.shape, result.masked_m.tolist(), result.recv_x.float().cpu())
                else:
                    layout = (
                        "normal",
                        result.recv_x.float().cpu(),
                        result.recv_topk_idx.cpu(),
                        result.recv_topk_weights.cpu(),
                        result.tokens_per_expert.tolist(),
                    )
                runs.append((layout, back.float().cpu()))
            overflow = None
            if name in CAPACITY_DISPATCHERS:  # every rank overflows: each raises before any collective
                x = torch.zeros(CAPACITY + 1, rt.cfg.model.hidden_size, device=dev, dtype=dtype)
                ids = torch.zeros(CAPACITY + 1, rt.cfg.model.num_experts_per_tok, dtype=torch.int64, device=dev)
                try:
                    dispatcher.dispatch(x, ids, ids.float())
                except CapacityError as exc:
                    overflow = str(exc)
            out[name] = (runs, overflow)
        except Exception as exc:  # reported by that backend's test, not the others'
            out[name] = exc
    return out


def _senders(case: DispatchCase, rank: int, e_local: int) -> list[tuple[int, int]]:
    """(source rank, token) pairs that need ``rank``, in source order."""
    return [
        (s, t)
        for s, idx in enumerate(case.idx)
        for t in range(idx.shape[0])
        if bool((torch.div(idx[t], e_local, rounding_mode="floor") == rank).any())
    ]


def _ids(rows: torch.Tensor) -> list[tuple[int, int]]:
    return [divmod(int(v), ID_BASE) for v in rows[:, 0].round().tolist()]


def check_case(case: DispatchCase, rank: int, e_local: int, layout: tuple, back: torch.Tensor, tol: float) -> None:
    """One rank's received layout and round trip against what the routing of every rank implies."""
    senders = _senders(case, rank, e_local)
    first = rank * e_local
    if layout[0] == "normal":
        _, recv_x, recv_idx, recv_w, per_expert = layout
        assert recv_x.shape == (len(senders), case.xs[0].shape[1]) and recv_idx.shape == (
            len(senders),
            case.idx[0].shape[1],
        )
        assert sorted(_ids(recv_x)) == senders  # each needed token exactly once
        for row, (s, t) in enumerate(_ids(recv_x)):
            assert rel_err(recv_x[row], case.xs[s][t]) <= tol
            local = case.idx[s][t] - first
            expected = torch.where((local >= 0) & (local < e_local), local, -1)
            assert torch.equal(recv_idx[row], expected)
            assert torch.equal(recv_w[row][expected >= 0], case.weights[s][t][expected >= 0])
        assert per_expert == [sum(int((i == first + e).sum()) for i in case.idx) for e in range(e_local)]
    else:
        _, shape, masked_m, recv_x = layout
        assert tuple(shape) == (e_local, CAPACITY * len(case.xs), case.xs[0].shape[1])
        for e in range(e_local):
            chose = [(s, t) for s, t in senders if bool((case.idx[s][t] == first + e).any())]
            assert masked_m[e] == len(chose)
            rows = recv_x[e, : masked_m[e]]
            assert sorted(_ids(rows)) == chose
            for row, (s, t) in zip(rows, _ids(rows), strict=True):
                assert rel_err(row, case.xs[s][t]) <= tol
    x = case.xs[rank]
    if layout[0] == "normal":  # the expert stage weights, combine sums one row per destination rank
        scale = torch.tensor([float(len(set((i // e_local).tolist()))) for i in case.idx[rank]])
    else:  # combine applies the weights
        scale = case.weights[rank].sum(dim=1)
    assert back.shape == x.shape
    assert rel_err(back, x * scale.unsqueeze(1)) <= tol


def check_backend(name: str, outputs: list[dict], cases: list[DispatchCase], e_local: int, tol: float) -> None:
    """Every case on every rank, and the overflow message of a capacity backend."""
    for rank, out in enumerate(outputs):
        if isinstance(out[name], Exception):
            raise out[name]
        runs, overflow = out[name]
        for case, (layout, back) in zip(cases, runs, strict=True):
            try:
                check_case(case, rank, e_local, layout, back, tol)
            except AssertionError as exc:
                raise AssertionError(f"{name}, case {case.name}, rank {rank}: {exc}") from exc
        if name in CAPACITY_DISPATCHERS:
            assert overflow is not None and "\n" not in overflow
            assert f"runtime.max_tokens_per_rank={CAPACITY}" in overflow


def _cpu_config():
    return make_config(2, 2, runtime={"max_tokens_per_rank": CAPACITY, "tokens_per_rank": CAPACITY})


@pytest.fixture(scope="module")
def cpu_contract() -> tuple[list[dict], list[DispatchCase], int]:
    """All torch backends in one 2 x 2 gloo world (one world start for the whole suite)."""
    cfg = _cpu_config()
    m = cfg.model
    cases = contract_cases(cfg.topology.world_size, m.hidden_size, m.n_routed_experts, m.num_experts_per_tok)
    return run_world(_dispatch_cases, cfg, TORCH_BACKENDS, cases), cases, m.n_routed_experts // 4


@pytest.mark.parametrize("name", TORCH_BACKENDS)
def test_contract_on_cpu(name: str, cpu_contract) -> None:
    outputs, cases, e_local = cpu_contract
    check_backend(name, outputs, cases, e_local, tol=1e-6)


def _local_dispatchers(rt: Runtime, cases: list[DispatchCase]) -> tuple[list[str], dict[str, object], dict[str, int]]:
    dispatchers = [dispatcher_for(rt, name) for name in MOVES_ROWS]
    outputs = _dispatch_cases(rt, list(MOVES_ROWS), cases)
    return [type(d).__name__ for d in dispatchers], outputs, dict(dispatchers[0].traffic.bytes)


def test_one_rank_world_moves_nothing_and_keeps_the_contract() -> None:
    cfg = make_config(1, 1, runtime={"tokens_per_rank": CAPACITY})
    m = cfg.model
    cases = [
        _case("one rank", [CAPACITY], m.hidden_size, m.n_routed_experts, m.num_experts_per_tok, 4),
        _case("empty", [0], m.hidden_size, m.n_routed_experts, m.num_experts_per_tok, 5),
    ]
    [(kinds, outputs, traffic)] = run_world(_local_dispatchers, cfg, cases)
    assert kinds == ["LocalDispatcher"] * len(MOVES_ROWS)
    for name in MOVES_ROWS:
        check_backend(name, [outputs], cases, m.n_routed_experts, tol=0.0)
    assert traffic == {}


def _deepep_skip_reason() -> str | None:
    reason = deep_ep_import_error()
    if reason is not None:
        return f"deep_ep is not importable ({reason}); build it with docker/Dockerfile"
    if torch.cuda.device_count() < 2:
        return "DeepEP needs at least 2 CUDA GPUs"
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("name", DEEPEP_DISPATCHERS)
def test_contract_on_deepep(name: str) -> None:
    reason = _deepep_skip_reason()
    if reason:
        pytest.skip(reason)
    world = 2
    cfg = gpu_config(world, name, CAPACITY)
    m = cfg.model
    cases = contract_cases(world, m.hidden_size, m.n_routed_experts, m.num_experts_per_tok)
    outputs = run_world(_dispatch_cases, cfg, [name], cases)
    check_backend(name, outputs, cases, m.n_routed_experts // world, tol=1e-2)


def _layers(rt: Runtime, sd: dict, batches: list[list[torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The EP layer (``runtime.dispatcher``) on each batch: which result layout it used, and its output."""
    layer = EPMoE.from_hf_state_dict(rt.cfg.model, sd, rt)
    layouts, run = [], layer.experts.run

    def recording_run(result):
        layouts.append(type(result).__name__)
        return run(result)

    layer.experts.run = recording_run
    outputs = [layer(xs[rt.rank]) for xs in batches]
    return list(zip(layouts, outputs, strict=True))


@pytest.mark.parametrize("name", ["lowlatency", "auto"])
def test_ep_layer_low_latency_equals_reference(name: str) -> None:
    """fp32 EP layer on 2 x 2 == the single-process reference; auto goes low-latency only for decode batches."""
    cfg = make_config(2, 2, runtime={"dispatcher": name, "max_tokens_per_rank": CAPACITY, "tokens_per_rank": 4})
    sd = layer_weights(cfg, 5, bias_scale=5.0)
    h = cfg.model.hidden_size
    decode = [tokens(n, h, 70 + r) for r, n in enumerate([CAPACITY, 3, 0, 5])]
    prefill = [tokens(n, h, 80 + r) for r, n in enumerate([3 * CAPACITY, 1, 7, 0])]
    batches = [decode, prefill] if name == "auto" else [decode]
    outputs = run_world(_layers, cfg, sd, batches)
    for i, xs in enumerate(batches):
        expected = reference_moe(torch.cat(xs), sd, cfg.model)
        assert rel_err(torch.cat([out[i][1] for out in outputs]), expected) <= 1e-5
        layouts = {out[i][0] for out in outputs}
        assert layouts == {"MaskedDispatchResult" if xs is decode else "DispatchResult"}
