"""Reading HF DeepSeek-V3 safetensors: a layer's own experts only, routed experts' FP8 blocks kept as blocks, the rest
dequantized, clear errors, and the bytes each rank holds."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epruntime.dispatch.base import count_tokens_per_expert
from epruntime.io.checkpoint import CheckpointError, CheckpointReader, checkpoint_weight_bytes
from epruntime.io.fp8 import Fp8Block
from epruntime.io.weights import expert_weights, gate_weights, shared_weights
from epruntime.layer.experts import LocalExperts
from epruntime.layer.tensor_parallel import tp_slice, tp_slice_gate_up
from epruntime.parallel.topology import Topology
from tests.factories import tokens
from tests.tiny_checkpoints import MOE_LAYERS, TINY, quantize_blocks, write_checkpoints, write_fp8

E, LAYER = TINY["n_routed_experts"], MOE_LAYERS[0]
ALIGNED = {**TINY, "moe_intermediate_size": 128}  # whole 128-row blocks: gate and up concatenate as FP8 blocks


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model with ``moe_intermediate_size`` 128 as ``fp8`` (released layout) and ``exact`` (its values)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    root = tmp_path_factory.mktemp("aligned")
    torch.manual_seed(1)
    DeepseekV3ForCausalLM(DeepseekV3Config(**ALIGNED)).save_pretrained(root / "src")
    write_fp8(root / "src", root / "fp8", root / "exact")
    return {"fp8": root / "fp8", "exact": root / "exact"}


def _dequantize(block: Fp8Block) -> torch.Tensor:
    """Written here, apart from the package: every element times the scale of its 128 x 128 tile."""
    n, k = block.shape[-2:]
    scale = block.scale_inv.repeat_interleave(128, dim=-2)[..., :n, :].repeat_interleave(128, dim=-1)[..., :k]
    return block.weight.float() * scale


def _load_layer(reader: CheckpointReader, experts: range) -> tuple[torch.Tensor, ...]:
    cfg = reader.moe_config()
    view = reader.moe_layer(LAYER, cfg)
    return (*expert_weights(view, cfg, experts), *gate_weights(view, cfg), *shared_weights(view, cfg))


def _expert_keys(experts: range, suffixes: tuple[str, ...] = ("",)) -> set[str]:
    return {
        f"model.layers.{LAYER}.mlp.experts.{e}.{p}_proj.weight{s}"
        for e in experts
        for p in ("gate", "up", "down")
        for s in suffixes
    }


@pytest.mark.parametrize("name", ["sharded", "fp8"])
def test_layer_reads_only_its_experts_and_their_shards(ckpts: dict[str, Path], name: str) -> None:
    mine = range(4, 6)
    with CheckpointReader(ckpts[name]) as reader:
        w13, w2, gate, bias, s13, s2 = _load_layer(reader, mine)
        log, weight_map = reader.log, reader.weight_map
    suffixes = ("", "_scale_inv") if name == "fp8" else ("",)
    prefix = f"model.layers.{LAYER}.mlp."
    shared = {f"{prefix}shared_experts.{p}_proj.weight{s}" for p in ("gate", "up", "down") for s in suffixes}
    gate_keys = {f"{prefix}gate.weight", f"{prefix}gate.e_score_correction_bias"}
    assert set(log.keys) == _expert_keys(mine, suffixes) | shared | gate_keys
    assert log.files == {weight_map[k] for k in log.keys}  # no other shard is even opened
    assert len(log.files) < len(set(weight_map.values()))
    assert log.bytes == sum(log.keys.values()) > 0
    # The values: the experts as saved (fp8: dequantized exactly), stacked gate rows then up rows. FP8 w2 stays
    # blocks; FP8 w13 cannot (gate rows 32 end inside a 128-row block) and comes dequantized.
    exact = load_file(ckpts["fp8_dequantized" if name == "fp8" else "single"] / "model.safetensors")
    assert isinstance(w2, Fp8Block) == (name == "fp8") and not isinstance(w13, Fp8Block)
    w2 = _dequantize(w2) if isinstance(w2, Fp8Block) else w2
    key = f"{prefix}experts.5."
    assert torch.equal(w13[1], torch.cat([exact[key + "gate_proj.weight"], exact[key + "up_proj.weight"]]))
    assert torch.equal(w2[1], exact[key + "down_proj.weight"])
    assert torch.equal(s13, torch.cat([exact[f"{prefix}shared_experts.{p}_proj.weight"] for p in ("gate", "up")]))
    assert torch.equal(gate, exact[prefix + "gate.weight"])
    assert torch.equal(bias, exact[prefix + "gate.e_score_correction_bias"])
    assert w13.shape == (2, 2 * TINY["moe_intermediate_size"], TINY["hidden_size"]) and s13.dim() == s2.dim() == 2


def test_reader_dequantizes_partial_blocks(tmp_path: Path) -> None:
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, scale, exact = quantize_blocks(w)  # 3 x 2 blocks of 128, the last ones partial
    assert scale.shape == (3, 2)
    assert (exact - w).abs().max() <= 0.07 * w.abs().max()  # e4m3 keeps ~2 significant digits
    (tmp_path / "config.json").write_text("{}")
    save_file(
        {
            "w.weight": q,
            "w.weight_scale_inv": scale,
            "bad.weight": q.clone(),
            "bad.weight_scale_inv": scale[:2].clone(),
        },
        str(tmp_path / "model.safetensors"),
    )
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.tensor("w.weight", torch.float32), exact)
    assert reader.tensor("w.weight", torch.bfloat16).dtype == torch.bfloat16
    stored = reader.stored("w.weight")  # as stored: the FP8 bytes and their scales
    assert isinstance(stored, Fp8Block) and stored.block == (128, 128)
    assert torch.equal(stored.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(stored.scale_inv, scale)
    with pytest.raises(
        CheckpointError,
        match=r"'bad.weight_scale_inv' in .*model.safetensors has shape \(2, 2\), "
        r"expected \(3, 2\)",
    ):
        reader.tensor("bad.weight", torch.float32)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_a_clear_error(ckpts: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(ckpts["sharded"], tmp_path / "ckpt")
    weight_map = CheckpointReader(path).weight_map
    shard = path / weight_map[f"model.layers.{LAYER}.mlp.experts.5.up_proj.weight"]
    for keep in (shard.stat().st_size // 2, 6):  # data cut off; header cut off
        shard.write_bytes(shard.read_bytes()[:keep])
        with pytest.raises(CheckpointError, match=rf"{shard.name}: unreadable safetensors.*truncated or corrupt"):
            _load_layer(CheckpointReader(path), range(4, 6))


def test_missing_expert_key_names_key_and_file(ckpts: dict[str, Path], tmp_path: Path) -> None:
    key = f"model.layers.{LAYER}.mlp.experts.5.up_proj.weight"
    single = _copy(ckpts["single"], tmp_path / "single")
    tensors = load_file(single / "model.safetensors")
    del tensors[key]
    save_file(tensors, str(single / "model.safetensors"))
    with pytest.raises(KeyError, match=rf"no '{key}', absent from {single}/model.safetensors"):
        _load_layer(CheckpointReader(single), range(4, 6))
    _load_layer(CheckpointReader(single), range(0, 4))  # other ranks do not need it

    sharded = _copy(ckpts["sharded"], tmp_path / "sharded")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=rf"no '{key}', absent from {sharded}/model.safetensors.index.json"):
        _load_layer(CheckpointReader(sharded), range(4, 6))


def test_wrongly_shaped_tensor_names_key_file_and_shapes(ckpts: dict[str, Path], tmp_path: Path) -> None:
    key = f"model.layers.{LAYER}.mlp.experts.5.up_proj.weight"
    single = _copy(ckpts["single"], tmp_path / "single")
    tensors = load_file(single / "model.safetensors")
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(single / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=rf"'{key}' in {single}/model.safetensors has shape \(31, 64\), "
        rf"expected \(32, 64\)",
    ):
        _load_layer(CheckpointReader(single), range(4, 6))


def test_only_safetensors_and_moe_layers(ckpts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"nothing is unpickled\), found pytorch_model\.bin"):
        CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        CheckpointReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/config\.json: missing"):
        CheckpointReader(tmp_path / "empty")
    reader = CheckpointReader(ckpts["single"])
    cfg = reader.moe_config()
    with pytest.raises(CheckpointError, match=r"layer 0 is not an MoE layer .*first_k_dense_replace=1"):
        reader.moe_layer(0, cfg)
    wrong = dataclasses.replace(cfg, num_experts_per_tok=2)
    with pytest.raises(CheckpointError, match=r"num_experts_per_tok=2 \(checkpoint 4\)"):
        reader.moe_layer(LAYER, wrong)


def test_checkpoint_weight_bytes_from_headers(ckpts: dict[str, Path]) -> None:
    all_bytes = sum(t.numel() * 4 for t in load_file(ckpts["single"] / "model.safetensors").values())
    per_expert = 3 * TINY["moe_intermediate_size"] * TINY["hidden_size"] * 4 * len(MOE_LAYERS)
    topo = Topology(2, 2, E)
    plans = [checkpoint_weight_bytes(ckpts["sharded"], r, topo) for r in range(4)]
    assert checkpoint_weight_bytes(ckpts["single"], 0, Topology(1, 1, E))["total"] == all_bytes
    assert all(p["routed_experts"] == per_expert * E // 4 for p in plans)
    assert all(p["total"] == all_bytes - per_expert * E * 3 // 4 for p in plans)
    assert checkpoint_weight_bytes(ckpts["fp8"], 1, topo) == plans[1]  # FP8 counts at the compute dtype
    half = checkpoint_weight_bytes(ckpts["fp8"], 1, topo, torch.bfloat16)
    gates = len(MOE_LAYERS) * (E * TINY["hidden_size"] + E) * 4  # the router stays in fp32
    assert half["routed_experts"] * 2 == plans[1]["routed_experts"]
    assert (half["replicated"] - gates) * 2 == plans[1]["replicated"] - gates
    # deep_gemm: routed experts held as FP8 (1 byte) plus one fp32 scale per 128 x 128 block (one per 32 x 64 weight)
    fp8_per_expert = 3 * (TINY["moe_intermediate_size"] * TINY["hidden_size"] + 4) * len(MOE_LAYERS)
    deep = checkpoint_weight_bytes(ckpts["fp8"], 1, topo, grouped_gemm="deep_gemm")
    assert deep["routed_experts"] == fp8_per_expert * E // 4 and deep["replicated"] == plans[1]["replicated"]
    assert checkpoint_weight_bytes(ckpts["sharded"], 1, topo, grouped_gemm="deep_gemm") == deep  # quantized at load


def _aligned_layer(path: Path, layer: int, experts: range) -> tuple:
    reader = CheckpointReader(path)
    cfg = reader.moe_config()
    view = reader.moe_layer(layer, cfg)
    return cfg, *expert_weights(view, cfg, experts), *shared_weights(view, cfg), gate_weights(view, cfg)[0]


def test_routed_fp8_experts_come_as_their_blocks(aligned: dict[str, Path]) -> None:
    """Gate and up blocks concatenated, experts stacked, bytes as stored; shared expert and gate come dense."""
    cfg, w13, w2, s13, s2, gate = _aligned_layer(aligned["fp8"], LAYER, range(4, 7))
    i, h = ALIGNED["moe_intermediate_size"], ALIGNED["hidden_size"]
    assert isinstance(w13, Fp8Block) and isinstance(w2, Fp8Block)
    assert w13.shape == (3, 2 * i, h) and w13.scale_inv.shape == (3, 2, 1)
    assert w2.shape == (3, h, i) and w2.scale_inv.shape == (3, 1, 1)
    stored = load_file(aligned["fp8"] / "model.safetensors")
    exact = load_file(aligned["exact"] / "model.safetensors")
    key = f"model.layers.{LAYER}.mlp.experts.5."
    gate_up = torch.cat([stored[key + "gate_proj.weight"], stored[key + "up_proj.weight"]])
    assert torch.equal(w13.weight[1].view(torch.uint8), gate_up.view(torch.uint8))
    scales = torch.cat([stored[key + "gate_proj.weight_scale_inv"], stored[key + "up_proj.weight_scale_inv"]])
    assert torch.equal(w13.scale_inv[1], scales)
    assert torch.equal(_dequantize(w13)[1], torch.cat([exact[key + "gate_proj.weight"], exact[key + "up_proj.weight"]]))
    assert torch.equal(_dequantize(w2)[1], exact[key + "down_proj.weight"])
    shared = f"model.layers.{LAYER}.mlp.shared_experts."
    assert all(type(t) is torch.Tensor and t.dtype == cfg.torch_dtype for t in (s13, s2, gate))
    assert torch.equal(s13, torch.cat([exact[shared + "gate_proj.weight"], exact[shared + "up_proj.weight"]]))
    assert torch.equal(s2, exact[shared + "down_proj.weight"])


@pytest.mark.parametrize("tp_size", [1, 2])  # 2: slices of 64 rows, inside the 128-row blocks
def test_fp8_experts_run_like_their_dequantized_weights(aligned: dict[str, Path], tp_size: int) -> None:
    """EPMoE's load path (expert_weights, TP slices, .to(device, dtype), LocalExperts auto) from the FP8
    checkpoint equals the same path from the exactly dequantized one."""
    mine = range(8, 12)
    cfg, w13, w2, *_ = _aligned_layer(aligned["fp8"], LAYER, mine)
    _, d13, d2, *_ = _aligned_layer(aligned["exact"], LAYER, mine)
    x = tokens(40, ALIGNED["hidden_size"], 3)
    idx = torch.randint(0, len(mine), (40, 2), generator=torch.Generator().manual_seed(4))
    weights, counts = torch.rand(40, 2), count_tokens_per_expert(idx, len(mine))
    for rank in range(tp_size):

        def load(w13: torch.Tensor | Fp8Block, w2: torch.Tensor | Fp8Block) -> LocalExperts:
            w13, w2 = tp_slice_gate_up(w13, rank, tp_size), tp_slice(w2, -1, rank, tp_size)  # noqa: B023
            return LocalExperts(cfg, w13.to("cpu", cfg.torch_dtype), w2.to("cpu", cfg.torch_dtype))

        assert torch.equal(load(w13, w2)(x, idx, weights, counts), load(d13, d2)(x, idx, weights, counts))


@pytest.mark.parametrize("grouped_gemm", ["auto", "deep_gemm"])
def test_planned_bytes_are_the_experts_held(aligned: dict[str, Path], grouped_gemm: str) -> None:
    """The header-only plan of a rank's routed experts equals what its LocalExperts hold: FP8 + scales under
    deep_gemm (the checkpoint's blocks themselves), dense otherwise."""
    topo = Topology(1, 4, E)
    held = 0
    for layer in MOE_LAYERS:
        cfg, w13, w2, *_ = _aligned_layer(aligned["fp8"], layer, topo.expert_range(1))
        experts = LocalExperts(cfg, w13, w2, grouped_gemm)
        if grouped_gemm == "deep_gemm":
            assert experts.w13.weight.data_ptr() == w13.weight.data_ptr()
        held += sum(p.numel() * p.element_size() for p in experts.parameters())
    assert held == checkpoint_weight_bytes(aligned["fp8"], 1, topo, grouped_gemm=grouped_gemm)["routed_experts"]
