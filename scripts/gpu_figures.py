"""The GPU figures of scripts/gpu_check.sh, each written as JSON: the machine, the masked expert stage
captured in a CUDA graph against the eager valid-rows stage, and the layer on a one-rank NCCL world.

    python scripts/gpu_figures.py env --json out/gpu/env.json
    python scripts/gpu_figures.py masked --json out/gpu/masked.json    # E_local 8, EP32 x 128 tokens
    python scripts/gpu_figures.py layer --json out/gpu/layer.json      # flat, lowlatency, graph replay, overlap
    python scripts/gpu_figures.py collect out/gpu                      # out/gpu/gpu_check.json from all steps

``--dry-run`` runs tiny shapes (on the CPU when there is no GPU). A figure that cannot run here is written
with the reason, and a figure that fails is written as its error: the others still run. Times are CUDA-event
milliseconds on a GPU (wall clock on the CPU). The repository root goes on ``sys.path``, so this runs from a
checkout without installing epruntime; torch and epruntime are imported only by the figures that need them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

NO_GPU = "no CUDA GPU visible (torch.cuda.is_available() is False)"
STEP_FILES = {"env": "env.json", "grouped_gemm": "grouped_gemm.json", "masked": "masked.json", "layer": "layer.json"}


def figure(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or ``{"error": ...}`` with the last lines of the traceback when it raises."""
    try:
        return fn()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc().splitlines()[-6:]}


def _shapes(dry_run: bool) -> dict[str, int]:
    """DeepSeek-V3's expert shapes (EP32: 8 local experts, 128 decode tokens per rank; the one-rank layer holds
    16 experts, top-8 of 8 groups), or tiny ones."""
    if dry_run:
        tiny = {"hidden": 256, "intermediate": 128, "e_local": 4, "tokens": 8, "world": 4, "experts": 16}
        return {**tiny, "topk": 4, "n_group": 4, "topk_group": 2}
    full = {"hidden": 7168, "intermediate": 2048, "e_local": 8, "tokens": 128, "world": 32, "experts": 16}
    return {**full, "topk": 8, "n_group": 8, "topk_group": 4}


def _device() -> Any:  # torch.device
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _capture(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """A CUDA graph of ``fn`` (warmed up on a side stream first, as torch.cuda.graph wants) and its output."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _nvidia_smi() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({type(exc).__name__})"


def env_figures(dry_run: bool) -> dict[str, Any]:
    """The card, driver, torch and CUDA versions, and which optional kernels import here."""
    import torch

    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    out["nvidia_smi"] = _nvidia_smi()
    out["epruntime"] = figure(_kernels_here)
    if not torch.cuda.is_available():
        return {**out, "gpus": [], "skipped": NO_GPU}
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    out["gpus"] = [
        {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
         "memory_gib": round(p.total_memory / 2**30, 1)}
        for p in props
    ]  # fmt: skip
    out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


def _kernels_here() -> dict[str, str]:
    """Which optional kernels import here (epruntime's own view, so a broken install shows as its error)."""
    import torch

    from epruntime.config.kernel_limits import deep_ep_import_error, deep_gemm_import_error
    from epruntime.layer.experts import grouped_mm_unusable

    out = {"deep_ep": deep_ep_import_error() or "importable", "deep_gemm": deep_gemm_import_error() or "importable"}
    if torch.cuda.is_available():
        out["grouped_mm"] = grouped_mm_unusable(torch.device("cuda")) or "torch._grouped_mm"
    return out


def masked_figures(dry_run: bool, iters: int) -> dict[str, Any]:
    """The masked stage at decode shapes: eager over the valid rows (a host sync) against its CUDA-graph capture
    (every slot of ``C = tokens x world``, or only the valid rows through DeepGEMM's masked kernel)."""
    import torch
    from bench_grouped_gemm import expert_weights, skewed_counts, time_ms

    from epruntime.config.schema import MoEConfig
    from epruntime.layer.experts import LocalExperts

    device, s = _device(), _shapes(dry_run)
    if device.type != "cuda" and not dry_run:
        return {"skipped": NO_GPU}
    h, i, e, c = s["hidden"], s["intermediate"], s["e_local"], s["tokens"] * s["world"]
    cfg = MoEConfig(hidden_size=h, moe_intermediate_size=i, n_routed_experts=e * s["world"])
    w13, w2 = expert_weights(e, h, i, torch.bfloat16, device)
    counts = skewed_counts(s["tokens"] * 8, e, torch.Generator().manual_seed(0))  # 8 experts per token
    masked_m = counts.to(device, torch.int32)
    x = torch.randn(e, c, h, device=device).to(torch.bfloat16)  # [E_local, C, H]
    experts = LocalExperts(cfg, w13, w2)
    eager = LocalExperts(cfg, w13, w2)
    eager.masked_reason = "measured: the eager valid-rows path"  # the grouped GEMM over the valid rows
    out: dict[str, Any] = {"e_local": e, "capacity": c, "valid_rows": int(counts.sum()), "slots": e * c}
    out["eager_valid_rows_ms"] = time_ms(lambda: eager.forward_masked(x, masked_m), device, 2, iters)
    out["captured_kernel"] = experts.kernels()["masked"]
    if device.type != "cuda":
        return {**out, "captured": f"skipped: a CUDA graph needs CUDA ({NO_GPU})"}
    graph, y = _capture(lambda: experts.forward_masked(x, masked_m))  # DeepGEMM compiles in the warm-up
    out["captured_ms"] = time_ms(graph.replay, device, 2, iters)
    ref = eager.forward_masked(x, masked_m)
    graph.replay()
    valid = torch.arange(c, device=device).unsqueeze(0) < masked_m.unsqueeze(1)  # [E_local, C]
    out["captured_max_abs_diff"] = float((y - ref)[valid].abs().max())
    return out


def _layer_config(dry_run: bool, device: str, **runtime: Any) -> Any:
    from epruntime.config.schema import config_from_dict

    s = _shapes(dry_run)
    model = {
        "hidden_size": s["hidden"], "moe_intermediate_size": s["intermediate"], "n_routed_experts": s["experts"],
        "num_experts_per_tok": s["topk"], "n_group": s["n_group"], "topk_group": s["topk_group"],
        "n_shared_experts": 1, "dtype": "bfloat16" if device == "cuda" else "float32",
    }  # fmt: skip
    tokens = s["tokens"]
    run = {"dispatcher": "lowlatency", "max_tokens_per_rank": tokens, "tokens_per_rank": tokens, **runtime}
    backend = "nccl" if device == "cuda" else "gloo"
    return config_from_dict({"model": model, "topology": {"device": device, "backend": backend}, "runtime": run})


def layer_figures(dry_run: bool, iters: int) -> dict[str, Any]:
    """EPMoE on a one-rank world: ``flat`` and ``lowlatency`` with the shared expert serial and overlapped, the
    ``lowlatency`` layer with ``micro_batches: 2``, and replayed from a CUDA graph against eager."""
    import torch
    from bench_grouped_gemm import time_ms

    from epruntime.dispatch.registry import make_dispatcher
    from epruntime.layer.cuda_graph import GraphedMoE
    from epruntime.layer.moe import EPMoE
    from epruntime.parallel.runtime import init_runtime, shutdown_runtime

    device = _device()
    if device.type != "cuda" and not dry_run:
        return {"skipped": NO_GPU}
    rt = init_runtime(_layer_config(dry_run, device.type))
    try:
        layer = EPMoE.random(rt.cfg.model, rt, seed=0)
        x = torch.randn(rt.cfg.runtime.tokens_per_rank, rt.cfg.model.hidden_size, device=device)
        x = x.to(rt.cfg.model.torch_dtype)
        spec = layer.dispatcher.spec

        def timed(fn: Callable[[], object]) -> float:
            return time_ms(fn, device, 2, iters)

        out: dict[str, Any] = {"tokens": x.shape[0], "experts": layer.experts.num_experts}
        out["kernels"] = layer.experts.kernels()
        out["shared_alone_ms"] = timed(lambda: layer.shared(x))
        for name in ("flat", "lowlatency"):
            layer.dispatcher = make_dispatcher(name, rt.layout.ep, spec)
            row = {"class": type(layer.dispatcher).__name__}
            for mode in ("serial", "overlap"):
                layer.shared_mode = mode
                row[f"{mode}_ms"] = timed(lambda: layer(x))
            row["overlap_saves_ms"] = row["serial_ms"] - row["overlap_ms"]
            out[name] = row
        layer.micro_batches = 2  # runtime.micro_batches: two chunks, software-pipelined (shared expert overlapped)
        out["lowlatency"]["micro_batches_2_overlap_ms"] = timed(lambda: layer(x))
        layer.micro_batches = 1
        if device.type != "cuda":
            return {**out, "graph": f"skipped: a CUDA graph needs CUDA ({NO_GPU})"}
        eager = layer(x).clone()
        graphed = GraphedMoE(layer, num_tokens=x.shape[0])
        out["graph"] = {
            "eager_ms": out["lowlatency"]["overlap_ms"],
            "replay_ms": timed(lambda: graphed(x)),
            "max_abs_diff": float((graphed(x) - eager).abs().max()),
        }
        return out
    finally:
        shutdown_runtime()


def junit_summary(path: Path) -> dict[str, Any]:
    """A pytest junit XML file as counts and one entry per test (outcome, and the message of a skip/failure)."""
    root = ET.parse(path).getroot()
    cases, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome, message = "failed" if tag == "failure" else tag, child.get("message", "")
        counts[outcome] += 1
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    return {**counts, "tests": cases}


def collect(out_dir: Path) -> dict[str, Any]:
    """``gpu_check.json``: every step gpu_check.sh ran (``steps.tsv``: name, exit status, seconds, limit) with
    the JSON it wrote, and the pytest run as a summary of its junit file."""
    report: dict[str, Any] = {"steps": []}
    steps = out_dir / "steps.tsv"
    for line in steps.read_text().splitlines() if steps.exists() else []:
        name, rc, seconds, limit = line.split("\t")
        report["steps"].append({"step": name, "rc": int(rc), "seconds": int(seconds), "timeout_s": int(limit)})
    for name, file in STEP_FILES.items():
        if (out_dir / file).exists():
            report[name] = figure(lambda f=file: json.loads((out_dir / f).read_text()))
    if (out_dir / "pytest.xml").exists():
        report["pytest"] = figure(lambda: junit_summary(out_dir / "pytest.xml"))
    report["ok"] = bool(report["steps"]) and all(s["rc"] == 0 for s in report["steps"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=("env", "masked", "layer", "collect"))
    parser.add_argument("out_dir", nargs="?", type=Path, help="collect: the folder gpu_check.sh writes")
    parser.add_argument("--json", dest="json_path", type=Path, help="write the figures here")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, on the CPU when there is no GPU")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if args.section == "collect":
        if args.out_dir is None:
            parser.error("collect needs the output folder")
        result, path = collect(args.out_dir), args.json_path or args.out_dir / "gpu_check.json"
    else:
        iters = min(args.iters, 2) if args.dry_run else args.iters
        run = {"env": lambda: env_figures(args.dry_run), "masked": lambda: masked_figures(args.dry_run, iters),
               "layer": lambda: layer_figures(args.dry_run, iters)}[args.section]  # fmt: skip
        result, path = {"dry_run": args.dry_run, **figure(run)}, args.json_path
    text = json.dumps(result, indent=2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
