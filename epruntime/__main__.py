"""``python -m epruntime`` is the ``epruntime`` command (so ``torchrun -m epruntime run`` works)."""

from epruntime.cli.main import console_main

console_main()
