"""The package's shape: no import circle among its modules, no module over 450 lines, no import hook."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "melhubert_fairseq"
PACKAGE = PACKAGE_DIR.name
MAX_LINES = 450

#: Modules still being split along their seams (each is over MAX_LINES today); empty this list as they are.


def module_files() -> Dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` names its package)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The package's modules that ``name`` imports, anywhere in it (in functions too): a module named by an
    import, and for ``from X import y`` the submodule ``X.y`` where there is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c of a non-module c: the module a.b
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the package modules it imports.

    Two edges Python adds are left out: importing ``a.b.c`` runs the package ``a.b`` first, but a
    package's ``__init__`` that imports its own submodules forms no circle with them; and the top
    package's :func:`~melhubert_fairseq.register_with_fairseq` imports every registering module when
    called, which is only after the package's names exist.
    """
    modules = module_files()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    graph[PACKAGE] = set()  # register_with_fairseq / load_checkpoint: see the docstring
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as [a, b, ..., a], or [] if there is none (depth-first search)."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # register_with_fairseq imports these inside the function; the top package's own edges are dropped,
    # so check the parser on a module whose function-level import is known.
    assert "melhubert_fairseq.feature_reader" in graph["melhubert_fairseq.kmeans.sources"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle_among_the_packages_modules():
    cycle = find_cycle(import_graph())
    assert not cycle, " -> ".join(cycle)


def test_no_module_is_over_450_lines():
    long = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in module_files().items()}
    long = {name: count for name, count in long.items() if count > MAX_LINES}
    assert long == {}, long


def test_importing_the_package_installs_no_import_hook_and_no_fairseq():
    code = (
        "import sys\n"
        "before = list(sys.meta_path)\n"
        "import melhubert_fairseq\n"
        "assert sys.meta_path == before, sys.meta_path\n"
        "assert 'fairseq' not in sys.modules and 'torch' not in sys.modules\n"
        "import fairseq\n"
        "melhubert_fairseq.register_with_fairseq()\n"
        "assert sys.meta_path == before, sys.meta_path\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok"]
