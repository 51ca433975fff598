"""YAML configuration -> frozen dataclasses, with every check made before any process group exists.

A config has three sections: ``model`` (HuggingFace DeepSeek-V3 field names), ``topology``
(nodes, ranks per node, device, backend) and ``runtime`` (dispatcher, seed, batch, timing).
Every error is a :class:`ConfigError` whose message is one line naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DTYPES = ("float32", "bfloat16", "float16")
SCORING_FUNCS = ("sigmoid", "softmax")
DEVICES = ("cpu", "cuda")
BACKENDS = ("gloo", "nccl")
DISPATCHERS = ("flat", "hierarchical", "lowlatency", "deepep", "deepep_low_latency", "auto")
DEEPEP_DISPATCHERS = ("deepep", "deepep_low_latency")  # need GPUs and a DeepEP build
CAPACITY_DISPATCHERS = ("lowlatency", "deepep_low_latency")  # fixed runtime.max_tokens_per_rank per call
GROUPED_GEMM = ("auto", "grouped_mm", "loop", "deep_gemm")
SHARED_EXPERT_MODES = ("overlap", "defer", "serial")


class ConfigError(ValueError):
    """A configuration problem; the message is one line that names the field and the fix."""


def _choices(*values: str) -> dict[str, tuple[str, ...]]:
    return {"choices": values}


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing of one DeepSeek-V3 MoE layer (HuggingFace config.json names)."""

    hidden_size: int = 7168
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    max_nodes_per_token: int | None = None  # node-limited routing (DeepSeek-V3's M); None is off
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = field(default="sigmoid", metadata=_choices(*SCORING_FUNCS))
    dtype: str = field(default="bfloat16", metadata=_choices(*DTYPES))
    weight_block_size: tuple[int, ...] | None = None  # block-quantized weights (e.g. [128, 128] for FP8)

    @classmethod
    def from_hf(cls, config_json: dict[str, Any], **overrides: Any) -> MoEConfig:
        """Build from a checkpoint's config.json dict; unknown HF keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config_json.items() if k in names and k != "dtype"}
        hf_dtype = config_json.get("torch_dtype", config_json.get("dtype"))
        if isinstance(hf_dtype, str) and hf_dtype in DTYPES:
            values["dtype"] = hf_dtype
        block = (config_json.get("quantization_config") or {}).get("weight_block_size")
        if block is not None:
            values["weight_block_size"] = list(block)  # FP8 checkpoints: [128, 128]
        values.update(overrides)
        model = _build(cls, "model", values)
        _validate_model(model)
        return model

    @property
    def torch_dtype(self):  # -> torch.dtype (torch imported lazily to keep config import light)
        import torch

        return getattr(torch, self.dtype)

    @property
    def shared_intermediate_size(self) -> int:
        """Intermediate size of the shared expert MLP (all shared experts fused into one)."""
        return self.moe_intermediate_size * self.n_shared_experts


@dataclass(frozen=True)
class TopologyConfig:
    """How ranks are laid out: ``nnodes`` nodes of ``ranks_per_node`` ranks each."""

    nnodes: int = 1
    ranks_per_node: int = 1
    device: str = field(default="cpu", metadata=_choices(*DEVICES))
    backend: str = field(default="gloo", metadata=_choices(*BACKENDS))

    @property
    def world_size(self) -> int:
        return self.nnodes * self.ranks_per_node


@dataclass(frozen=True)
class RuntimeConfig:
    """How the layer is run: which dispatcher, the synthetic batch, iterations and timeouts."""

    dispatcher: str = field(default="flat", metadata=_choices(*DISPATCHERS))
    seed: int = 0
    tokens_per_rank: int = 128
    max_tokens_per_rank: int = 128  # capacity of the low-latency dispatchers; auto's decode/prefill threshold
    iters: int = 10
    warmup: int = 2
    timeout_s: float = 60.0
    grouped_gemm: str = field(default="auto", metadata=_choices(*GROUPED_GEMM))
    shared_expert: str = field(default="overlap", metadata=_choices(*SHARED_EXPERT_MODES))
    moe_tp: int = 1  # ranks of one node that split each routed expert's intermediate dimension
    shared_expert_tp: int = 1  # 1: shared expert replicated (added after the TP all-reduce); moe_tp: sharded
    check_finite: bool = False  # check every layer's input and output for NaN/Inf (one small all-gather each)
    deterministic: bool = False  # deterministic kernels: bit-identical outputs across runs at one world size


@dataclass(frozen=True)
class Config:
    """The whole configuration: model, topology and runtime sections."""

    model: MoEConfig = field(default_factory=MoEConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def replace(self, **sections: Any) -> Config:
        """A copy with whole sections replaced (re-validated)."""
        cfg = dataclasses.replace(self, **sections)
        validate(cfg)
        return cfg


SECTIONS: dict[str, type] = {"model": MoEConfig, "topology": TopologyConfig, "runtime": RuntimeConfig}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(section: str, name: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints are accepted where floats are."""
    where = f"{section}.{name}"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(section, name, inner[0], value)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}; write it as [a, b]")
        return tuple(_coerce(section, name, item, v) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(
            f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}; set it to a {_type_name(tp)}"
        )
    return value


def _build(cls: type, section: str, values: dict[str, Any]) -> Any:
    """Instantiate one section dataclass from a mapping, rejecting unknown keys and bad types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {section}.{close[0]}?" if close else f"known keys: {', '.join(fields)}"
            raise ConfigError(f"{section}.{key}: unknown key; {hint}")
        value = _coerce(section, key, hints[key], value)
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{section}.{key}: {value!r} is not one of {', '.join(choices)}; pick one of them")
        kwargs[key] = value
    return cls(**kwargs)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_model(m: MoEConfig) -> None:
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
    _validate_model(m)
    _require(topo.nnodes > 0, f"topology.nnodes: must be positive, got {topo.nnodes}")
    _require(topo.ranks_per_node > 0, f"topology.ranks_per_node: must be positive, got {topo.ranks_per_node}")
    world = topo.world_size
    _require(
        m.n_routed_experts % world == 0,
        f"model.n_routed_experts: {m.n_routed_experts} experts are not divisible by the world size {world} "
        f"(topology.nnodes={topo.nnodes} x topology.ranks_per_node={topo.ranks_per_node}); "
        f"use a world size that divides {m.n_routed_experts}",
    )
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
    _validate_tensor_parallel(cfg)


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
    """Capacity of the low-latency dispatchers, and what DeepEP and DeepGEMM need from the config."""
    m, topo, run = cfg.model, cfg.topology, cfg.runtime
    cap = run.max_tokens_per_rank
    _require(cap > 0, f"runtime.max_tokens_per_rank: must be positive, got {cap}")
    _require(
        run.dispatcher not in CAPACITY_DISPATCHERS or run.tokens_per_rank <= cap,
        f"runtime.tokens_per_rank: {run.tokens_per_rank} is more than runtime.max_tokens_per_rank={cap}, the fixed "
        f"capacity of the {run.dispatcher} dispatcher; raise max_tokens_per_rank or lower tokens_per_rank",
    )
    gpu_only = [f"runtime.dispatcher: {run.dispatcher}"] if run.dispatcher in DEEPEP_DISPATCHERS else []
    gpu_only += ["runtime.grouped_gemm: deep_gemm"] if run.grouped_gemm == "deep_gemm" else []
    for what in gpu_only:
        _require(
            topo.device == "cuda",
            f"{what} runs on GPUs only; set topology.device=cuda, or on CPU use runtime.dispatcher flat/lowlatency "
            f"and runtime.grouped_gemm auto",
        )
        _require(m.dtype == "bfloat16", f"{what} needs model.dtype=bfloat16, got {m.dtype}; set model.dtype=bfloat16")


def uses_deepep(cfg: Config) -> bool:
    """Whether the configured dispatcher needs DeepEP (``auto`` does on GPUs)."""
    run = cfg.runtime
    return run.dispatcher in DEEPEP_DISPATCHERS or (run.dispatcher == "auto" and cfg.topology.device == "cuda")


def check_environment(cfg: Config) -> None:
    """Checks that depend on this machine (GPUs, DeepEP, DeepGEMM), made before any process group exists."""
    if cfg.topology.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "topology.device: cuda was requested but no CUDA GPU is visible; "
                "run on a GPU node or set topology.device=cpu topology.backend=gloo"
            )
    if uses_deepep(cfg):
        from .dispatch.deepep import check_deepep  # imports deep_ep only here

        check_deepep(cfg)
    if cfg.runtime.grouped_gemm == "deep_gemm":
        from .fp8 import check_deep_gemm

        check_deep_gemm(cfg)


def _parse_override(text: str) -> tuple[str, str, Any]:
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. runtime.seed=3")
    section, name = parts
    if section not in SECTIONS:
        raise ConfigError(f"--set {text!r}: unknown section {section!r}; use one of {', '.join(SECTIONS)}")
    return section, name, yaml.safe_load(raw) if raw.strip() else None


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate a Config from a nested mapping plus ``section.key=value`` overrides."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping with model, topology and runtime sections")
    merged: dict[str, dict[str, Any]] = {}
    for section, body in data.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), list(SECTIONS), n=1)
            hint = f"did you mean {close[0]}?" if close else f"use {', '.join(SECTIONS)}"
            raise ConfigError(f"{section}: unknown section; {hint}")
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {type(body).__name__}")
        merged[section] = dict(body or {})
    for text in overrides:
        section, name, value = _parse_override(text)
        merged.setdefault(section, {})[name] = value
    cfg = Config(**{s: _build(cls, s, merged.get(s, {})) for s, cls in SECTIONS.items()})
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config file (safely), apply ``--set`` style overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; pass a YAML file such as configs/cpu-sim.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"--config {path}: not valid YAML ({first}); fix the syntax") from None
    return config_from_dict(data, overrides)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts (for JSON output and for passing to child processes)."""
    return dataclasses.asdict(cfg)
