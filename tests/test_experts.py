"""The local expert stage against a per-pair computation, for grouped_mm and the loop fallback; the shared expert."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epruntime.dispatch.base import count_tokens_per_expert, pack_routing, unpack_routing
from epruntime.layer import activation, shared
from epruntime.layer import experts as experts_module
from epruntime.layer.experts import LocalExperts
from epruntime.layer.shared import SharedExpert
from tests.factories import make_config, rel_err


def _naive(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    inter = w2.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float64)
    for r in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[r, k])
            if e < 0:
                continue
            xd = x[r].double()
            h = w13[e].double() @ xd
            y[r] += float(w[r, k]) * (w2[e].double() @ (F.silu(h[:inter]) * h[inter:]))
    return y


@pytest.mark.parametrize("mode", ["grouped_mm", "loop"])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_local_experts_match_per_pair_loop(mode: str, rows: int) -> None:
    cfg = make_config(hidden_size=24, moe_intermediate_size=8)
    gen = torch.Generator().manual_seed(rows)
    e_local, k = 4, cfg.model.num_experts_per_tok
    w13 = torch.randn(e_local, 16, 24, generator=gen)
    w2 = torch.randn(e_local, 24, 8, generator=gen)
    x = torch.randn(rows, 24, generator=gen)
    idx = torch.randint(-1, e_local, (rows, k), generator=gen)
    idx[:, 0] = torch.randint(0, e_local, (rows,), generator=gen)  # every received row has a local expert
    weights = torch.rand(rows, k, generator=gen)
    experts = LocalExperts(cfg.model, w13, w2, grouped_gemm=mode)
    y = experts(x, idx, weights, count_tokens_per_expert(idx, e_local))
    assert y.shape == (rows, 24)
    assert rel_err(y, _naive(x, idx, weights, w13, w2)) <= 1e-5


def test_expert_with_no_rows_and_skewed_counts() -> None:
    cfg = make_config(hidden_size=16, moe_intermediate_size=8)
    w13, w2 = torch.randn(3, 16, 16), torch.randn(3, 16, 8)
    idx = torch.full((10, 4), -1)
    idx[:, 2] = 1  # all pairs on expert 1; experts 0 and 2 get nothing
    weights = torch.rand(10, 4)
    counts = count_tokens_per_expert(idx, 3)
    assert counts.tolist() == [0, 10, 0]
    x = torch.randn(10, 16)
    y = LocalExperts(cfg.model, w13, w2, grouped_gemm="grouped_mm")(x, idx, weights, counts)
    assert rel_err(y, _naive(x, idx, weights, w13, w2)) <= 1e-5


def test_routing_pack_round_trip() -> None:
    idx = torch.tensor([[3, -1], [0, 7]])
    weights = torch.tensor([[0.25, -1.5], [1e-30, 3.0]])
    back_idx, back_w = unpack_routing(pack_routing(idx, weights))
    assert torch.equal(back_idx, idx) and torch.equal(back_w, weights)


def test_shared_expert_is_the_plain_swiglu_mlp() -> None:
    """The shared expert runs the package's one SwiGLU (the routed experts' own) on its fused gate/up weight."""
    gen = torch.Generator().manual_seed(3)
    gate, up, down = torch.randn(12, 16, generator=gen), torch.randn(12, 16, generator=gen), torch.randn(16, 12)
    x = torch.randn(7, 16, generator=gen)
    y = SharedExpert(torch.cat([gate, up]), down)(x)
    expected = (F.silu(x.double() @ gate.double().T) * (x.double() @ up.double().T)) @ down.double().T
    assert rel_err(y, expected) <= 1e-6
    assert experts_module.swiglu is shared.swiglu is activation.swiglu  # one implementation
