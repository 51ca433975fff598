"""Collection that survives a machine without epruntime's optional packages.

The GPU image installs epruntime with ``--no-deps`` (its CUDA torch must stay), so a package of an
extra may be missing there. A test module that imports one at the top (directly or through
epruntime) is then reported as skipped, naming the package and how to get it, instead of aborting
the collection of every other module (``pytest -m gpu tests`` imports them all before selecting).
"""

from __future__ import annotations

from pathlib import Path

import pytest

OPTIONAL = {  # top-level module -> how to get it
    "safetensors": "pip install safetensors (epruntime[models])",
    "transformers": "pip install transformers (epruntime[models])",
    "tqdm": "pip install tqdm",
    "matplotlib": "pip install matplotlib (epruntime[bench])",
    "mpi4py": "pip install mpi4py (epruntime[mpi])",
}


def missing_optional(exc: BaseException | None) -> str | None:
    """The optional package whose absence ``exc`` reports, or None for any other error."""
    if not isinstance(exc, ModuleNotFoundError) or exc.name is None:
        return None
    root = exc.name.split(".")[0]
    return root if root in OPTIONAL else None


class OptionalImportsModule(pytest.Module):
    """A test module that skips, saying why, when it needs an optional package this machine lacks."""

    def _getobj(self) -> object:  # the module, as pytest.Module._getobj returns it
        try:
            return super()._getobj()
        except pytest.Collector.CollectError as err:
            package = missing_optional(err.__cause__)
            if package is None:
                raise
            reason = f"{self.path.name} needs {package}, which is not installed; {OPTIONAL[package]}"
            pytest.skip(reason, allow_module_level=True)


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module:
    return OptionalImportsModule.from_parent(parent, path=module_path)
