"""The ``epruntime`` command: ``run`` (inside a launcher), ``launch`` (starts the ranks itself), ``plan``, ``eplb``,
``bench`` and ``generate``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NoReturn

import torch.distributed as dist

from epruntime.config.checks import check_environment
from epruntime.config.schema import SHARED_EXPERT_MODES, Config, ConfigError, load_config
from epruntime.dispatch.registry import NAMES as DISPATCHERS
from epruntime.parallel.health import SETTLE_S
from epruntime.parallel.launcher import launched_with_peers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epruntime",
        description=__doc__,
        epilog=f"dispatchers (runtime.dispatcher): {', '.join(DISPATCHERS)}; see docs/dispatch.md",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    config_args = argparse.ArgumentParser(add_help=False)
    config_args.add_argument("--config", required=True, help="YAML config, e.g. configs/cpu-sim.yaml")
    config_args.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config field (repeatable)",
    )
    common = argparse.ArgumentParser(add_help=False, parents=[config_args])
    common.add_argument("--verify", action="store_true", help="check every rank's output against the reference")
    common.add_argument("--json", dest="json_path", help="write the summary as JSON to this path")
    common.add_argument(
        "--shared-modes", action="store_true", help="also time overlap/defer/serial shared expert, as ratios to serial"
    )
    common.add_argument(
        "--expert-load", metavar="PATH", help="write the (token, expert) pairs per expert as JSON (+ a .png heatmap)"
    )
    sub.add_parser("run", parents=[common], help="run the EP layer in this process (under torchrun, mpirun, ...)")
    sub.add_parser("launch", parents=[common], help="start all ranks of the config on this machine and run")
    plan = sub.add_parser("plan", parents=[config_args], help="print placement, memory and expected traffic; no launch")
    plan.add_argument("--samples", type=int, default=4096, help="routes sampled to estimate traffic (default 4096)")
    plan.add_argument("--json", dest="json_path", help="write the plan as JSON to this path")
    plan.add_argument("--checkpoint", help="HF DeepSeek-V3 directory: its model, and its weight bytes per rank")
    plan.add_argument("--dtype", help="with --checkpoint: the compute dtype (default: the checkpoint's)")
    plan.add_argument("--expert-load", metavar="PATH", help="a recorded load: compare placements for it")
    eplb = sub.add_parser("eplb", parents=[config_args], help="write a balanced expert placement from a recorded load")
    eplb.add_argument("--expert-load", required=True, metavar="PATH", help="load JSON from `run --expert-load`")
    eplb.add_argument("--out", required=True, metavar="PLACEMENT.json", help="placement to write (runtime.placement)")
    bench = sub.add_parser(
        "bench", parents=[config_args], help="sweep tokens, dispatchers and shared-expert modes against peers"
    )
    bench.add_argument("--tokens", help="tokens per rank to sweep, e.g. 128,512 (default: runtime.tokens_per_rank)")
    bench.add_argument(
        "--dispatchers", help=f"comma-separated, of {', '.join(DISPATCHERS)} (default: runtime.dispatcher)"
    )
    bench.add_argument("--shared", help="shared-expert modes, e.g. overlap,serial (default: runtime.shared_expert)")
    bench.add_argument("--reps", type=int, default=5, help="timed repetitions per case; medians are reported")
    bench.add_argument(
        "--json", dest="json_path", default="out/bench.json", help="JSON output (default out/bench.json)"
    )
    bench.add_argument("--plot", default="out/bench.png", help="PNG of stacked stage times ('' for none)")
    bench.add_argument(
        "--single-rank-baseline", action="store_true", help="also time one rank on all tokens and experts"
    )
    bench.add_argument(
        "--placements", help="contiguous,eplb: time an EPLB placement of the contiguous layer's load against it"
    )
    bench.add_argument(
        "--redundant", type=int, help="redundant experts of the eplb placement (default runtime.redundant_experts)"
    )
    bench.add_argument(
        "--eplb-held-out", action="store_true", help="place eplb from other tokens' load, not the timed tokens'"
    )
    bench.add_argument("--verify", action="store_true", help="check each placement's output against the reference")
    bench.add_argument(
        "--micro-batches", help="runtime.micro_batches values to sweep, e.g. 1,2,4 (default: the config's)"
    )
    gen = sub.add_parser("generate", help="greedy decoding with a HF DeepSeek-V3 checkpoint (in each launched rank)")
    gen.add_argument("--checkpoint", required=True, help="HF DeepSeek-V3 directory: config.json and safetensors")
    gen.add_argument("--prompt-ids", action="append", required=True, metavar="ID,ID,...", help="a prompt (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=16, help="greedy steps per prompt at most (default 16)")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at config.json's eos_token_id")
    gen.add_argument("--config", help="YAML for topology and runtime (default: the launcher's ranks)")
    gen.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    gen.add_argument("--dtype", help="compute dtype (default: the checkpoint's)")
    return parser


def _run_args(args: argparse.Namespace) -> list[str]:
    """The ``run`` options of a parsed command line, to pass on to launched ranks."""
    out = ["--config", args.config]
    for override in args.overrides:
        out += ["--set", override]
    if args.verify:
        out.append("--verify")
    if args.shared_modes:
        out.append("--shared-modes")
    if args.json_path:
        out += ["--json", args.json_path]
    if args.expert_load:
        out += ["--expert-load", args.expert_load]
    return out


def _split(text: str | None, default: str) -> list[str]:
    return [item.strip() for item in (text or default).split(",") if item.strip()]


def _bench(cfg: Config, args: argparse.Namespace, argv: list[str]) -> int:
    """``bench`` inside a launcher, or started on this machine's ranks when there is none."""
    from epruntime.parallel.runtime import detect_launcher

    placements = _bench_placements(cfg, args.placements, args.redundant)  # checked before any rank starts
    if detect_launcher().launcher == "none" and cfg.topology.world_size > 1:
        from epruntime.cli.launch import launch_local

        return launch_local(cfg, argv)
    from epruntime.cli.bench import BenchOptions, bench_main

    run = cfg.runtime
    try:
        tokens = [int(t) for t in _split(args.tokens, str(run.tokens_per_rank))]
    except ValueError:
        raise ConfigError(f"--tokens {args.tokens!r}: expected integers separated by commas, e.g. 128,512") from None
    dispatchers = _split(args.dispatchers, run.dispatcher)
    shared = _split(args.shared, run.shared_expert)
    for name, value, choices in (
        ("--dispatchers", dispatchers, DISPATCHERS),
        ("--shared", shared, SHARED_EXPERT_MODES),
    ):
        bad = [v for v in value if v not in choices]
        if bad:
            raise ConfigError(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(choices)}")
    redundant = cfg.runtime.redundant_experts if args.redundant is None else args.redundant
    try:
        chunks = tuple(int(n) for n in _split(args.micro_batches, str(run.micro_batches)))
    except ValueError:
        raise ConfigError(f"--micro-batches {args.micro_batches!r}: expected integers, e.g. 1,2,4") from None
    if any(n < 1 for n in chunks):
        raise ConfigError(f"--micro-batches {args.micro_batches!r}: each must be >= 1 (1: no pipelining)")
    return bench_main(
        cfg,
        tokens,
        dispatchers,
        shared,
        args.reps,
        args.json_path,
        args.plot or None,
        args.single_rank_baseline,
        BenchOptions(placements, redundant, args.eplb_held_out, args.verify, chunks),
    )


def _bench_placements(cfg: Config, text: str | None, redundant: int | None) -> list[str]:
    """``--placements`` checked: of contiguous and eplb; ``--redundant`` must give a whole share per EP rank."""
    from epruntime.cli.bench import PLACEMENTS

    placements = _split(text, "")
    bad = [p for p in placements if p not in PLACEMENTS]
    if bad:
        raise ConfigError(f"--placements: unknown {', '.join(bad)}; choose from {', '.join(PLACEMENTS)}")
    if redundant is not None:
        ep_world, e = cfg.topology.world_size // cfg.runtime.moe_tp, cfg.model.n_routed_experts
        if redundant < 0 or (e + redundant) % ep_world:
            raise ConfigError(
                f"--redundant {redundant}: {e} experts + {redundant} must be a multiple of the EP world {ep_world}; "
                f"use e.g. {max(redundant, 0) + (-(e + max(redundant, 0)) % ep_world) or ep_world}"
            )
        if "eplb" not in placements:
            raise ConfigError("--redundant: applies to the eplb placement; add --placements contiguous,eplb")
    return placements


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; config errors exit with status 2 and one line."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":  # the model comes from the checkpoint; --config is optional
            from epruntime.cli.generate import generate_main

            return generate_main(args)
        if args.command == "plan":  # needs no GPU and starts no process group
            from epruntime.cli.plan import plan_main

            return plan_main(args)
        if args.command == "eplb":  # reads a load file and writes a placement: no process group
            from epruntime.cli.eplb import eplb_main

            return eplb_main(args)
        cfg = load_config(args.config, args.overrides)
        check_environment(cfg)
        if args.command == "bench":
            return _bench(cfg, args, argv if argv is not None else sys.argv[1:])
        if args.command == "launch":
            from epruntime.cli.launch import launch_local

            return launch_local(cfg, ["run", *_run_args(args)])
        from epruntime.cli.run import run_main

        return run_main(cfg, args.verify, args.json_path, args.shared_modes, args.expert_load)
    except ConfigError as exc:
        print(f"epruntime: error: {exc}", file=sys.stderr, flush=True)
        if dist.is_initialized():  # found after start-up (ranks disagree): leave without tearing down gloo
            exit_process(2)
        if launched_with_peers():  # let the other ranks print theirs before the launcher stops the job
            time.sleep(SETTLE_S)
        return 2


def exit_process(code: int) -> NoReturn:
    """End this process with ``code`` without the interpreter's finalization.

    A gloo worker thread can drop its reference to a Python-owned tensor just after the last
    collective returns; doing that while Python finalizes aborts the process ("terminate called
    without an active exception", seen on a rank under mpirun). Output is flushed and MPI (loaded by
    the mpirun bootstrap) finalized first, since their exit hooks are skipped too.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


def console_main() -> NoReturn:
    """The ``epruntime`` command (console script and ``python -m epruntime``)."""
    exit_process(main())


if __name__ == "__main__":
    console_main()
