"""YAML configuration -> frozen dataclasses, parsed with one-line errors (checks in :mod:`epruntime.config_checks`).

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

from epruntime.config.checks import validate, validate_model
from epruntime.config.dispatchers import NAMES as DISPATCHERS
from epruntime.config.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
SCORING_FUNCS = ("sigmoid", "softmax")
DEVICES = ("cpu", "cuda")
BACKENDS = ("gloo", "nccl")
GROUPED_GEMM = ("auto", "grouped_mm", "loop", "deep_gemm")
SHARED_EXPERT_MODES = ("overlap", "defer", "serial")


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
        validate_model(model)
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
    deepep_num_sms: int = 20  # SMs DeepEP's normal-mode kernels use (even; DeepEP's default 20); buffers sized after it
    micro_batches: int = 1  # chunks a layer's tokens are software-pipelined in (1: one batch)
    redundant_experts: int = 0  # R: E + R physical expert slots, (E + R) / EP world per rank
    placement: str = "contiguous"  # "contiguous" (slot p holds expert p) or a JSON file {"phy2log": [[...]]}
    routing_skew: float = 0.0  # synthetic weights only: expert popularity follows Zipf(routing_skew)
    rebalance_every: int = 0  # forward calls between online rebalances (0: off)
    load_window: int = 1000  # forward calls of expert load a rebalance looks back on


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
