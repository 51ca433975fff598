"""One MoE layer's weights under HuggingFace DeepSeek-V3 names (relative to ``mlp.``).

Names: ``gate.weight [E, H]``, ``gate.e_score_correction_bias [E]``,
``experts.{e}.{gate,up,down}_proj.weight`` and ``shared_experts.{gate,up,down}_proj.weight``.
transformers 5.x modules hold experts fused (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``); both forms are accepted. Synthetic weights are drawn per
expert from ``(seed, expert id)``, so a rank can make its own experts without the others'.
A checkpoint view hands routed-expert FP8 weights as :class:`~epruntime.io.fp8.Fp8Block`;
:func:`expert_weights` stacks them as blocks, every other accessor expects dense tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from epruntime.config.schema import MoEConfig
from epruntime.io.fp8 import Weight, cat_rows, stack_weights

StateDict = Mapping[str, Weight]


def _normal(shape: tuple[int, ...], fan_in: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) / fan_in**0.5


def _stream(seed: int, kind: int, index: int = 0) -> int:
    """A distinct generator seed per (seed, tensor kind, index)."""
    return (seed * 1_000_003 + kind * 65_537 + index) % (2**63)


def random_state_dict(cfg: MoEConfig, seed: int, experts: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """Synthetic weights (in ``cfg.dtype``; gate in fp32) for the gate, shared expert and ``experts``."""
    h, i, dtype = cfg.hidden_size, cfg.moe_intermediate_size, cfg.torch_dtype
    sd = {
        "gate.weight": _normal((cfg.n_routed_experts, h), h, _stream(seed, 1)),
        # Small, partly negative biases: they steer choices without swamping the scores.
        "gate.e_score_correction_bias": 0.05 * _normal((cfg.n_routed_experts,), 1, _stream(seed, 2)),
    }
    if cfg.n_shared_experts:
        i_s = cfg.shared_intermediate_size
        sd["shared_experts.gate_proj.weight"] = _normal((i_s, h), h, _stream(seed, 3)).to(dtype)
        sd["shared_experts.up_proj.weight"] = _normal((i_s, h), h, _stream(seed, 4)).to(dtype)
        sd["shared_experts.down_proj.weight"] = _normal((h, i_s), i_s, _stream(seed, 5)).to(dtype)
    for e in range(cfg.n_routed_experts) if experts is None else experts:
        sd[f"experts.{e}.gate_proj.weight"] = _normal((i, h), h, _stream(seed, 6, e)).to(dtype)
        sd[f"experts.{e}.up_proj.weight"] = _normal((i, h), h, _stream(seed, 7, e)).to(dtype)
        sd[f"experts.{e}.down_proj.weight"] = _normal((h, i), i, _stream(seed, 8, e)).to(dtype)
    return sd


def take(sd: StateDict, key: str, shape: tuple[int, ...]) -> Weight:
    """``sd[key]`` (a tensor or an FP8 block) checked against ``shape``; a clear error naming the key otherwise.

    A mapping with a ``where(key)`` method (a checkpoint view) names the file in its errors too.
    """
    where = getattr(sd, "where", None)
    if key not in sd:
        if where is not None:
            raise KeyError(f"checkpoint has no {where(key)}")
        raise KeyError(f"state dict has no {key!r}; expected HuggingFace DeepSeek-V3 names relative to 'mlp.'")
    tensor = sd[key]
    if tuple(tensor.shape) != shape:
        name = where(key) if where is not None else repr(key)
        raise ValueError(f"state dict {name} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def expert_weights(sd: StateDict, cfg: MoEConfig, experts: Iterable[int]) -> tuple[Weight, Weight]:
    """Stacked ``w13 [n, 2I, H]`` (gate rows, then up rows) and ``w2 [n, H, I]`` for ``experts``.

    Dense tensors, or FP8 blocks when ``sd`` holds them (gate and up blocks concatenated along rows,
    scales alike): a ``w13`` whose gate rows do not end on a block row cannot stay one block and is
    dequantized to ``cfg.torch_dtype``.
    """
    h, i, e, dtype = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.torch_dtype
    experts = list(experts)
    if "experts.gate_up_proj" in sd:  # transformers' fused in-memory layout
        w13 = take(sd, "experts.gate_up_proj", (e, 2 * i, h))[experts]
        w2 = take(sd, "experts.down_proj", (e, h, i))[experts]
        return w13.contiguous(), w2.contiguous()

    def gate_up(x: int) -> Weight:  # [2I, H]
        return cat_rows([take(sd, f"experts.{x}.{p}_proj.weight", (i, h)) for p in ("gate", "up")], dtype)

    w13 = stack_weights([gate_up(x) for x in experts], dtype)  # [n, 2I, H]
    w2 = stack_weights([take(sd, f"experts.{x}.down_proj.weight", (h, i)) for x in experts], dtype)  # [n, H, I]
    return w13, w2


def shared_weights(sd: StateDict, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared expert's fused ``w13 [2I_s, H]`` and ``w2 [H, I_s]``."""
    h, i_s = cfg.hidden_size, cfg.shared_intermediate_size
    w13 = torch.cat(
        [take(sd, "shared_experts.gate_proj.weight", (i_s, h)), take(sd, "shared_experts.up_proj.weight", (i_s, h))]
    )
    return w13, take(sd, "shared_experts.down_proj.weight", (h, i_s))


def gate_weights(sd: StateDict, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's ``weight [E, H]`` and ``e_score_correction_bias [E]`` (zeros when absent, as in V2)."""
    e = cfg.n_routed_experts
    weight = take(sd, "gate.weight", (e, cfg.hidden_size))
    key = "gate.e_score_correction_bias"
    bias = take(sd, key, (e,)) if key in sd else torch.zeros(e)
    return weight, bias
