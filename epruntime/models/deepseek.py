"""DeepseekEP: a DeepSeek-V3 causal LM with data-parallel attention and expert-parallel MoE layers.

Each rank runs its own sequences through replicated embeddings, MLA attention, norms and dense MLPs
(transformers' DeepSeek-V3 modules, built on the meta device and filled from the checkpoint), and
every MoE layer as an :class:`~epruntime.moe.EPMoE` holding only this rank's experts. An MoE layer
is a collective: every rank calls each one once per forward, in layer order, whatever its batch;
a rank without tokens passes an empty ``[0, H]`` through them (:meth:`DeepseekEP.forward`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import DeepseekV3Config
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3MLP,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
)

from epruntime.io.checkpoint import CheckpointReader, as_reader
from epruntime.io.weights import take
from epruntime.layer.moe import EPMoE
from epruntime.parallel.runtime import Runtime


def load_module(
    factory: Callable[[], nn.Module], weights: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """``factory()`` built without memory (meta device), then every weight read from ``weights``, shape-checked."""
    with torch.device("meta"):
        module = factory()
    state = {name: take(weights, name, tuple(t.shape)).to(device, dtype) for name, t in module.state_dict().items()}
    module.load_state_dict(state, assign=True)
    return module.eval()


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h += attn(norm(h))``, then ``h += mlp(norm(h))`` with a dense MLP or an EPMoE."""

    def __init__(self, self_attn: nn.Module, input_norm: nn.Module, post_norm: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn, self.input_layernorm, self.post_attention_layernorm = self_attn, input_norm, post_norm
        self.mlp = mlp

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, EPMoE)

    def forward(
        self,
        h: torch.Tensor,  # [B, S, H]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [1, S, d_rope]
        mask: torch.Tensor | None,
        cache: DynamicCache | None,
    ) -> torch.Tensor:  # [B, S, H]
        attn, _ = self.self_attn(
            self.input_layernorm(h), position_embeddings=rope, attention_mask=mask, past_key_values=cache
        )
        h = h + attn
        x = self.post_attention_layernorm(h)  # [B, S, H]
        if self.is_moe:
            return h + self.mlp(x.reshape(-1, x.shape[-1])).view_as(x)  # EPMoE takes tokens [B*S, H]
        return h + self.mlp(x)


class DeepseekEP(nn.Module):
    """DeepSeek-V3 for causal LM: ``logits [B, S, vocab] = model(input_ids [B, S])`` for this rank's sequences."""

    def __init__(
        self,
        config: DeepseekV3Config,
        rt: Runtime,
        embed_tokens: nn.Embedding,
        layers: list[DecoderLayer],
        norm: nn.Module,
        lm_head: nn.Linear,
    ) -> None:
        super().__init__()
        self.config, self.rt = config, rt
        self.embed_tokens, self.layers, self.norm, self.lm_head = embed_tokens, nn.ModuleList(layers), norm, lm_head
        self.rotary_emb = DeepseekV3RotaryEmbedding(config).to(rt.device)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | CheckpointReader, rt: Runtime) -> DeepseekEP:
        """Load a HF DeepSeek-V3 checkpoint: replicated weights whole, each MoE layer's experts for this rank only.

        ``rt.cfg.model`` must describe the checkpoint's MoE layers (build it with ``MoEConfig.from_hf``);
        its ``dtype`` is the compute dtype (FP8 weights are dequantized to it, routed experts only when they do
        not run on DeepGEMM). Layers past
        ``num_hidden_layers`` (the MTP module) are not loaded.
        """
        reader = as_reader(checkpoint)
        config = DeepseekV3Config.from_dict(reader.hf_config)
        config._attn_implementation = "sdpa"
        dtype, device = rt.cfg.model.torch_dtype, rt.device

        def load(factory: Callable[[], nn.Module], prefix: str) -> nn.Module:
            return load_module(factory, reader.view(prefix, dtype), dtype, device)

        def norm(size: int) -> Callable[[], nn.Module]:
            return lambda: DeepseekV3RMSNorm(size, eps=config.rms_norm_eps)

        layers = []
        for i in range(reader.num_layers):
            prefix = f"model.layers.{i}."
            if reader.is_moe_layer(i):
                mlp = EPMoE.from_pretrained(reader, i, rt)
            else:
                mlp = load(lambda: DeepseekV3MLP(config), prefix + "mlp.")
            attn = load(lambda i=i: DeepseekV3Attention(config, i), prefix + "self_attn.")
            layers.append(
                DecoderLayer(
                    attn,
                    load(norm(config.hidden_size), prefix + "input_layernorm."),
                    load(norm(config.hidden_size), prefix + "post_attention_layernorm."),
                    mlp,
                )
            )
        embed = load(lambda: nn.Embedding(config.vocab_size, config.hidden_size), "model.embed_tokens.")
        lm_head = load(lambda: nn.Linear(config.hidden_size, config.vocab_size, bias=False), "lm_head.")
        return cls(config, rt, embed, layers, load(norm(config.hidden_size), "model.norm."), lm_head)

    def moe_layers(self) -> list[EPMoE]:
        """The expert-parallel MoE layers, in model order."""
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def new_cache(self) -> DynamicCache:
        """An empty KV cache (MLA latents per layer) for :meth:`forward`."""
        return DynamicCache(config=self.config)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
        """Logits ``[B, S, vocab]`` of ``input_ids [B, S]``, appended to ``cache`` when given.

        Every rank must call this the same number of times: a rank with ``B == 0`` (or ``S == 0``) still
        runs every MoE layer's collectives, on no tokens.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"DeepseekEP input: expected input_ids [B, S], got shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if input_ids.numel() == 0:
            return self._idle(batch, seq)
        h = self.embed_tokens(input_ids.to(self.rt.device))  # [B, S, H]
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + seq, device=h.device).unsqueeze(0)  # [1, S]
        rope = self.rotary_emb(h, positions)  # cos, sin [1, S, d_rope]
        mask = create_causal_mask(
            config=self.config, inputs_embeds=h, attention_mask=None, past_key_values=cache, position_ids=positions
        )
        for layer in self.layers:
            h = layer(h, rope, mask, cache)
        return self.lm_head(self.norm(h))  # [B, S, V]

    def _idle(self, batch: int, seq: int) -> torch.Tensor:  # -> [B, S, V] with B * S == 0
        """No tokens on this rank: take part in every MoE layer, in order, with an empty ``[0, H]`` input."""
        empty = self.embed_tokens.weight.new_empty(0, self.config.hidden_size)  # [0, H]
        for layer in self.layers:
            if layer.is_moe:
                layer.mlp(empty)
        return self.lm_head.weight.new_empty(batch, seq, self.config.vocab_size)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of weights resident on this rank: its routed experts, the replicated rest, and the total."""
        routed = {p.data_ptr() for layer in self.layers if layer.is_moe for p in layer.mlp.experts.parameters()}
        tensors = {t.data_ptr(): t for t in self.state_dict().values()}  # shared storage counted once
        out = {"routed_experts": 0, "replicated": 0}
        for ptr, t in tensors.items():
            out["routed_experts" if ptr in routed else "replicated"] += t.numel() * t.element_size()
        return {**out, "total": out["routed_experts"] + out["replicated"]}
