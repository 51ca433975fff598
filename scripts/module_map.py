"""Draw epruntime's module map from its imports: ``docs/module_map.svg``.

Every import of every module of ``epruntime/`` is read with :mod:`ast`: top-level ones and the lazy ones inside
functions, relative and absolute, plus ``"epruntime.pkg.module:Name"`` strings (the dispatcher registry's
factories, imported by name); imports under ``if TYPE_CHECKING:`` are skipped (they never run). Modules are
grouped by folder (``config``, ``parallel``, ...; the top-level ``__init__``/``__main__`` are ``epruntime``) and
``A -> B`` is one package edge when any module of A imports one of B. The packages are drawn in layers, each above
every package it imports where that is possible; the fewest imports that cannot point down (cycles) point up, in
red. The SVG is plain text written here (no graphviz) and deterministic.

    python scripts/module_map.py            # writes docs/module_map.svg, prints the package edges
    python scripts/module_map.py --check    # exit 1 when docs/module_map.svg is not what the code gives now
"""

from __future__ import annotations

import argparse
import ast
import itertools
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "epruntime"
OUTPUT = ROOT / "docs" / "module_map.svg"
TOP = PACKAGE  # the group of the package's own top-level modules (__init__, __main__)

# Tie-break of the layering only (fewest upward imports decides first): the design's order, top to bottom.
DESIGN_ORDER = (TOP, "cli", "models", "layer", "dispatch", "eplb", "io", "parallel", "config")
DESCRIPTIONS = {
    TOP: "top level: the public API, python -m",
    "cli": "the commands; measuring helpers",
    "models": "the whole DeepSeek-V3 model, generation",
    "layer": "router, experts, shared expert, EPMoE",
    "dispatch": "contract, registry, one module per backend",
    "eplb": "expert placement algorithms",
    "io": "HF names, safetensors reader, FP8 blocks",
    "parallel": "launcher, topology, process groups, health",
    "config": "YAML -> frozen dataclasses, checks",
}
COLORS = {
    TOP: "#2f4b7c",
    "cli": "#5b6770",
    "models": "#8c6d4f",
    "layer": "#13868f",
    "dispatch": "#d9730d",
    "eplb": "#8f9a1c",
    "io": "#8e5ea2",
    "parallel": "#3f8f3a",
    "config": "#3e6fa8",
}
SPARE_COLORS = ("#6b5b95", "#88695f", "#4a7c8c", "#7a7a3a", "#5d6d7e")
UP = "#d62728"  # arrows that point up
FACTORY = re.compile(rf"{PACKAGE}(\.\w+)+:\w+")  # "epruntime.dispatch.flat:FlatDispatcher"


# ---------------------------------------------------------------- reading the imports


@dataclass(frozen=True, order=True)
class Import:
    """One module importing another: ``kind`` is ``top`` (module level), ``lazy`` (in a function) or ``by name``
    (a ``"module:Name"`` string that is imported with importlib)."""

    src: str
    dst: str
    line: int
    kind: str


@dataclass(repr=False)
class ModuleGraph:
    """The package's modules (dotted name -> line count and file) and every import between them."""

    lines: dict[str, int]
    files: dict[str, str]  # module -> path relative to the package folder, e.g. "layer/moe.py"
    imports: list[Import]

    def __repr__(self) -> str:
        return f"ModuleGraph({len(self.lines)} modules, {len(self.imports)} imports)"

    def package_of(self, module: str) -> str:
        """``epruntime.layer.moe`` -> ``layer`` (its folder); the top-level modules -> ``epruntime``."""
        folder, _, rest = self.files[module].partition("/")
        return folder if rest else TOP

    def packages(self) -> list[str]:
        return sorted({self.package_of(m) for m in self.lines})

    def modules_of(self, package: str) -> list[str]:
        return sorted((m for m in self.lines if self.package_of(m) == package), key=lambda m: self.files[m])

    def package_edges(self, skip: set[tuple[str, str]] | None = None) -> dict[tuple[str, str], list[Import]]:
        """``(A, B) -> the imports that make it``, for A != B; module edges in ``skip`` are left out."""
        edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
        for imp in self.imports:
            a, b = self.package_of(imp.src), self.package_of(imp.dst)
            if a != b and (imp.src, imp.dst) not in (skip or set()):
                edges[a, b].append(imp)
        return dict(sorted(edges.items()))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_init: bool, known: set[str]) -> None:
        self.module, self.known, self.depth = module, known, 0
        self.package = module if is_init else module.rpartition(".")[0]
        self.found: list[Import] = []

    def _resolve(self, name: str) -> str | None:
        """The known module ``name`` is, or the innermost known package/module containing it."""
        while name and name not in self.known:
            name = name.rpartition(".")[0]
        return name or None

    def _add(self, name: str, line: int, kind: str | None = None) -> None:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return
        target = self._resolve(name)
        if target is not None and target != self.module:
            self.found.append(Import(self.module, target, line, kind or ("lazy" if self.depth else "top")))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # never runs: only its else branch counts
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if alias.name != "*" and sub in self.known else base, node.lineno)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and FACTORY.fullmatch(node.value):
            self._add(node.value.partition(":")[0], node.lineno, "by name")


def module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir).with_suffix("")
    parts = [package_dir.name, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scan(package_dir: Path = ROOT / PACKAGE) -> ModuleGraph:
    """Read every module under ``package_dir`` and the imports between them."""
    paths = sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)
    names = {p: module_name(p, package_dir) for p in paths}
    known = set(names.values())
    lines, files, imports = {}, {}, []
    for path, name in names.items():
        text = path.read_text(encoding="utf-8")
        lines[name], files[name] = len(text.splitlines()), path.relative_to(package_dir).as_posix()
        visitor = _ImportVisitor(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(text, filename=str(path)))
        imports.extend(visitor.found)
    return ModuleGraph(lines, files, sorted(set(imports)))


# ---------------------------------------------------------------- the graph: cycles and layers


def cycles(edges: dict[tuple[str, str], object] | set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (each sorted), in sorted order (Tarjan)."""
    graph: dict[str, list[str]] = defaultdict(list)
    for a, b in sorted(edges):
        graph[a].append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _hint(package: str) -> tuple[int, str]:
    return (DESIGN_ORDER.index(package), "") if package in DESIGN_ORDER else (len(DESIGN_ORDER), package)


def top_down_order(packages: list[str], weights: dict[tuple[str, str], int]) -> list[str]:
    """The order (top first) in which the fewest imports point up (weighted by module imports); ties go to the
    design's order. Exact, by dynamic programming over subsets of packages."""
    n = len(packages)
    if n > 12:  # 2^n subsets: keep it instant
        return sorted(packages, key=_hint)
    hints = [_hint(p) for p in packages]
    best: dict[int, tuple[int, tuple]] = {0: (0, ())}
    for size in range(n):
        for mask in sorted(m for m in best if bin(m).count("1") == size):
            cost, seq = best[mask]
            placed = [packages[i] for i in range(n) if mask >> i & 1]
            for i in range(n):
                if mask >> i & 1:
                    continue
                up = sum(weights.get((packages[i], p), 0) for p in placed)  # imports of packages above it
                candidate = (cost + up, (*seq, (hints[i], i)))
                key = mask | 1 << i
                if key not in best or candidate < best[key]:
                    best[key] = candidate
    return [packages[i] for _, i in best[(1 << n) - 1][1]]


def layers(order: list[str], edges: set[tuple[str, str]]) -> dict[str, int]:
    """Layer of each package (0 = bottom): above every package below it in ``order`` that it is linked to."""
    pos = {p: i for i, p in enumerate(order)}
    level: dict[str, int] = {}
    for p in reversed(order):
        linked = {b if a == p else a for a, b in edges if p in (a, b) and a != b}
        level[p] = 1 + max((level[q] for q in linked if pos[q] > pos[p]), default=-1)
    return level


# ---------------------------------------------------------------- drawing

FONT = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
MONO_SIZE, LINE_H = 12.5, 17.0
HEAD_H, DESC_SIZE = 28.0, 11.0
GUTTER = 78.0  # between rows: where the arrows bend
BOX_GAP, LANE_GAP, LANE_BOX_GAP = 40.0, 13.0, 16.0
MARGIN = 36.0


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _wrap(text: str, chars: int) -> list[str]:
    out: list[str] = []
    for word in text.split():
        if out and len(out[-1]) + 1 + len(word) <= chars:
            out[-1] += " " + word
        else:
            out.append(word)
    return out


def _tint(color: str, amount: float) -> str:
    """``color`` mixed with white (``amount`` 1 = white)."""
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in rgb)


@dataclass
class _Node:
    key: tuple  # ("box", package) or ("lane", edge index, layer)
    layer: int
    width: float
    x: float = 0.0  # centre


def _pav(targets: list[float], weights: list[float]) -> list[float]:
    """Nondecreasing fit of ``targets`` minimising the weighted squared error (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for t, w in zip(targets, weights, strict=True):
        blocks.append([t, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [m for m, _, c in blocks for _ in range(int(c))]


class _Layout:
    """Sugiyama-style: layers, a lane node where an arrow crosses a layer, ordering by barycentres, then x by
    repeated least-squares alignment under the order and spacing constraints."""

    def __init__(self, graph: ModuleGraph) -> None:
        self.graph = graph
        self.packages = graph.packages()
        self.edges = graph.package_edges()
        weights = {e: len(imps) for e, imps in self.edges.items()}
        self.order = top_down_order(self.packages, weights)
        self.level = layers(self.order, set(self.edges))
        pos = {p: i for i, p in enumerate(self.order)}
        self.up = {(a, b) for a, b in self.edges if pos[a] > pos[b]}
        self.box_w = self._box_width()
        self.nodes: dict[tuple, _Node] = {}
        for p in self.packages:
            self.nodes["box", p] = _Node(("box", p), self.level[p], self.box_w)
        self.chains: dict[tuple[str, str], list[tuple]] = {}  # edge -> node keys from the upper box down
        for i, (a, b) in enumerate(self.edges):
            upper, lower = (b, a) if (a, b) in self.up else (a, b)
            chain = [("box", upper)]
            for lv in range(self.level[upper] - 1, self.level[lower], -1):
                key = ("lane", i, lv)
                self.nodes[key] = _Node(key, lv, 0.0)
                chain.append(key)
            chain.append(("box", lower))
            self.chains[a, b] = chain
        self.top = max(self.level.values())
        self.rows: dict[int, list[tuple]] = {lv: [] for lv in range(self.top + 1)}
        for key, node in sorted(self.nodes.items(), key=lambda kv: (kv[0][0] != "box", _hint(kv[0][1]), kv[0])):
            self.rows[node.layer].append(key)
        self.neighbours: dict[tuple, list[tuple]] = defaultdict(list)
        for chain in self.chains.values():
            for u, v in itertools.pairwise(chain):
                self.neighbours[u].append(v)
                self.neighbours[v].append(u)
        self._order_rows()
        self._place_x()

    def _box_width(self) -> float:
        chars = max(len(self.graph.files[m].split("/")[-1]) + 1 + len(f"{n:,}") for m, n in self.graph.lines.items())
        return max(210.0, chars * MONO_SIZE * 0.6 + 40.0)

    def _crossings(self) -> int:
        index = {k: i for row in self.rows.values() for i, k in enumerate(row)}
        total = 0
        for lv in range(self.top, 0, -1):
            segs = [
                (index[u], index[v])
                for chain in self.chains.values()
                for u, v in itertools.pairwise(chain)
                if self.nodes[u].layer == lv
            ]
            total += sum((a1 - a2) * (b1 - b2) < 0 for i, (a1, b1) in enumerate(segs) for a2, b2 in segs[i + 1 :])
        return total

    def _order_rows(self) -> None:
        best = (self._crossings(), {lv: list(r) for lv, r in self.rows.items()})
        for sweep in range(12):
            down = sweep % 2 == 0
            levels = range(self.top - 1, -1, -1) if down else range(1, self.top + 1)
            for lv in levels:
                ref = lv + 1 if down else lv - 1
                index = {k: i for i, k in enumerate(self.rows[ref])}
                row = self.rows[lv]
                current = {k: i for i, k in enumerate(row)}

                def centre(k: tuple, index: dict = index, current: dict = current) -> tuple[float, int]:
                    near = [index[n] for n in self.neighbours[k] if n in index]
                    return (sum(near) / len(near) if near else float(current[k]), current[k])

                row.sort(key=centre)
            crossings = self._crossings()
            if crossings < best[0]:
                best = (crossings, {lv: list(r) for lv, r in self.rows.items()})
        self.rows = best[1]

    def _gap(self, a: tuple, b: tuple) -> float:
        kinds = (a[0], b[0])
        gap = BOX_GAP if kinds == ("box", "box") else LANE_GAP if kinds == ("lane", "lane") else LANE_BOX_GAP
        return self.nodes[a].width / 2 + gap + self.nodes[b].width / 2

    def _place_x(self) -> None:
        for row in self.rows.values():
            x = 0.0
            for i, k in enumerate(row):
                x += self._gap(row[i - 1], k) if i else 0.0
                self.nodes[k].x = x
            shift = x / 2
            for k in row:
                self.nodes[k].x -= shift
        for it in range(60):
            levels = range(self.top, -1, -1) if it % 2 == 0 else range(self.top + 1)
            for lv in levels:
                row = self.rows[lv]
                offsets = [0.0]
                for a, b in itertools.pairwise(row):
                    offsets.append(offsets[-1] + self._gap(a, b))
                targets, weights = [], []
                for k, off in zip(row, offsets, strict=True):
                    near = [self.nodes[n].x for n in self.neighbours[k]]
                    want = sum(near) / len(near) if near else self.nodes[k].x
                    targets.append(want - off)
                    weights.append(1.0 if k[0] == "lane" else 0.5 + len(near) / 4)
                fit = _pav(targets, weights)
                for k, y, off in zip(row, fit, offsets, strict=True):
                    self.nodes[k].x = y + off


class _Svg:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(self, x: float, y: float, text: str, cls: str, anchor: str = "start", fill: str | None = None) -> None:
        attrs = f' text-anchor="{anchor}"' if anchor != "start" else ""
        attrs += f' fill="{fill}"' if fill else ""
        self.add(f'<text x="{_f(x)}" y="{_f(y)}" class="{cls}"{attrs}>{_esc(text)}</text>')


def _rel(module: str, graph: ModuleGraph) -> str:
    return graph.files[module]


def edge_summary(imps: list[Import], graph: ModuleGraph) -> str:
    """``config/checks.py, config/schema.py -> dispatch/registry.py`` style, with lazy / by-name marks."""
    by_dst: dict[str, list[str]] = defaultdict(list)
    for imp in imps:
        mark = {"lazy": " (lazy)", "by name": " (by name)"}.get(imp.kind, "")
        src = _rel(imp.src, graph) + mark
        if src not in by_dst[imp.dst]:
            by_dst[imp.dst].append(src)
    return "; ".join(f"{', '.join(srcs)} -> {_rel(dst, graph)}" for dst, srcs in sorted(by_dst.items()))


def render(graph: ModuleGraph) -> str:
    """The module map as SVG text."""
    lay = _Layout(graph)
    packages, nodes, box_w = lay.packages, lay.nodes, lay.box_w
    colors = dict(COLORS)
    for i, p in enumerate(p for p in packages if p not in COLORS):
        colors[p] = SPARE_COLORS[i % len(SPARE_COLORS)]

    desc_chars = int((box_w - 22) / (DESC_SIZE * 0.55))
    desc = {p: _wrap(DESCRIPTIONS.get(p, ""), desc_chars) for p in packages}
    box_h = {
        p: HEAD_H + 8 + len(desc[p]) * (DESC_SIZE + 3) + 6 + len(graph.modules_of(p)) * LINE_H + 8 for p in packages
    }
    row_h = {lv: max((box_h[k[1]] for k in row if k[0] == "box"), default=0.0) for lv, row in lay.rows.items()}

    title_h = 92.0
    row_top: dict[int, float] = {}
    y = MARGIN + title_h
    for lv in range(lay.top, -1, -1):
        row_top[lv] = y
        y += max(row_h[lv], 24.0) + GUTTER
    diagram_bottom = y - GUTTER

    xs = [n.x - n.width / 2 - (8 if n.key[0] == "lane" else 0) for n in nodes.values()]
    xe = [n.x + n.width / 2 + (8 if n.key[0] == "lane" else 0) for n in nodes.values()]
    shift = MARGIN - min(xs)
    for n in nodes.values():
        n.x += shift
    diagram_right = max(xe) + shift

    def box_left(p: str) -> float:
        return nodes["box", p].x - box_w / 2

    def row_bottom(lv: int) -> float:
        return row_top[lv] + row_h[lv]

    # ports: where each arrow leaves a box's bottom or enters its top, ordered by where the arrow goes
    ports: dict[tuple[tuple[str, str], str], float] = {}
    for p in packages:
        for side in ("bottom", "top"):
            edges = [
                e
                for e, chain in lay.chains.items()
                if (side == "bottom" and chain[0] == ("box", p)) or (side == "top" and chain[-1] == ("box", p))
            ]

            def towards(e: tuple[str, str], side: str = side) -> tuple[float, float]:
                chain = lay.chains[e]
                near, far = (chain[1], chain[-1]) if side == "bottom" else (chain[-2], chain[0])
                return (nodes[near].x, nodes[far].x)

            edges.sort(key=lambda e: (towards(e), e))
            left, span = box_left(p) + 18, box_w - 36
            for i, e in enumerate(edges):
                ports[e, side] = left + span * (i + 1) / (len(edges) + 1)

    svg = _Svg()
    legend_x = diagram_right + 48
    legend_w = 360.0
    width = legend_x + legend_w + MARGIN

    # ---- arrows first, boxes on top of them
    arrow_parts: list[str] = []
    badges: list[tuple[float, float, int]] = []
    up_edges = sorted(lay.up, key=lambda e: (_hint(e[0]), _hint(e[1])))
    for e, chain in lay.chains.items():
        upper, lower = chain[0][1], chain[-1][1]
        is_up = e in lay.up
        color = UP if is_up else colors[e[0]]
        sx, tx = ports[e, "bottom"], ports[e, "top"]
        start_y, end_y = row_top[lay.level[upper]] + box_h[upper], row_top[lay.level[lower]]
        head = 9.0
        start_y += head if is_up else 0.0  # the head sits at the arrow's target: the upper box when it points up
        end_y -= 0.0 if is_up else head
        pts = [(sx, start_y), (sx, row_bottom(lay.level[upper]))]
        for key in chain[1:-1]:
            lx = nodes[key].x
            pts += [(lx, row_top[key[2]]), (lx, row_bottom(key[2]))]
        pts.append((tx, end_y))
        d = f"M{_f(pts[0][0])},{_f(pts[0][1])} L{_f(pts[1][0])},{_f(pts[1][1])}"
        mids = []
        for i in range(1, len(pts) - 1, 2):
            (x1, y1), (x2, y2) = pts[i], pts[i + 1]
            k = (y2 - y1) / 2
            d += f" C{_f(x1)},{_f(y1 + k)} {_f(x2)},{_f(y2 - k)} {_f(x2)},{_f(y2)}"
            mids.append(((x1 + x2) / 2, (y1 + y2) / 2))
            if i + 2 < len(pts):
                d += f" L{_f(pts[i + 2][0])},{_f(pts[i + 2][1])}"
        tip_x, tip_y, sign = (sx, start_y - head, -1) if is_up else (tx, end_y + head, 1)
        base_y = _f(tip_y - sign * head)
        tri = f"{_f(tip_x)},{_f(tip_y)} {_f(tip_x - 5)},{base_y} {_f(tip_x + 5)},{base_y}"
        title = f"{e[0]} -> {e[1]}: {edge_summary(lay.edges[e], graph)}"
        width_attr = "2.4" if is_up else "1.6"
        dash = ' stroke-dasharray="7 4"' if is_up else ""
        arrow_parts.append(
            f'<g class="edge"><title>{_esc(title)}</title>'
            f'<path d="{d}" fill="none" stroke="{color}" stroke-width="{width_attr}"{dash} stroke-opacity="0.9"/>'
            f'<polygon points="{tri}" fill="{color}"/></g>'
        )
        if is_up:
            mx, my = mids[len(mids) // 2]
            badges.append((mx, my, up_edges.index(e) + 1))

    # ---- title
    n_mod, n_lines = len(graph.lines), sum(graph.lines.values())
    svg.text(MARGIN, MARGIN + 22, "epruntime module map", "title")
    svg.text(
        MARGIN,
        MARGIN + 48,
        f"{len(packages)} packages, {n_mod} modules, {n_lines:,} lines; {len(lay.edges)} package-to-package "
        f"imports made of {sum(map(len, lay.edges.values()))} module imports",
        "sub",
    )
    svg.text(
        MARGIN,
        MARGIN + 68,
        "One box per folder of epruntime/ (modules with line counts). Every package sits above the packages it "
        "imports where the imports allow it.",
        "sub",
    )
    svg.parts.extend(arrow_parts)

    # ---- boxes
    for p in packages:
        x, y0, h, c = box_left(p), row_top[lay.level[p]], box_h[p], colors[p]
        mods = graph.modules_of(p)
        total = sum(graph.lines[m] for m in mods)
        svg.add(
            f'<rect x="{_f(x)}" y="{_f(y0)}" width="{_f(box_w)}" height="{_f(h)}" rx="8" '
            f'fill="{_tint(c, 0.93)}" stroke="{c}" stroke-width="1.5"/>'
        )
        svg.add(
            f'<path d="M{_f(x)},{_f(y0 + HEAD_H)} V{_f(y0 + 8)} Q{_f(x)},{_f(y0)} {_f(x + 8)},{_f(y0)} '
            f"H{_f(x + box_w - 8)} Q{_f(x + box_w)},{_f(y0)} {_f(x + box_w)},{_f(y0 + 8)} "
            f'V{_f(y0 + HEAD_H)} Z" fill="{c}"/>'
        )
        svg.text(x + 11, y0 + 19.5, f"{p}/", "head")
        svg.text(x + box_w - 11, y0 + 19, f"{total:,} lines", "headn", anchor="end")
        ty = y0 + HEAD_H + 8 + DESC_SIZE
        for line in desc[p]:
            svg.text(x + 11, ty, line, "desc")
            ty += DESC_SIZE + 3
        ty += 3
        svg.add(
            f'<line x1="{_f(x + 8)}" y1="{_f(ty - 6)}" x2="{_f(x + box_w - 8)}" y2="{_f(ty - 6)}" '
            f'stroke="{_tint(c, 0.6)}" stroke-width="1"/>'
        )
        for m in mods:
            base = ty + LINE_H - 4.5
            svg.text(x + 12, base, graph.files[m].split("/", 1)[-1] if p != TOP else graph.files[m], "mod")
            svg.text(x + box_w - 12, base, f"{graph.lines[m]:,}", "num", anchor="end")
            ty += LINE_H

    for bx, by, number in badges:
        svg.add(f'<circle cx="{_f(bx)}" cy="{_f(by)}" r="9.5" fill="{UP}" stroke="#ffffff" stroke-width="1.5"/>')
        svg.text(bx, by + 4.2, str(number), "badge", anchor="middle")

    # ---- legend
    ly = MARGIN + title_h
    lx = legend_x
    svg.text(lx, ly + 4, "How to read it", "lhead")
    ly += 26
    svg.add(
        f'<path d="M{_f(lx)},{_f(ly)} H{_f(lx + 34)}" stroke="{colors.get("layer", "#555")}" stroke-width="1.6"/>'
        f'<polygon points="{_f(lx + 42)},{_f(ly)} {_f(lx + 33)},{_f(ly - 5)} {_f(lx + 33)},{_f(ly + 5)}" '
        f'fill="{colors.get("layer", "#555")}"/>'
    )
    chars = int((legend_w - 54) / (12 * 0.56))
    for i, line in enumerate(
        _wrap("A -> B: a module of A imports one of B, drawn in A's colour, pointing down.", chars)
    ):
        svg.text(lx + 52, ly + 4 + i * 16, line, "ltext")
    ly += 44
    svg.add(
        f'<path d="M{_f(lx)},{_f(ly)} H{_f(lx + 34)}" stroke="{UP}" stroke-width="2.4" stroke-dasharray="7 4"/>'
        f'<polygon points="{_f(lx + 42)},{_f(ly)} {_f(lx + 33)},{_f(ly - 5)} {_f(lx + 33)},{_f(ly + 5)}" '
        f'fill="{UP}"/>'
    )
    up_text = "Red, numbered: points up, to a package drawn above the importer (an import cycle forces it)."
    for i, line in enumerate(_wrap(up_text, chars)):
        svg.text(lx + 52, ly + 4 + i * 16, line, "ltext")
    ly += 18 + 16 * len(_wrap(up_text, chars)) + 8

    svg.text(lx, ly, "Arrows that point up" if up_edges else "No arrow points up", "lhead")
    ly += 22
    for i, e in enumerate(up_edges, start=1):
        svg.add(f'<circle cx="{_f(lx + 9)}" cy="{_f(ly - 4)}" r="9.5" fill="{UP}"/>')
        svg.text(lx + 9, ly + 0.2, str(i), "badge", anchor="middle")
        svg.text(lx + 26, ly, f"{e[0]} -> {e[1]}", "lbold")
        ly += 17
        for part in edge_summary(lay.edges[e], graph).split("; "):
            for line in _wrap(part, int((legend_w - 26) / (11.5 * 0.6))):
                svg.text(lx + 26, ly, line, "lmono")
                ly += 15
        ly += 9
    loops = cycles(set(lay.edges))
    ly += 6
    svg.text(lx, ly, "Import cycles between packages" if loops else "No import cycle between packages", "lhead")
    ly += 22
    for loop in loops:
        for line in _wrap(" <-> ".join(loop), chars + 8):
            svg.text(lx, ly, line, "ltext")
            ly += 16
        ly += 4
    ly += 10
    svg.text(lx, ly, "Imports counted", "lhead")
    ly += 20
    counted = (
        "Module-level and lazy (in-function) imports, relative or absolute, and 'epruntime.x.y:Name' strings "
        "imported by name (the dispatcher registry). 'if TYPE_CHECKING:' blocks are skipped. Hover an arrow "
        "for the imports that make it."
    )
    for line in _wrap(counted, chars + 8):
        svg.text(lx, ly, line, "ltext")
        ly += 16

    rule_y = max(diagram_bottom, ly) + 30
    cap_y = rule_y + 24
    height = cap_y + 17 + MARGIN
    svg.add(
        f'<line x1="{_f(MARGIN)}" y1="{_f(rule_y)}" x2="{_f(width - MARGIN)}" y2="{_f(rule_y)}" '
        f'stroke="#d0d4d9" stroke-width="1"/>'
    )
    svg.text(MARGIN, cap_y, "Generated from the imports in epruntime/ by: python scripts/module_map.py", "caption")
    svg.text(
        MARGIN,
        cap_y + 17,
        "python scripts/module_map.py --check (run by tests/test_module_map.py) says whether this file is current.",
        "caption",
    )

    style = (
        f"text{{font-family:{FONT};fill:#1f2328}}"
        f".title{{font-size:24px;font-weight:bold}}"
        f".sub{{font-size:13px;fill:#57606a}}"
        f".head{{font-size:15px;font-weight:bold;fill:#ffffff}}"
        f".headn{{font-size:11.5px;fill:#ffffff;fill-opacity:0.92}}"
        f".desc{{font-size:{DESC_SIZE}px;font-style:italic;fill:#444c56}}"
        f".mod,.num,.lmono{{font-family:{MONO};font-size:{MONO_SIZE}px}}"
        f".num{{fill:#57606a}}"
        f".lmono{{font-size:11.5px;fill:#3d444d}}"
        f".badge{{font-size:11.5px;font-weight:bold;fill:#ffffff}}"
        f".lhead{{font-size:14px;font-weight:bold}}"
        f".lbold{{font-size:12.5px;font-weight:bold;fill:{UP}}}"
        f".ltext{{font-size:12px;fill:#3d444d}}"
        f".caption{{font-size:12px;fill:#57606a}}"
    )
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_f(width)}" height="{_f(height)}" '
        f'viewBox="0 0 {_f(width)} {_f(height)}" font-family="{FONT}">\n'
        f"<title>epruntime module map</title>\n<style>{style}</style>\n"
        f'<rect width="100%" height="100%" fill="#ffffff"/>\n'
    )
    return head + "\n".join(svg.parts) + "\n</svg>\n"


# ---------------------------------------------------------------- text and main


def report(graph: ModuleGraph) -> str:
    """The package edges as text, the upward ones and the cycles."""
    lay = _Layout(graph)
    out = [f"package edges (A -> B: a module of A imports one of B), {len(lay.edges)}; layers top to bottom:"]
    for lv in range(lay.top, -1, -1):
        out.append(f"  layer {lv}: " + ", ".join(k[1] for k in lay.rows[lv] if k[0] == "box"))
    for (a, b), imps in lay.edges.items():
        mark = "  UP" if (a, b) in lay.up else ""
        out.append(f"  {a:>9} -> {b:<9} {len(imps):3d} import(s){mark}")
    for a, b in sorted(lay.up):
        out.append(f"up: {a} -> {b}: {edge_summary(lay.edges[a, b], graph)}")
    loops = cycles(set(lay.edges))
    out.append("cycles: " + ("; ".join(" <-> ".join(c) for c in loops) if loops else "none"))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the SVG is not what the code gives now")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the SVG (default: docs/module_map.svg)")
    args = parser.parse_args(argv)
    graph = scan()
    svg = render(graph)
    try:
        shown = args.output.relative_to(ROOT)
    except ValueError:
        shown = args.output
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != svg:
            print(f"{shown} is out of date with the imports in epruntime/: run python scripts/module_map.py")
            return 1
        print(f"{shown} is current")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(svg, encoding="utf-8")
    print(report(graph))
    print(f"wrote {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
