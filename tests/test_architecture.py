"""The package's import graph: no cycles, and the engine never imports the main job.

The graph is read from the source (``ast``), so imports inside functions count as edges too (a
lazy import hides a cycle from Python, not from a reader); imports under ``if TYPE_CHECKING:`` do
not (they never run).  ``from pkg import name`` is an edge to ``pkg.name`` when that is a module,
else to ``pkg``.  A package's ``__init__`` re-exports are its edges, and an explicit ``import snopt_dyn``
is an edge to the package's ``__init__``.  Run with ``-s`` to print the graph.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"snopt_dyn": ROOT / "snopt_dyn", "snopt_dyn.adapters": ROOT / "adapters"}
MAIN_JOB = "snopt_dyn.compare"
#: the user-facing entry points that may import the main job (and nothing in the engine may)
ENTRY_POINTS = {"snopt_dyn.__main__"}
#: optional integrations: they import their library at module level, and nothing imports them eagerly
INTEGRATIONS = ("snopt_dyn.adapters", "snopt_dyn.lightning", "snopt_dyn.estimators")


def discover_modules() -> Dict[str, Path]:
    """Every module of ``snopt_dyn`` and ``snopt_dyn.adapters`` -> its file."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package] + parts)
            if package == "snopt_dyn" and name.startswith("snopt_dyn.adapters"):
                continue
            modules[name] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes that can run (skipping ``if TYPE_CHECKING:`` bodies)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: Optional[Dict[str, Path]] = None, extra: Optional[Dict[str, str]] = None) -> Dict[str, Set[str]]:
    """``module -> modules it imports`` restricted to our own modules; ``extra`` adds sources by name."""
    modules = dict(modules or discover_modules())
    sources = {name: path.read_text() for name, path in modules.items()}
    sources.update(extra or {})
    graph: Dict[str, Set[str]] = {}
    for name, source in sources.items():
        is_package = name in PACKAGES or (name in modules and modules[name].name == "__init__.py")
        edges = set()
        for node in _imports(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base for a in node.names]
            for target in targets:
                while target and target not in sources:  # `import snopt_dyn.models.cnf` -> that module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: Dict[str, Set[str]], start: Optional[str] = None) -> Optional[List[str]]:
    """One import cycle (reachable from ``start``, default: anywhere) as a list of modules
    (first == last), or ``None``."""
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in [start] if start else sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def in_main_job(name: str) -> bool:
    return name == MAIN_JOB or name.startswith(MAIN_JOB + ".")


def test_no_import_cycles_and_the_engine_never_imports_the_main_job():
    graph = import_graph()
    print("\nimport graph (module -> our modules it imports):")
    for name in sorted(graph):
        print(f"  {name} -> {', '.join(sorted(graph[name])) or '-'}")
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    into_main = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                       if in_main_job(b) and not in_main_job(a) and a not in ENTRY_POINTS)
    assert not into_main, f"engine/adapters/models/datasets import the main job: {into_main}"


def test_the_engine_imports_no_optional_library_at_import_time():
    """torchdyn/torchcde/torchsde/lightning/sklearn/matplotlib only inside functions (lazily)."""
    optional = ("torchdyn", "torchcde", "torchsde", "pytorch_lightning", "lightning", "sklearn", "matplotlib", "tqdm")
    offenders = []
    for name, path in discover_modules().items():
        if in_main_job(name) or name.startswith(INTEGRATIONS):
            continue
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in optional]
    assert not offenders, offenders
    eager = import_graph()["snopt_dyn"]
    assert not [m for m in eager if m.startswith(INTEGRATIONS) or in_main_job(m)], eager


def test_the_cycle_check_sees_a_deliberate_cycle():
    """The check above can fail: a lazy import of the main job from the engine is a cycle and an arrow."""
    sabotage = {"snopt_dyn.hooks": (PACKAGES["snopt_dyn"] / "hooks.py").read_text()
                + "\n\ndef _sabotage():\n    from .compare import runner\n"}
    graph = import_graph(extra=sabotage)
    assert "snopt_dyn.compare.runner" in graph["snopt_dyn.hooks"]
    cycle = find_cycle(graph, start="snopt_dyn.hooks")
    assert cycle is not None and "snopt_dyn.hooks" in cycle, cycle


def test_no_reference_to_a_design_document_outside_the_repository():
    """Docstrings and docs cite docs/ARCHITECTURE.md, not the DESIGN.md that lives outside the repository."""
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md") and ".venv" not in p.parts
             and "site-packages" not in p.parts and p.name != "test_architecture.py"]
    assert not [str(p.relative_to(ROOT)) for p in files if "DESIGN.md" in p.read_text(errors="ignore")]

