"""Config loading: shipped files, overrides, HF config.json, and every rejection with its message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from epruntime.cli.main import main
from epruntime.config.schema import ConfigError, MoEConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
CPU_SIM = ROOT / "configs" / "cpu-sim.yaml"


def test_shipped_configs_load() -> None:
    ep32 = load_config(ROOT / "configs" / "deepseek-v3-ep32.yaml")
    assert (ep32.topology.nnodes, ep32.topology.ranks_per_node, ep32.topology.world_size) == (4, 8, 32)
    assert (ep32.model.hidden_size, ep32.model.n_routed_experts, ep32.model.num_experts_per_tok) == (7168, 256, 8)
    assert (ep32.topology.device, ep32.topology.backend) == ("cuda", "nccl")
    assert ep32.runtime.dispatcher == "hierarchical"  # across nodes: IB once per (token, node)
    ep8 = load_config(ROOT / "configs" / "deepseek-v3-ep8.yaml")
    assert ep8.topology.world_size == 8 and ep8.model.moe_intermediate_size == 2048
    sim = load_config(CPU_SIM)
    assert (sim.topology.nnodes, sim.topology.ranks_per_node, sim.topology.backend) == (2, 4, "gloo")
    assert sim.model.n_routed_experts // sim.topology.world_size == 32
    assert (sim.model.num_experts_per_tok, sim.model.n_group, sim.model.topk_group) == (8, 8, 4)


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config(CPU_SIM, overrides=["runtime.seed=3", "model.norm_topk_prob=false", "runtime.timeout_s=5"])
    assert cfg.runtime.seed == 3 and cfg.model.norm_topk_prob is False and cfg.runtime.timeout_s == 5.0
    with pytest.raises(AttributeError):
        cfg.runtime.seed = 4  # frozen


def test_from_hf_config_json() -> None:
    hf = {
        "hidden_size": 7168,
        "moe_intermediate_size": 2048,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "torch_dtype": "bfloat16",
        "vocab_size": 129280,
        "num_hidden_layers": 61,
    }
    m = MoEConfig.from_hf(hf)
    assert m == MoEConfig(dtype="bfloat16")
    assert MoEConfig.from_hf(hf, dtype="float32").dtype == "float32"


def _sim(**sections: dict) -> dict:
    base = {
        "model": {
            "hidden_size": 32,
            "moe_intermediate_size": 16,
            "n_routed_experts": 16,
            "num_experts_per_tok": 4,
            "n_group": 4,
            "topk_group": 2,
        },
        "topology": {"nnodes": 2, "ranks_per_node": 2},
        "runtime": {},
    }
    for name, body in sections.items():
        base[name] = {**base[name], **body}
    return base


REJECTIONS = [
    (_sim(model={"hiden_size": 8}), "model.hiden_size: unknown key; did you mean model.hidden_size?"),
    (_sim(runtime={"iters": "ten"}), "runtime.iters: expected int"),
    (_sim(model={"norm_topk_prob": 1}), "model.norm_topk_prob: expected bool"),
    (_sim(model={"hidden_size": True}), "model.hidden_size: expected int"),
    (_sim(model={"scoring_func": "relu"}), "model.scoring_func: 'relu' is not one of sigmoid, softmax"),
    (_sim(topology={"nnodes": 3}), "model.n_routed_experts: 16 experts are not divisible by the world size 6"),
    (_sim(model={"n_routed_experts": 20, "n_group": 8}), "not divisible by model.n_group=8"),
    (_sim(model={"topk_group": 5}), "model.topk_group: 5 is larger than model.n_group=4"),
    (_sim(model={"num_experts_per_tok": 9}), "model.num_experts_per_tok: 9 is more than the 8 experts"),
    (_sim(topology={"backend": "nccl"}), "topology.backend: nccl needs topology.device=cuda"),
    ({"modle": {}}, "modle: unknown section; did you mean model?"),
]


@pytest.mark.parametrize(("data", "message"), REJECTIONS)
def test_rejections_name_field_and_fix(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    text = str(info.value)
    assert message in text
    assert "\n" not in text and (";" in text or "?" in text)  # one line, with the fix after the problem


def test_cli_config_errors_exit_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  topk_group: 9\n")
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("epruntime: error: model.topk_group: 9 is larger than model.n_group=8")
    assert "Traceback" not in err and err.count("\n") == 1
    assert main(["launch", "--config", str(CPU_SIM), "--set", "runtime.bogus=1"]) == 2
    assert "runtime.bogus: unknown key" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["run", "--config", str(CPU_SIM), "--set", "seed=1"]) == 2
    assert "expected section.key=value" in capsys.readouterr().err


def test_cli_subprocess_rejects_cuda_without_gpu_and_wrong_world() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ep8 = subprocess.run(
        [sys.executable, "-m", "epruntime", "run", "--config", str(ROOT / "configs" / "deepseek-v3-ep8.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ep8.returncode == 2, ep8.stderr
    assert "topology.device: cuda was requested but no CUDA GPU is visible" in ep8.stderr
    assert "Traceback" not in ep8.stderr
    wrong = subprocess.run(
        [sys.executable, "-m", "epruntime", "run", "--config", str(CPU_SIM)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3"},
    )
    assert wrong.returncode == 2 and "launcher started 3 ranks" in wrong.stderr and "Traceback" not in wrong.stderr


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    """A YAML tag that would construct Python objects is refused, not executed."""
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "ran"
    evil.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    assert not marker.exists()
