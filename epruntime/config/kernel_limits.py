"""What DeepEP's and DeepGEMM's kernels accept, checked on the config before any process group exists.

The dispatcher declarations (:mod:`epruntime.config.dispatchers`) call :func:`check_deepep` for the
backends that need DeepEP, the machine checks :func:`check_deep_gemm` for ``grouped_gemm: deep_gemm``.
This module imports nothing of the backends (``deep_ep`` and ``deep_gemm`` only to see whether they import).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from epruntime.config.errors import ConfigError

if TYPE_CHECKING:
    from epruntime.config.schema import Config

HOW_TO_GET = (
    "use the GPU image (docker/README.md) or build DeepEP with NVSHMEM (docs/gpu.md), "
    "or set runtime.dispatcher to flat or lowlatency"
)
LOW_LATENCY_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)  # the hidden sizes its kernels compile
LOW_LATENCY_MAX_TOPK = 11
NORMAL_WORLD_SIZES = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)  # Buffer.get_dispatch_config's table
NVL_PEERS = 8  # internode normal mode assumes nodes of 8 GPUs
DEFAULT_QP_DEPTH = 1024  # NVSHMEM_QP_DEPTH unless set; DeepEP's low-latency mode needs (capacity + 1) x 2 of it


def deep_ep_import_error() -> str | None:
    """Why ``import deep_ep`` fails here, or None when it works."""
    try:
        import deep_ep  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA/NVSHMEM load error of a mismatched build
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def check_deepep(cfg: Config, modes: tuple[str, ...]) -> None:
    """Config-time checks for a dispatcher that runs DeepEP in ``modes`` (``normal``, ``low_latency``):
    importable, bf16, and the shapes its kernels support."""
    m, run, topo = cfg.model, cfg.runtime, cfg.topology
    what = f"runtime.dispatcher: {run.dispatcher}"
    reason = deep_ep_import_error()
    if reason is not None:
        raise ConfigError(f"{what} needs DeepEP, but import deep_ep failed ({reason}); {HOW_TO_GET}")
    if m.dtype != "bfloat16":
        raise ConfigError(f"{what} uses DeepEP, which moves bf16 activations; set model.dtype=bfloat16")
    world, per_node = topo.world_size // run.moe_tp, topo.ranks_per_node // run.moe_tp  # the EP world
    if world >= NVL_PEERS and world % NVL_PEERS:  # deep_ep.Buffer's constructor asserts it in every mode
        raise ConfigError(
            f"{what}: DeepEP needs an EP world below {NVL_PEERS} ranks or a multiple of {NVL_PEERS}, got {world}; "
            f"change runtime.moe_tp or use runtime.dispatcher flat or hierarchical"
        )
    one_node = topo.nnodes == 1 and world <= NVL_PEERS  # one NVLink domain
    if "normal" in modes and (world not in NORMAL_WORLD_SIZES or not (one_node or per_node == NVL_PEERS)):
        raise ConfigError(
            f"{what}: DeepEP normal mode supports EP worlds of {NORMAL_WORLD_SIZES} ranks, with {NVL_PEERS} per node "
            f"across nodes, got {world} ranks with {per_node} per node; use runtime.dispatcher flat or hierarchical"
        )
    if "low_latency" in modes and (
        m.hidden_size not in LOW_LATENCY_HIDDEN or m.num_experts_per_tok > LOW_LATENCY_MAX_TOPK
    ):
        raise ConfigError(
            f"{what}: DeepEP low-latency kernels support hidden sizes {LOW_LATENCY_HIDDEN} and top-k <= "
            f"{LOW_LATENCY_MAX_TOPK}, got hidden {m.hidden_size}, top-k {m.num_experts_per_tok}; "
            f"use runtime.dispatcher lowlatency"
        )
    if "low_latency" in modes:
        _check_low_latency_capacity(what, run.max_tokens_per_rank, world)


def _check_low_latency_capacity(what: str, capacity: int, world: int) -> None:
    """DeepEP's low-latency asserts: (capacity + 1) x 2 fits NVSHMEM's QP depth, and world x capacity is a
    multiple of 4 (its TMA copies)."""
    depth = int(os.environ.get("NVSHMEM_QP_DEPTH", DEFAULT_QP_DEPTH))
    if (capacity + 1) * 2 > depth:
        raise ConfigError(
            f"runtime.max_tokens_per_rank={capacity}: {what} needs (max_tokens_per_rank + 1) x 2 <= "
            f"NVSHMEM_QP_DEPTH ({depth}); use at most {depth // 2 - 1} or raise NVSHMEM_QP_DEPTH"
        )
    if world * capacity % 4:
        raise ConfigError(
            f"runtime.max_tokens_per_rank={capacity}: {what} needs EP world ({world}) x max_tokens_per_rank to "
            f"be a multiple of 4; round max_tokens_per_rank up to a multiple of 4"
        )


def deep_gemm_import_error() -> str | None:
    """Why ``import deep_gemm`` fails here, or None when it works."""
    try:
        import deep_gemm  # noqa: F401
    except Exception as exc:  # an ImportError, or a CUDA error from a build that does not match this machine
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def check_deep_gemm(cfg: Config) -> None:
    """``runtime.grouped_gemm: deep_gemm`` needs the package, a Hopper GPU and 128-aligned shapes."""
    reason = deep_gemm_import_error()
    if reason is not None:
        raise ConfigError(
            f"runtime.grouped_gemm: deep_gemm needs DeepGEMM, but import deep_gemm failed ({reason}); use the GPU "
            f"image (docker/README.md) or pip install DeepGEMM from source, or set runtime.grouped_gemm=auto"
        )
    import torch

    major, _ = torch.cuda.get_device_capability()
    if major != 9:
        raise ConfigError(
            f"runtime.grouped_gemm: deep_gemm is wired for Hopper (SM90) FP32 block scales, this GPU is SM{major}x; "
            f"set runtime.grouped_gemm=auto"
        )
    m = cfg.model
    intermediate = m.moe_intermediate_size // cfg.runtime.moe_tp
    if m.hidden_size % 128 or intermediate % 128:
        raise ConfigError(
            f"runtime.grouped_gemm: deep_gemm needs model.hidden_size ({m.hidden_size}) and the per-rank "
            f"moe_intermediate_size ({intermediate}) to be multiples of 128; set runtime.grouped_gemm=auto"
        )
