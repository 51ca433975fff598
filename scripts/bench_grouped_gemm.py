"""TFLOP/s of the routed-expert stage at DeepSeek-V3 shapes, against a dense matmul of the same FLOPs.

For each case (local experts, rows routed to this rank, spread unevenly over the experts) it times the
expert stage's grouped GEMMs (``LocalExperts.swiglu``: gate/up, SwiGLU, down over expert-contiguous rows,
``6 * N * H * I`` FLOPs), the masked low-latency stage where the case is decode-sized, DeepGEMM FP8 with
``--fp8`` where it imports, and one dense ``[N, H] @ [H, 3I]`` matmul of the same FLOPs on the same device.
It names the card and, when the grouped GEMM is not ``torch._grouped_mm``, says why.

    python scripts/bench_grouped_gemm.py                       # on a GPU: H=7168, I=2048, E_local 8 and 9
    python scripts/bench_grouped_gemm.py --device cpu --hidden 256 --intermediate 128 --rows 512

Runs from a checkout without installing epruntime (the repository root goes on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from epruntime.config.kernel_limits import deep_gemm_import_error  # noqa: E402
from epruntime.config.schema import MoEConfig  # noqa: E402
from epruntime.layer.experts import LocalExperts  # noqa: E402


def device_name(device: torch.device) -> str:
    """The card's name (or the CPU's)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or 'x86_64'}"


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Mean milliseconds of ``fn`` over ``iters`` calls after ``warmup`` calls: CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - begin) * 1e3 / iters


def skewed_counts(rows: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """Rows per expert as a router gives them: uneven (shares between 0.5 and 1.5), summing to ``rows``."""
    share = torch.rand(experts, generator=gen) + 0.5
    counts = torch.floor(share / share.sum() * rows).long()
    counts[0] += rows - int(counts.sum())
    return counts


def expert_weights(
    e_local: int, h: int, i: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``w13 [E, 2I, H]`` and ``w2 [E, H, I]``, drawn on the device (fast at DeepSeek-V3 sizes)."""
    gen = torch.Generator(device).manual_seed(e_local)
    w13 = torch.randn(e_local, 2 * i, h, generator=gen, device=device).div_(h**0.5).to(dtype)
    w2 = torch.randn(e_local, h, i, generator=gen, device=device).div_(i**0.5).to(dtype)
    return w13, w2


def bench_case(
    args: argparse.Namespace, experts: LocalExperts, fp8: LocalExperts | None, rows: int, device: torch.device
) -> dict[str, float | int | list[int]]:
    """One (E_local, N) case: TFLOP/s of each expert-stage variant and of the equal-FLOP dense matmul."""
    h, i, dtype, e_local = args.hidden, args.intermediate, getattr(torch, args.dtype), experts.num_experts
    gen = torch.Generator().manual_seed(rows)
    counts = skewed_counts(rows, e_local, gen)
    x = torch.randn(rows, h, generator=gen).to(device, dtype)
    flops = 6 * rows * h * i

    def tflops(fn: Callable[[], object]) -> float:
        return flops / (time_ms(fn, device, args.warmup, args.iters) * 1e-3) / 1e12

    result: dict[str, float | int | list[int]] = {"e_local": e_local, "rows": rows, "gflop": flops / 1e9}
    result["counts"] = counts.tolist()
    on_device = counts.to(device)
    result["grouped_tflops"] = tflops(lambda: experts.swiglu(x, on_device))
    a, b = torch.randn(rows, h, generator=gen).to(device, dtype), torch.randn(h, 3 * i, generator=gen).to(device, dtype)
    result["dense_tflops"] = tflops(lambda: a @ b)
    result["grouped_vs_dense"] = result["grouped_tflops"] / result["dense_tflops"]
    if rows <= args.masked_max_rows:  # decode-sized: the masked layout, capacity = the busiest expert rounded up
        capacity = int(counts.max()) + 1
        xm = torch.randn(e_local, capacity, h, generator=gen).to(device, dtype)
        masked_m = counts.to(device, torch.int32)
        result["masked_tflops"] = tflops(lambda: experts.forward_masked(xm, masked_m))
    if fp8 is not None:
        result["fp8_deep_gemm_tflops"] = tflops(lambda: fp8.swiglu(x, on_device))
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 9], help="local experts (EP32; +1 redundant)")
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
        help="(token, expert) rows on this rank: decode 64-128 tokens x 8, prefill up to 1k tokens x 8",
    )  # fmt: skip
    parser.add_argument("--masked-max-rows", type=int, default=1024, help="also time the masked stage up to here")
    parser.add_argument("--fp8", action="store_true", help="also time DeepGEMM FP8 (JIT-compiles on first use)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    name = device_name(device)
    cfg = MoEConfig(hidden_size=args.hidden, moe_intermediate_size=args.intermediate, n_routed_experts=256)
    print(f"expert-stage grouped GEMM on {name} | H={args.hidden} I={args.intermediate} {args.dtype}", flush=True)
    print(f"{'E_local':>7} {'rows':>6} {'GFLOP':>8} {'grouped':>9} {'masked':>9} {'fp8':>9} {'dense':>9}  TFLOP/s")
    results, kernels = [], {}
    use_fp8 = args.fp8 and device.type == "cuda" and deep_gemm_import_error() is None
    for e_local in args.experts:
        w13, w2 = expert_weights(e_local, args.hidden, args.intermediate, getattr(torch, args.dtype), device)
        experts = LocalExperts(cfg, w13, w2, grouped_gemm="auto")
        kernels = experts.kernels()
        fp8 = LocalExperts(cfg, w13, w2, grouped_gemm="deep_gemm") if use_fp8 else None
        for rows in args.rows:
            r = bench_case(args, experts, fp8, rows, device)
            results.append(r)
            cells = [f"{r[k]:9.2f}" if k in r else f"{'-':>9}" for k in ("grouped_tflops", "masked_tflops")]
            cells += [f"{r[k]:9.2f}" if k in r else f"{'-':>9}" for k in ("fp8_deep_gemm_tflops", "dense_tflops")]
            print(f"{e_local:>7} {rows:>6} {r['gflop']:8.1f} {' '.join(cells)}", flush=True)
        del experts, fp8, w13, w2
    print(f"kernels: normal layout {kernels['normal']}; masked layout {kernels['masked']}", flush=True)
    if args.json_path:
        report = {"device": name, "torch": torch.__version__, "kernels": kernels, "args": vars(args)}
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps({**report, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
