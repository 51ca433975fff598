"""The ``epruntime`` command: ``run`` (inside a launcher) and ``launch`` (starts the ranks itself)."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, check_environment, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epruntime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, help="YAML config, e.g. configs/cpu-sim.yaml")
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config field (repeatable)",
    )
    common.add_argument("--verify", action="store_true", help="check every rank's output against the reference")
    common.add_argument("--json", dest="json_path", help="write the summary as JSON to this path")
    sub.add_parser("run", parents=[common], help="run the EP layer in this process (under torchrun, mpirun, ...)")
    sub.add_parser("launch", parents=[common], help="start all ranks of the config on this machine and run")
    return parser


def _run_args(args: argparse.Namespace) -> list[str]:
    """The ``run`` options of a parsed command line, to pass on to launched ranks."""
    out = ["--config", args.config]
    for override in args.overrides:
        out += ["--set", override]
    if args.verify:
        out.append("--verify")
    if args.json_path:
        out += ["--json", args.json_path]
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; config errors exit with status 2 and one line."""
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_environment(cfg)
        if args.command == "launch":
            from .launch import launch_local

            return launch_local(cfg, _run_args(args))
        from .job import run_main

        return run_main(cfg, args.verify, args.json_path)
    except ConfigError as exc:
        print(f"epruntime: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
