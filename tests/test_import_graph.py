"""The import graph of engine + chatapp has no cycles (issue 14), and reading a GGUF header
loads no JIT.

The graph is built from the source with `ast`: every `import` / `from ... import` counts,
at module level and inside functions alike (a function-level import only hides a cycle, it
does not cut it), except those under `if TYPE_CHECKING:`, which never run. An edge goes to
the module named: `from engine.quants import gemm` is an edge to engine.quants.gemm when
that is a module, else to the package engine.quants. The implicit import of a parent
package (importing engine.quants.gemm runs engine/quants/__init__.py) is not an edge: a
package's own modules are its parts, not its dependants.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "chatapp")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of PACKAGES."""
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node that can run (skips `if TYPE_CHECKING:` bodies)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of PACKAGES it imports (see the module docstring for the rules)."""
    mods = module_files(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:   # relative: from the module's package, up level - 1
                    base = mod.split(".")
                    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in mods else origin
                           for a in node.names]
            for t in targets:
                # `import a.b.c` names a.b.c; keep the longest prefix that is one of ours
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:   # recursion depth <= number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """For every import edge inside a cycle, the shortest cycle through it, as a closed path
    a -> ... -> a starting at its smallest name; each cycle once, sorted."""
    cycles = set()
    for comp in strongly_connected(graph):
        members = set(comp)
        for m in comp:
            for w in graph[m] & members:
                path = _closed_path(graph, m, w, members)[:-1]
                i = path.index(min(path))
                cycles.add(tuple(path[i:] + path[:i] + [path[i]]))
    return sorted(list(c) for c in cycles)


def _closed_path(graph: dict[str, set[str]], start: str, first: str, members: set[str]) -> list[str]:
    """The shortest cycle start -> first -> ... -> start inside the component (breadth-first)."""
    if first == start:
        return [start, start]
    prev: dict[str, str] = {first: start}
    frontier = [first]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no path back to {start} from {first}")


# Cycles being cut elsewhere, each with who cuts it. An entry that no longer exists fails the
# test too, so the list only shrinks.
# Cycles tolerated for now, each with why (none: keep it so).
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def test_no_import_cycles():
    cycles = {tuple(c) for c in find_cycles(import_graph())}
    new = sorted(cycles - KNOWN_CYCLES.keys())
    assert not new, "import cycles:\n" + "\n".join(" -> ".join(p) for p in new)
    gone = sorted(KNOWN_CYCLES.keys() - cycles)
    assert not gone, "cut, remove from KNOWN_CYCLES: " + "; ".join(" -> ".join(p) for p in gone)


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    """The check can fail: a two-module cycle through a function-level import, a three-module
    one through a relative import, and an import under TYPE_CHECKING that is no edge."""
    files = {
        "engine/__init__.py": "",
        "engine/a.py": "def f():\n    from engine import b\n",
        "engine/b.py": "import engine.a\n",
        "engine/sub/__init__.py": "",
        "engine/sub/x.py": "from .y import thing\n",
        "engine/sub/y.py": "from engine.sub import z\n",
        "engine/sub/z.py": "from engine.sub.x import other\n",
        "engine/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from engine import d\n",
        "engine/d.py": "from engine import c\n",
        "chatapp/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["engine.c"] == set()
    assert graph["engine.d"] == {"engine.c"}
    assert find_cycles(graph) == [["engine.a", "engine.b", "engine.a"],
                      ["engine.sub.x", "engine.sub.y", "engine.sub.z", "engine.sub.x"]]


_HEADER_PROBE = """
import json, sys
from pathlib import Path
from engine.gguf_file import GGUFFile
from chatapp.discovery import Candidate
from chatapp.model_headers import describe
path = Path(sys.argv[1])
with GGUFFile(path) as gf:
    n = len(gf.tensors)
entry = describe(Candidate(path, "test", path.name))
heavy = sorted(m for m in ("numba", "llvmlite", "engine.quants.activations") if m in sys.modules)
print(json.dumps({"tensors": n, "arch": entry.arch, "supported": entry.supported, "reason": entry.reason, "heavy": heavy}))
"""


@pytest.mark.parametrize("fixture", ["qwen3/tiny-q4_k_m.gguf", "qwen35/tiny-q8_0.gguf"])
def test_reading_a_header_loads_no_jit(fixture):
    """GGUFFile and discovery's describe() need the formats table only, not the kernels."""
    path = ROOT / "tests" / "fixtures" / fixture
    out = subprocess.run([sys.executable, "-c", _HEADER_PROBE, str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["tensors"] > 0 and got["arch"] == fixture.split("/")[0]
    assert got["supported"] and not got["reason"]
    assert got["heavy"] == []


def test_the_architecture_names_match_the_registry():
    """engine/architectures.py (what the picker checks) names exactly the modules that run."""
    from engine.architectures import SUPPORTED_ARCHITECTURES
    from engine.models import ARCHITECTURES

    assert tuple(sorted(ARCHITECTURES)) == SUPPORTED_ARCHITECTURES
