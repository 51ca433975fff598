"""The ``epruntime`` commands (run, launch, plan, bench, generate) and their measuring helpers."""

from epruntime.cli.main import console_main, main

__all__ = ["console_main", "main"]
