"""The dispatcher registry is the one list of dispatchers: everything that names one derives from it."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from epruntime.config.errors import ConfigError
from epruntime.dispatch import registry
from epruntime.dispatch.base import AsyncDispatcher, Dispatcher
from epruntime.layer.cuda_graph import GRAPH_SAFE_DISPATCHERS
from tests.factories import make_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backend", registry.BACKENDS, ids=lambda b: b.name)
def test_every_declared_backend_is_a_dispatcher_of_that_name(backend: registry.Backend) -> None:
    module, _, name = backend.factory.partition(":")
    cls = getattr(importlib.import_module(f"epruntime.dispatch.{module}"), name)
    assert issubclass(cls, Dispatcher) and cls.name == backend.name
    assert backend.layout in (registry.NORMAL, registry.MASKED, registry.PER_CALL)
    if backend.graph_safe:  # graph capture needs the issue/wait split with nothing read back on the host
        assert issubclass(cls, AsyncDispatcher) and backend.capacity_bound
    assert backend.needs_deepep == bool(backend.deepep_modes and backend.needs_gpu)


def test_capabilities_drive_config_validation() -> None:
    for name in registry.names_where(capacity_bound=True):
        with pytest.raises(ConfigError, match=rf"runtime.tokens_per_rank: 9 .* capacity of the {name} dispatcher"):
            make_config(runtime={"dispatcher": name, "max_tokens_per_rank": 8, "tokens_per_rank": 9})
    for name in registry.names_where(needs_gpu=True):
        with pytest.raises(ConfigError, match=rf"runtime.dispatcher: {name} runs on GPUs only"):
            make_config(dtype="bfloat16", runtime={"dispatcher": name})
    with pytest.raises(ConfigError, match=r"runtime.dispatcher: 'fast' is not one of flat, hierarchical, lowlatency"):
        make_config(runtime={"dispatcher": "fast"})
    assert GRAPH_SAFE_DISPATCHERS == ("lowlatency", "deepep_low_latency")


def test_the_config_layer_loads_no_backend() -> None:
    """Validating a config (and the machine checks of a CPU job) imports no dispatcher module."""
    code = (
        "import sys; from epruntime.config import load_config; from epruntime.config.checks import check_environment;"
        "check_environment(load_config('configs/cpu-sim.yaml'));"
        "print(sorted(m for m in sys.modules if m.startswith('epruntime.dispatch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))  # a printed list of module names
    backends = {f"epruntime.dispatch.{b.factory.partition(':')[0]}" for b in registry.BACKENDS}
    backends.add("epruntime.dispatch.local")
    assert not loaded & backends, loaded


def test_cli_help_and_readme_list_every_dispatcher() -> None:
    from epruntime.cli.main import _parser

    assert ", ".join(registry.NAMES) in " ".join(_parser().format_help().split())
    readme = (ROOT / "README.md").read_text()
    assert registry.table_markdown() in readme, "README's dispatcher table is stale: paste registry.table_markdown()"
