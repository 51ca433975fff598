"""The one list of dispatchers: each backend's name, what it can do, its own config check, and where its
class lives.

Config validation, ``auto``, ``plan``, ``bench``, the CLI help and the docs' table all read this table;
nothing else names a dispatcher. It is declarations only: a backend is imported when one is built
(``factory`` names a ``module:Class`` of the dispatch package, which
:func:`epruntime.dispatch.registry.make_dispatcher` imports),
so the config layer, which checks names and capabilities here, imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from epruntime.config import kernel_limits
from epruntime.config.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from epruntime.config.schema import Config

NORMAL, MASKED, PER_CALL = "normal", "masked", "per call"  # the layout of what dispatch returns


@dataclass(frozen=True)
class Backend:
    """One dispatcher: its declared capabilities and where its class lives."""

    name: str
    summary: str  # one line: what it does (CLI help, docs)
    layout: str  # NORMAL (one row per token and rank), MASKED ([E_local, C, H] blocks) or PER_CALL (auto)
    factory: str  # "module:Class", a module of the epruntime.dispatch package
    graph_safe: bool = False  # no host sync, fixed shapes: may be captured in a CUDA graph
    needs_gpu: bool = False
    needs_deepep: bool = False
    capacity_bound: bool = False  # carries at most runtime.max_tokens_per_rank tokens per rank and call
    local_on_one_rank: bool = False  # on a one-rank EP world it moves nothing (the LocalDispatcher)
    deepep_modes: tuple[str, ...] = ()  # DeepEP modes it uses (its buffer is sized for them)
    traffic_model: str | None = None  # how plan predicts its bytes (epruntime.cli.plan.expected_traffic)
    recv_hook: bool = False  # dispatch_b runs a receive hook: overlapped work goes between, on the same stream
    options: tuple[str, ...] = ()  # keyword options its constructor takes (make_dispatcher passes only these)
    check: Callable[[Config], None] | None = None  # its own config check, beyond the capabilities above


def _check_auto(cfg: Config) -> None:
    """``auto`` is the DeepEP pair on GPUs, so there it needs what DeepEP needs."""
    if cfg.topology.device == "cuda":
        kernel_limits.check_deepep(cfg, modes=("normal", "low_latency"))


BACKENDS: tuple[Backend, ...] = (
    Backend(
        "flat",
        "one uneven all-to-all over the EP world (counts, then rows with their routing)",
        NORMAL,
        "flat:FlatDispatcher",
        local_on_one_rank=True,
        traffic_model="per_rank",
    ),
    Backend(
        "hierarchical",
        "each token crosses to each destination node once (rail group), then fans out inside the node; "
        "combine reduces inside the node, then across nodes",
        NORMAL,
        "hierarchical:HierarchicalDispatcher",
        local_on_one_rank=True,
        traffic_model="per_node_then_rank",
    ),
    Backend(
        "lowlatency",
        "DeepEP's low-latency layout on torch.distributed: fixed capacity, one fixed-size all-to-all, "
        "masked expert stage",
        MASKED,
        "lowlatency:LowLatencyDispatcher",
        graph_safe=True,
        capacity_bound=True,
        traffic_model="fixed_blocks",
    ),
    Backend(
        "deepep",
        "DeepEP Buffer normal mode (NVLink/RDMA kernels) for prefill-sized batches",
        NORMAL,
        "deepep:DeepEPDispatcher",
        needs_gpu=True,
        needs_deepep=True,
        deepep_modes=("normal",),
        options=("num_sms",),
        traffic_model="per_rank",
        check=lambda cfg: kernel_limits.check_deepep(cfg, modes=("normal",)),
    ),
    Backend(
        "deepep_low_latency",
        "DeepEP Buffer low-latency mode (NVSHMEM) for decode: fixed capacity, no host sync",
        MASKED,
        "deepep:DeepEPLowLatencyDispatcher",
        graph_safe=True,
        needs_gpu=True,
        needs_deepep=True,
        capacity_bound=True,
        deepep_modes=("low_latency",),
        options=("use_fp8",),
        recv_hook=True,
        traffic_model="per_pair",
        check=lambda cfg: kernel_limits.check_deepep(cfg, modes=("low_latency",)),
    ),
    Backend(
        "auto",
        "low-latency for decode-sized batches (<= max_tokens_per_rank on every rank), normal mode otherwise "
        "(DeepEP's pair on GPUs, flat/lowlatency on CPU)",
        PER_CALL,
        "auto:AutoDispatcher",
        deepep_modes=("normal", "low_latency"),
        options=("num_sms", "use_fp8"),
        check=_check_auto,
    ),
)
NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)
_BY_NAME = {b.name: b for b in BACKENDS}


def backend(name: str) -> Backend:
    """The declaration of dispatcher ``name``; a ConfigError naming the choices otherwise."""
    if name not in _BY_NAME:
        raise ConfigError(f"runtime.dispatcher: {name!r} is not one of {', '.join(NAMES)}; pick one of them")
    return _BY_NAME[name]


def names_where(**capabilities: object) -> tuple[str, ...]:
    """The dispatchers whose declared capabilities equal ``capabilities`` (e.g. ``graph_safe=True``)."""
    return tuple(b.name for b in BACKENDS if all(getattr(b, k) == v for k, v in capabilities.items()))


def check_dispatcher(name: str, cfg: Config) -> None:
    """What ``name`` needs of the config and machine, from its declaration, before any process group exists."""
    b, topo, run = backend(name), cfg.topology, cfg.runtime
    what = f"runtime.dispatcher: {name}"
    if b.capacity_bound and run.tokens_per_rank > run.max_tokens_per_rank:
        raise ConfigError(
            f"runtime.tokens_per_rank: {run.tokens_per_rank} is more than runtime.max_tokens_per_rank="
            f"{run.max_tokens_per_rank}, the fixed capacity of the {name} dispatcher; raise max_tokens_per_rank or "
            f"lower tokens_per_rank"
        )
    if b.needs_gpu and topo.device != "cuda":
        raise ConfigError(
            f"{what} runs on GPUs only; set topology.device=cuda, or on CPU use runtime.dispatcher "
            f"{' or '.join(names_where(needs_gpu=False, layout=b.layout))}"
        )
    deepep_low_latency = "low_latency" in b.deepep_modes and (b.needs_deepep or topo.device == "cuda")
    if run.micro_batches > 1 and deepep_low_latency:
        raise ConfigError(
            f"runtime.micro_batches: {run.micro_batches} chunks with {what} would hold more than the two results "
            f"DeepEP's low-latency buffer keeps at a time; use runtime.micro_batches 1 for decode, or deepep"
        )
    if b.needs_gpu and cfg.model.dtype != "bfloat16":
        raise ConfigError(f"{what} needs model.dtype=bfloat16, got {cfg.model.dtype}; set model.dtype=bfloat16")


def check_dispatcher_machine(name: str, cfg: Config) -> None:
    """The backend's own check (DeepEP importable, shapes its kernels take), run on the machine that runs it."""
    declared = backend(name)
    if declared.check is not None:
        declared.check(cfg)


def table_markdown() -> str:
    """The dispatchers as a Markdown table (the README's and docs' table is generated from this)."""
    rows = ["| `runtime.dispatcher` | layout | graph-safe | needs | what it does |", "|---|---|---|---|---|"]
    for b in BACKENDS:
        needs = ", ".join(n for n, on in (("GPU", b.needs_gpu), ("DeepEP", b.needs_deepep)) if on) or "-"
        rows.append(f"| `{b.name}` | {b.layout} | {'yes' if b.graph_safe else 'no'} | {needs} | {b.summary} |")
    return "\n".join(rows)
