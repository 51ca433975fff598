"""DeepseekEP over real gloo worlds equals transformers' DeepseekV3ForCausalLM: logits, greedy generation, CLI.

Each world runs every check in one call (fp32 and FP8 checkpoints, generation, read accounting);
ranks get different batch sizes and lengths, some none at all.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from epruntime.cli.checkpoint_config import generate_config
from epruntime.io.checkpoint import CheckpointReader, checkpoint_weight_bytes
from epruntime.models.generation import eos_ids, generate_prompts, greedy_generate
from epruntime.parallel.runtime import Runtime
from epruntime.parallel.topology import Topology
from tests.distributed import run_world
from tests.factories import make_config, rel_err
from tests.tiny_checkpoints import (
    MOE_LAYERS,
    TINY,
    hf_generate,
    hf_generate_until_eos,
    hf_logits,
    hf_model,
    write_checkpoints,
)

BATCHES = [(2, 5), (0, 3), (1, 7), (3, 4), (1, 6), (0, 2), (2, 5), (1, 3)]  # rank r: (sequences, length)
STEPS = 4
PROMPTS = [[3, 14, 15], [9, 2], [6, 5]]  # for the CLI on 2 ranks: rank 0 gets lengths 3 and 2, rank 1 one prompt
WORLDS = [(1, 1, "single"), (1, 2, "sharded"), (2, 2, "single"), (2, 4, "sharded")]


def rank_ids(rank: int) -> torch.Tensor:  # [B, S] this rank's sequences
    batch, seq = BATCHES[rank]
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(rank))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def expected(ckpts: dict[str, Path]) -> dict[str, list[torch.Tensor]]:
    """transformers' logits (fp32; FP8 run on the dequantized weights) and greedy ids for every rank's batch."""
    fp32, fp8 = hf_model(ckpts["single"]), hf_model(ckpts["fp8_dequantized"])
    ranks = range(len(BATCHES))
    generated = [hf_generate(fp32, rank_ids(r), STEPS) for r in ranks]
    eos = int(generated[0][0, 1])  # rank 0's first sequence ends after 2 tokens with this EOS id
    config_eos = eos_ids(CheckpointReader(ckpts["single"]).hf_config)
    return {
        "fp32": [hf_logits(fp32, rank_ids(r)) for r in range(len(BATCHES))],
        "fp8": [hf_logits(fp8, rank_ids(r)) for r in range(len(BATCHES))],
        "generated": generated,
        "eos_id": eos,
        "until_eos": [[hf_generate_until_eos(fp32, row, STEPS, [eos]) for row in rank_ids(r).tolist()] for r in ranks],
        "cli": [hf_generate_until_eos(fp32, p, STEPS, config_eos) for p in PROMPTS],
    }


def _expert_keys(rt: Runtime, suffixes: tuple[str, ...]) -> set[str]:
    return {
        f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight{s}"
        for layer in MOE_LAYERS
        for e in rt.topo.expert_range(rt.rank)
        for p in ("gate", "up", "down")
        for s in suffixes
    }


def _rank_checks(rt: Runtime, paths: dict[str, Path], eos: int, cli: list[str] | None) -> dict:
    from epruntime.cli.main import main
    from epruntime.models import DeepseekEP

    ids, out, models = rank_ids(rt.rank), {}, {}
    for name, suffixes in (("fp32", ("",)), ("fp8", ("", "_scale_inv"))):
        reader = CheckpointReader(paths[name])
        model = models[name] = DeepseekEP.from_pretrained(reader, rt)
        log = reader.log
        experts_read = {k for k in log.keys if ".mlp.experts." in k}
        replicated = {k for k in reader.weight_map if ".mlp.experts." not in k}
        out[name] = {
            "logits": model(ids),
            "reads_own_experts_only": experts_read == _expert_keys(rt, suffixes),
            "reads_all_replicated": set(log.keys) - experts_read == replicated,
            "opens_only_needed_files": log.files == {reader.weight_map[k] for k in log.keys},
            "resident": model.weight_bytes(),
            "planned": checkpoint_weight_bytes(paths[name], rt.rank, rt.topo),
        }
    calls = [0]
    for layer in models["fp32"].layers:
        if layer.is_moe:
            layer.mlp.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out["generated"] = greedy_generate(models["fp32"], ids, STEPS)
    out["moe_calls"] = calls[0]
    out["until_eos"] = generate_prompts(models["fp32"], rt, ids.tolist(), STEPS, [eos])
    calls[0] = 0  # every id an EOS: every rank stops after the prefill, together
    every_id = list(range(TINY["vocab_size"]))
    out["all_eos"] = (generate_prompts(models["fp32"], rt, ids.tolist(), STEPS, every_id), calls[0])
    if cli is not None:  # last: the command shuts the process group down
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            out["cli"] = (main(cli), stdout.getvalue())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("nnodes,ranks_per_node,layout", WORLDS)
def test_model_matches_transformers(ckpts, expected, nnodes: int, ranks_per_node: int, layout: str) -> None:
    world = nnodes * ranks_per_node
    cfg = make_config(nnodes, ranks_per_node).replace(model=CheckpointReader(ckpts[layout]).moe_config())
    paths = {"fp32": ckpts[layout], "fp8": ckpts["fp8"]}
    cli = None
    if world == 2:
        cli = ["generate", "--checkpoint", str(ckpts["sharded"]), "--max-new-tokens", str(STEPS)]
        cli += [arg for p in PROMPTS for arg in ("--prompt-ids", ",".join(map(str, p)))]
    outs = run_world(_rank_checks, cfg, paths, expected["eos_id"], cli)
    full = checkpoint_weight_bytes(ckpts["single"], 0, Topology(1, 1, TINY["n_routed_experts"]))
    for rank, out in enumerate(outs):
        batch, seq = BATCHES[rank]
        for name in ("fp32", "fp8"):
            got = out[name]
            assert got["logits"].shape == (batch, seq, TINY["vocab_size"])
            assert rel_err(got["logits"], expected[name][rank]) <= 1e-4, (name, rank)
            assert got["reads_own_experts_only"] and got["reads_all_replicated"] and got["opens_only_needed_files"]
            assert got["resident"] == got["planned"], (name, rank)
            assert got["resident"]["routed_experts"] * world == full["routed_experts"]
        assert torch.equal(out["generated"], expected["generated"][rank]), rank
        assert out["moe_calls"] == len(MOE_LAYERS) * STEPS, rank  # idle ranks too: decoding stays in lockstep
        assert out["until_eos"] == expected["until_eos"][rank], rank
        assert out["all_eos"] == ([row[:1] for row in expected["generated"][rank].tolist()], len(MOE_LAYERS)), rank
    if cli is not None:
        rc, printed = outs[0]["cli"]
        assert rc == 0 and outs[1]["cli"] == (0, "")
        assert printed.splitlines() == [",".join(map(str, ids)) for ids in expected["cli"]]


def test_generate_config_takes_the_model_from_the_checkpoint(ckpts: dict[str, Path]) -> None:
    from epruntime.config.schema import ConfigError

    reader = CheckpointReader(ckpts["fp8"])
    cfg = generate_config(reader, "configs/cpu-sim.yaml", ["runtime.seed=3"], "bfloat16")
    assert (cfg.topology.nnodes, cfg.topology.ranks_per_node, cfg.runtime.seed) == (2, 4, 3)
    assert cfg.model == reader.moe_config(dtype="bfloat16")
    alone = generate_config(reader, None, [], None)  # no launcher: one rank, the checkpoint's dtype
    assert alone.topology.world_size == 1 and alone.model == reader.moe_config()
    with pytest.raises(ConfigError, match=r"config\.json sets this field"):
        generate_config(reader, None, ["model.hidden_size=32"], None)
