"""Cross-field checks of a parsed :class:`~epruntime.config.Config`, made before any process group exists.

:func:`validate` checks the config alone (every rank reaches the same verdict); :func:`check_environment`
checks what this machine offers (GPUs, DeepEP, DeepGEMM). Each failure is one :class:`ConfigError` line
naming the field and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from epruntime.config import dispatchers as registry
from epruntime.config import kernel_limits
from epruntime.config.errors import ConfigError
from epruntime.config.placement_file import CONTIGUOUS, FIX, read_phy2log

if TYPE_CHECKING:
    from epruntime.config.schema import Config, MoEConfig


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_model(m: MoEConfig) -> None:
    """The model section's own constraints (also checked for a checkpoint's config.json)."""
    for name in ("hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group"):
        _require(getattr(m, name) > 0, f"model.{name}: must be positive, got {getattr(m, name)}")
    _require(m.n_shared_experts >= 0, f"model.n_shared_experts: must be >= 0, got {m.n_shared_experts}")
    _require(m.topk_group > 0, f"model.topk_group: must be positive, got {m.topk_group}")
    _require(
        m.n_routed_experts % m.n_group == 0,
        f"model.n_routed_experts: {m.n_routed_experts} is not divisible by model.n_group={m.n_group}; "
        f"use a multiple of n_group",
    )
    _require(
        m.topk_group <= m.n_group,
        f"model.topk_group: {m.topk_group} is larger than model.n_group={m.n_group}; set topk_group <= n_group",
    )
    per_group = m.n_routed_experts // m.n_group
    _require(
        m.scoring_func != "sigmoid" or per_group >= 2 or m.n_group == 1,
        f"model.n_group: sigmoid routing scores groups by their top-2 experts but each of the {m.n_group} "
        f"groups has {per_group} expert; use fewer groups",
    )
    reachable = m.topk_group * per_group
    _require(
        m.num_experts_per_tok <= reachable,
        f"model.num_experts_per_tok: {m.num_experts_per_tok} is more than the {reachable} experts in "
        f"topk_group={m.topk_group} groups of {per_group}; lower num_experts_per_tok or raise topk_group",
    )
    _require(m.routed_scaling_factor > 0, "model.routed_scaling_factor: must be positive")
    if m.max_nodes_per_token is not None:
        nodes = m.max_nodes_per_token
        _require(nodes > 0, f"model.max_nodes_per_token: must be positive, got {nodes}; or leave it unset (off)")
        _require(
            m.num_experts_per_tok % nodes == 0,
            f"model.max_nodes_per_token: num_experts_per_tok={m.num_experts_per_tok} is not divisible by {nodes}; "
            f"use a divisor of num_experts_per_tok",
        )


def _validate_node_limit(m: MoEConfig, nnodes: int) -> None:
    """Node-limited routing must leave every token at least K experts to choose from."""
    nodes = m.max_nodes_per_token
    if nodes is None:
        return
    _require(
        nodes <= nnodes,
        f"model.max_nodes_per_token: {nodes} is more than topology.nnodes={nnodes}; set it <= nnodes or unset it",
    )
    per_node, per_group = m.n_routed_experts // nnodes, m.n_routed_experts // m.n_group
    need = m.num_experts_per_tok // nodes
    _require(
        per_node >= need,
        f"model.max_nodes_per_token: each node holds {per_node} experts, fewer than num_experts_per_tok / "
        f"max_nodes_per_token = {need}; raise max_nodes_per_token",
    )
    group_limited = m.n_group > 1 and m.topk_group < m.n_group
    _require(
        not group_limited or per_node % per_group == 0,
        f"model.max_nodes_per_token: with group-limited routing each node must hold whole expert groups, but a node "
        f"holds {per_node} experts and a group {per_group}; make model.n_group a multiple of topology.nnodes "
        f"or set topk_group = n_group",
    )


def validate(cfg: Config) -> None:
    """Check every cross-field constraint; raise ConfigError with a one-line fix on the first."""
    m, topo, run = cfg.model, cfg.topology, cfg.runtime
    validate_model(m)
    _require(topo.nnodes > 0, f"topology.nnodes: must be positive, got {topo.nnodes}")
    _require(topo.ranks_per_node > 0, f"topology.ranks_per_node: must be positive, got {topo.ranks_per_node}")
    _validate_node_limit(m, topo.nnodes)
    _require(
        not (topo.device == "cpu" and topo.backend == "nccl"),
        "topology.backend: nccl needs topology.device=cuda; use backend=gloo for CPU ranks",
    )
    _require(
        not (topo.device == "cuda" and topo.backend == "gloo"),
        "topology.backend: gloo on topology.device=cuda is not supported; use backend=nccl for GPUs",
    )
    _require(
        not (topo.device == "cpu" and m.dtype == "float16"),
        "model.dtype: float16 is not supported on CPU; use float32 or bfloat16",
    )
    _require(run.tokens_per_rank >= 0, f"runtime.tokens_per_rank: must be >= 0, got {run.tokens_per_rank}")
    _validate_gpu_path(cfg)
    _require(run.iters > 0, f"runtime.iters: must be positive, got {run.iters}")
    _require(run.warmup >= 0, f"runtime.warmup: must be >= 0, got {run.warmup}")
    _require(run.timeout_s > 0, f"runtime.timeout_s: must be positive, got {run.timeout_s}")
    sms = run.deepep_num_sms
    _require(
        sms > 0 and sms % 2 == 0,
        f"runtime.deepep_num_sms: must be a positive even number (DeepEP pairs SMs), got {sms}",
    )
    chunks = run.micro_batches
    _require(chunks > 0, f"runtime.micro_batches: must be positive (1: no pipelining), got {chunks}")
    _validate_tensor_parallel(cfg)
    _validate_placement(cfg)


def _validate_placement(cfg: Config) -> None:
    """Physical expert slots: ``E + R`` of them, an equal share per EP rank, and the placement file's rows."""
    m, topo, run = cfg.model, cfg.topology, cfg.runtime
    e, r = m.n_routed_experts, run.redundant_experts
    _require(r >= 0, f"runtime.redundant_experts: must be >= 0, got {r}")
    ep_world = topo.world_size // run.moe_tp
    if (e + r) % ep_world:
        if r == 0:
            raise ConfigError(
                f"model.n_routed_experts: {e} experts are not divisible by the world size {topo.world_size} "
                f"(topology.nnodes={topo.nnodes} x topology.ranks_per_node={topo.ranks_per_node}, EP world "
                f"{ep_world}); use a world size that divides {e}, or set runtime.redundant_experts to "
                f"{-e % ep_world} (+ a multiple of {ep_world}) with a runtime.placement"
            )
        raise ConfigError(
            f"runtime.redundant_experts: {e} experts + {r} redundant = {e + r} slots are not divisible by the EP "
            f"world of {ep_world} ranks; use {r + (-(e + r) % ep_world)} or another value making E + R a multiple"
        )
    _require(run.rebalance_every >= 0, f"runtime.rebalance_every: must be >= 0 (0 is off), got {run.rebalance_every}")
    _require(run.load_window > 0, f"runtime.load_window: must be positive, got {run.load_window}")
    _require(run.routing_skew >= 0, f"runtime.routing_skew: must be >= 0 (0 is uniform), got {run.routing_skew}")
    if run.placement == CONTIGUOUS:
        _require(
            r == 0 or run.rebalance_every > 0,
            f"runtime.redundant_experts: {r} extra slots need a placement that uses them; set runtime.placement to a "
            f"file ({FIX}) or runtime.rebalance_every to place them online",
        )
        return
    rows = read_phy2log(run.placement, e, e + r)
    if m.max_nodes_per_token is not None:
        _check_node_limited_placement(rows, e, e + r, topo.nnodes, run.placement)


def _check_node_limited_placement(rows: list[list[int]], e: int, slots: int, nnodes: int, path: str) -> None:
    """Node-limited routing picks nodes by contiguous blocks of logical experts: every replica must stay home."""
    experts_per_node, slots_per_node = e // nnodes, slots // nnodes
    for i, row in enumerate(rows):
        for p, expert in enumerate(row):
            if expert // experts_per_node != p // slots_per_node:
                raise ConfigError(
                    f"runtime.placement: {path} row {i} puts expert {expert} on node {p // slots_per_node}, but "
                    f"model.max_nodes_per_token routes by node, so each expert's replicas must stay on its node "
                    f"{expert // experts_per_node}; place replicas within each node (epruntime eplb does with "
                    f"max_nodes_per_token set) or unset max_nodes_per_token"
                )


def _validate_tensor_parallel(cfg: Config) -> None:
    """Expert TP: groups of ``moe_tp`` ranks inside one node split every expert's intermediate dim."""
    m, topo, run = cfg.model, cfg.topology, cfg.runtime
    tp = run.moe_tp
    _require(tp > 0, f"runtime.moe_tp: must be positive, got {tp}")
    _require(
        topo.ranks_per_node % tp == 0,
        f"runtime.moe_tp: {tp} does not divide topology.ranks_per_node={topo.ranks_per_node}; "
        f"a TP group must be ranks of one node, so use a divisor of {topo.ranks_per_node}",
    )
    _require(
        m.moe_intermediate_size % tp == 0,
        f"runtime.moe_tp: model.moe_intermediate_size={m.moe_intermediate_size} is not divisible by {tp}; "
        f"use a moe_tp that divides it",
    )
    _require(
        run.shared_expert_tp in (1, tp),
        f"runtime.shared_expert_tp: must be 1 (replicated) or runtime.moe_tp={tp} (sharded), "
        f"got {run.shared_expert_tp}",
    )
    if m.weight_block_size and run.shared_expert_tp > 1:
        block = m.weight_block_size[0]
        _require(
            (m.moe_intermediate_size // tp) % block == 0,
            f"runtime.moe_tp: moe_intermediate_size / moe_tp = {m.moe_intermediate_size // tp} is not a multiple "
            f"of the weight block {block} (model.weight_block_size); set runtime.shared_expert_tp: 1 to keep the "
            f"shared expert whole, or choose a moe_tp that keeps slices block-aligned",
        )


def _validate_gpu_path(cfg: Config) -> None:
    """Capacity of the low-latency dispatchers, and what the dispatcher and DeepGEMM need from the config."""
    m, topo, run = cfg.model, cfg.topology, cfg.runtime
    cap = run.max_tokens_per_rank
    _require(cap > 0, f"runtime.max_tokens_per_rank: must be positive, got {cap}")
    registry.check_dispatcher(run.dispatcher, cfg)
    if run.grouped_gemm == "deep_gemm":
        _require(
            topo.device == "cuda",
            "runtime.grouped_gemm: deep_gemm runs on GPUs only; set topology.device=cuda, or on CPU use "
            "runtime.grouped_gemm auto",
        )
        _require(
            m.dtype == "bfloat16",
            f"runtime.grouped_gemm: deep_gemm needs model.dtype=bfloat16, got {m.dtype}; set model.dtype=bfloat16",
        )


def check_environment(cfg: Config) -> None:
    """Checks that depend on this machine (GPUs, DeepEP, DeepGEMM), made before any process group exists."""
    if cfg.topology.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "topology.device: cuda was requested but no CUDA GPU is visible; "
                "run on a GPU node or set topology.device=cpu topology.backend=gloo"
            )
    registry.check_dispatcher_machine(cfg.runtime.dispatcher, cfg)
    if cfg.runtime.grouped_gemm == "deep_gemm":
        kernel_limits.check_deep_gemm(cfg)
