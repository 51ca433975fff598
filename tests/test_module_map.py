"""The module map is current, and the package's imports keep data flowing one way (scripts/module_map.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "module_map.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("module_map", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["module_map"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


module_map = _load_script()

# Package edges that must not exist: (importing package, imported package, the module imports allowed all the
# same, as (importing module or "*", imported module or "*")). "Nothing but cli imports cli" is added below for
# every package found, so a new package is covered too.
FORBIDDEN = [
    ("config", "parallel", ()),
    ("config", "layer", ()),
    ("config", "dispatch", ()),  # the one list of dispatchers is config's (config/dispatchers.py): declarations only
    ("config", "io", ()),
    ("eplb", "parallel", ()),  # the placement algorithms are pure: the runtime uses them, never the reverse
    ("eplb", "layer", ()),
    ("config", "models", ()),
    ("dispatch", "layer", ()),
    ("dispatch", "models", ()),
    ("layer", "models", ()),
]
ENTRY_POINTS = (("epruntime.__main__", "*"),)  # python -m epruntime runs the CLI


@pytest.fixture(scope="module")
def graph():
    return module_map.scan()


def _rules(graph) -> list[tuple[str, str, tuple]]:
    to_cli = [(p, "cli", ENTRY_POINTS if p == module_map.TOP else ()) for p in graph.packages() if p != "cli"]
    return FORBIDDEN + to_cli


def _allowed(imp, allowed: tuple) -> bool:
    return any(src in ("*", imp.src) and dst in ("*", imp.dst) for src, dst in allowed)


def _allowed_imports(graph) -> set[tuple[str, str]]:
    """The module imports the rules allow across a forbidden package edge."""
    rules = {(a, b): allowed for a, b, allowed in _rules(graph)}
    return {
        (imp.src, imp.dst)
        for imp in graph.imports
        if _allowed(imp, rules.get((graph.package_of(imp.src), graph.package_of(imp.dst)), ()))
    }


def test_module_map_svg_is_current() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    svg = ElementTree.parse(ROOT / "docs" / "module_map.svg").getroot()  # well-formed
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"


def test_scan_reads_lazy_relative_and_by_name_imports_but_not_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "epruntime"
    for folder in ("a", "b", "c"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from epruntime.a import one\n")
    (pkg / "a" / "one.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import two\n"
        "if TYPE_CHECKING:\n"
        "    from epruntime.c import three\n"
        "def f():\n"
        "    from ..b.four import x\n"
        "    return 'epruntime.c.three:Thing'\n"
    )
    (pkg / "a" / "two.py").write_text("import epruntime.b.four\n")
    (pkg / "b" / "four.py").write_text("x = 1\n")
    (pkg / "c" / "three.py").write_text("")
    g = module_map.scan(pkg)
    found = {(i.src, i.dst, i.kind) for i in g.imports}
    assert found == {
        ("epruntime", "epruntime.a.one", "top"),
        ("epruntime.a.one", "epruntime.a.two", "top"),
        ("epruntime.a.one", "epruntime.b.four", "lazy"),
        ("epruntime.a.one", "epruntime.c.three", "by name"),
        ("epruntime.a.two", "epruntime.b.four", "top"),
    }
    assert set(g.package_edges()) == {("epruntime", "a"), ("a", "b"), ("a", "c")}
    assert g.lines["epruntime.a.one"] == 7 and g.package_of("epruntime") == "epruntime"


def test_no_import_cycle_between_packages(graph) -> None:
    # the imports the rules allow (config reading the dispatcher registry) are left out: the registry itself
    # imports config's errors, which makes config <-> dispatch by design
    edges = graph.package_edges(skip=_allowed_imports(graph))
    loops = module_map.cycles(set(edges))
    detail = [
        f"{a} -> {b}: {module_map.edge_summary(edges[a, b], graph)}"
        for loop in loops
        for a, b in edges
        if a in loop and b in loop
    ]
    assert not loops, (
        "import cycles between packages: " + "; ".join(" <-> ".join(c) for c in loops) + "\n" + ("\n".join(detail))
    )


def test_data_flows_one_way(graph) -> None:
    edges = graph.package_edges()
    broken = [
        f"{imp.src} imports {imp.dst} (line {imp.line}, {imp.kind})"
        for a, b, allowed in _rules(graph)
        for imp in edges.get((a, b), [])
        if not _allowed(imp, allowed)
    ]
    assert not broken, "forbidden package imports:\n" + "\n".join(broken)


def test_rules_name_real_packages(graph) -> None:
    packages = set(graph.packages())
    assert {p for a, b, _ in FORBIDDEN for p in (a, b)} <= packages
    assert {"config", "parallel", "dispatch", "layer", "io", "models", "cli"} <= packages
