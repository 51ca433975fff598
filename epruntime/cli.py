"""The ``epruntime`` command: ``run`` (inside a launcher) and ``launch`` (starts the ranks itself)."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, check_environment, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epruntime", description=__doc__)
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
    sub.add_parser("run", parents=[common], help="run the EP layer in this process (under torchrun, mpirun, ...)")
    sub.add_parser("launch", parents=[common], help="start all ranks of the config on this machine and run")
    plan = sub.add_parser("plan", parents=[config_args], help="print placement, memory and expected traffic; no launch")
    plan.add_argument("--samples", type=int, default=4096, help="routes sampled to estimate traffic (default 4096)")
    plan.add_argument("--json", dest="json_path", help="write the plan as JSON to this path")
    gen = sub.add_parser("generate", help="greedy decoding with a HF DeepSeek-V3 checkpoint (in each launched rank)")
    gen.add_argument("--checkpoint", required=True, help="HF DeepSeek-V3 directory: config.json and safetensors")
    gen.add_argument("--prompt-ids", action="append", required=True, metavar="ID,ID,...", help="a prompt (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=16, help="greedy steps per prompt (default 16)")
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
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; config errors exit with status 2 and one line."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":  # the model comes from the checkpoint; --config is optional
            from .generate import generate_main

            return generate_main(args)
        cfg = load_config(args.config, args.overrides)
        if args.command == "plan":  # needs no GPU and starts no process group
            from .plan import plan_main

            return plan_main(cfg, args.samples, args.json_path)
        check_environment(cfg)
        if args.command == "launch":
            from .launch import launch_local

            return launch_local(cfg, _run_args(args))
        from .job import run_main

        return run_main(cfg, args.verify, args.json_path, args.shared_modes)
    except ConfigError as exc:
        print(f"epruntime: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
