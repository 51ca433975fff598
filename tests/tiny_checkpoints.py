"""Tiny DeepSeek-V3 checkpoints written by transformers, and the same weights in DeepSeek's released FP8 layout.

transformers is imported inside the functions: rank processes import this module (their test
functions live beside it) but never call these.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,  # layer 0 dense, layers 1 and 2 MoE
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    max_position_embeddings=64,
    initializer_range=0.1,  # larger than the default: well-separated logits and routing scores
)
MOE_LAYERS = (1, 2)
FP8_BLOCK = 128  # as released: quantization_config.weight_block_size [128, 128]


def tiny_model(seed: int = 0):
    """A random ``DeepseekV3ForCausalLM(TINY)`` (fp32, eval) with non-zero correction biases."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY)).eval()
    with torch.no_grad():
        for i in MOE_LAYERS:
            model.model.layers[i].mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def write_checkpoints(root: Path, seed: int = 0) -> dict[str, Path]:
    """One tiny model saved by transformers as ``single`` (model.safetensors) and ``sharded`` (40 KB shards and an
    index), plus ``fp8`` (the sharded one in the released FP8 layout) and ``fp8_dequantized`` (its exact values)."""
    model = tiny_model(seed)
    paths = {name: root / name for name in ("single", "sharded", "fp8", "fp8_dequantized")}
    model.save_pretrained(paths["single"])
    model.save_pretrained(paths["sharded"], max_shard_size="40KB")
    write_fp8(paths["sharded"], paths["fp8"], paths["fp8_dequantized"])
    return paths


def is_fp8_weight(key: str, tensor: torch.Tensor) -> bool:
    """The tensors DeepSeek-V3 ships in FP8: every linear weight but the embeddings, lm_head and router gate."""
    skip = ("embed_tokens", "lm_head", "mlp.gate.", "norm")
    return key.endswith(".weight") and tensor.dim() == 2 and not any(s in key for s in skip)


def quantize_blocks(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-block FP8: ``(q [M, N] e4m3, scale_inv [ceil(M/b), ceil(N/b)] fp32, q * scale as fp32 [M, N])``."""
    m, n = w.shape
    mb, nb = math.ceil(m / block), math.ceil(n / block)
    padded = torch.zeros(mb * block, nb * block)
    padded[:m, :n] = w
    tiles = padded.view(mb, block, nb, block)  # [mb, b, nb, b]
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max  # [mb, nb]
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)  # [mb, b, nb, b]
    dequantized = (q.float() * scale[:, None, :, None]).view(mb * block, nb * block)[:m, :n]
    return q.view(mb * block, nb * block)[:m, :n].contiguous(), scale, dequantized.contiguous()


def _shards(path: Path) -> dict[str, list[str]]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards: dict[str, list[str]] = {}
        for key, name in json.loads(index.read_text())["weight_map"].items():
            shards.setdefault(name, []).append(key)
        return shards
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {"model.safetensors": list(f.keys())}


def write_fp8(src: Path, dst: Path, dequantized: Path) -> None:
    """``src``'s weights in the released FP8 layout at ``dst`` (same shards, ``<key>_scale_inv`` beside each FP8
    weight, ``quantization_config`` in config.json), and the dequantized weights as fp32 at ``dequantized``."""
    config = json.loads((src / "config.json").read_text())
    weight_map, exact = {}, {}
    dst.mkdir(parents=True)
    for name, keys in _shards(src).items():
        out = {}
        with safe_open(str(src / name), "pt") as f:
            for key in keys:
                w = f.get_tensor(key)
                if is_fp8_weight(key, w):
                    out[key], out[key + "_scale_inv"], exact[key] = quantize_blocks(w)
                else:
                    out[key] = exact[key] = w
        save_file(out, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    dequantized.mkdir(parents=True)
    save_file(exact, str(dequantized / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", dequantized / "config.json")


def hf_model(path: Path):
    """transformers' own model loaded from ``path`` (fp32, eval)."""
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits ``[B, S, vocab]`` of ``input_ids [B, S]`` (it cannot run ``B == 0`` itself)."""
    if input_ids.shape[0] == 0:
        return torch.zeros(*input_ids.shape, model.config.vocab_size)
    return model(input_ids).logits


@torch.no_grad()
def hf_generate_until_eos(model, prompt: list[int], steps: int, eos: list[int]) -> list[int]:
    """transformers' greedy ``generate`` of one prompt, stopping at ``eos``: the new ids, EOS included."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    new = out[0, ids.shape[1] :].tolist()
    return new[: next((i + 1 for i, t in enumerate(new) if t in eos), len(new))]


def hf_generate(model, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """transformers' greedy ``generate``: the ``steps`` new ids ``[B, steps]`` (EOS not allowed to stop it)."""
    if input_ids.shape[0] == 0:
        return torch.zeros(0, steps, dtype=torch.long)
    out = model.generate(input_ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[:, input_ids.shape[1] :]
