"""Where things live: the import rules the package docstrings state hold, with no cycles and no private names
taken from another module (read from the source with ``ast``, so lazy imports inside functions count too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "heads", "cache")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {
    _module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
}
MODULES["tasks"] = ROOT / "tasks.py"
# benchmarks use the library as any user would, so they are checked for private names too (tests may test a
# module's own private helpers)
USERS: dict[str, Path] = {f"benchmarks.{p.stem}": p for p in sorted((ROOT / "benchmarks").glob("*.py"))}


def _resolve(name: str) -> str | None:
    """The project module an import of ``name`` loads (a name imported from a package resolves to the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every import statement, at any depth."""
    path = MODULES.get(module) or USERS[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                # "from pkg import module" imports a module; "from module import name" a name
                out.append((target, None, node.lineno) if target in MODULES else (node.module, alias.name, node.lineno))
    return out


def _project_graph() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        deps = {_resolve(target) for target, _, _ in _imports(module)}
        deps.discard(None)
        deps.discard(module)
        # importing a sub-module runs its package's __init__ first; those edges are not cycles of code
        graph[module] = {d for d in deps if not module.startswith(d + ".")}
    return graph


def test_no_import_cycles():
    graph = _project_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_from_other_modules():
    found = [f"{(MODULES.get(m) or USERS[m]).relative_to(ROOT)}:{line}: {name} from {target}"
             for m in [*MODULES, *USERS] for target, name, line in _imports(m)
             if name is not None and name.startswith("_") and _resolve(target) not in (None, m)]
    found += _private_attribute_uses()
    assert not found, "private names used across modules:\n" + "\n".join(found)


def _private_attribute_uses() -> list[str]:
    """``alias._name`` where ``alias`` is a project module imported under that name."""
    found = []
    for module, path in {**MODULES, **USERS}.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({(a.asname or a.name): a.name for a in node.names if _resolve(a.name)})
            elif isinstance(node, ast.ImportFrom) and node.module:
                aliases.update({(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in MODULES})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


# What each part of the project may import from the others (the package docstrings say the same).
ALLOWED = {
    "pipeline.errors": set(),
    "pipeline.outputs": set(),
    "pipeline.progress": set(),
    "pipeline.ava": {"pipeline.errors", "pipeline.outputs", "pipeline.progress", "pipeline.ava", "cache.boxes", "cache.schema"},
    "pipeline.mini": {"pipeline.errors", "pipeline.outputs", "pipeline.progress", "pipeline.ava", "pipeline.mini"},
    "pipeline.features": {"pipeline.errors", "pipeline.outputs", "pipeline.progress", "pipeline.ava", "pipeline.features", "cache"},
    "pipeline.training": {"pipeline.errors", "pipeline.outputs", "pipeline.progress", "pipeline.ava", "pipeline.features", "pipeline.training", "cache", "heads"},
    "pipeline.predict": {"pipeline.errors", "pipeline.outputs", "pipeline.progress", "pipeline.ava", "pipeline.features", "pipeline.training", "pipeline.predict", "cache", "heads"},
    "heads": {"heads"},
    "cache": {"cache", "pipeline.errors", "pipeline.outputs", "pipeline.progress"},  # leaf utilities of the tools
}


def _part(module: str) -> str | None:
    return next((p for p in sorted(ALLOWED, key=len, reverse=True) if module == p or module.startswith(p + ".")), None)


def test_each_part_imports_only_what_it_may():
    wrong = [f"{module} imports {dep}" for module, deps in _project_graph().items() if _part(module)
             for dep in deps if not any(dep == a or dep.startswith(a + ".") for a in ALLOWED[_part(module)])]
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith(("pipeline", "heads", "cache"))])
def test_no_luigi_below_tasks(module):
    assert not [t for t, _, _ in _imports(module) if t.split(".")[0] == "luigi"]


def test_ava_and_mini_import_without_torch():
    modules = [m for m in MODULES if m.startswith(("pipeline.ava", "pipeline.mini", "pipeline.errors", "pipeline.outputs", "pipeline.progress"))]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
