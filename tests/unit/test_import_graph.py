"""The package's import graph, read from the source with `ast` (nothing is imported): no cycle
between modules or between sub-packages, counting imports inside functions too, and an import
inside a function only where it keeps a heavy optional module (torch, megatron, transformers,
ray, sglang, triton) out of a module that does not need it at import time."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# (directory, its package name): `kernels/` installs as eureka_megatron.kernels (setup.py)
SOURCES = [(ROOT / "eureka_megatron", "eureka_megatron"), (ROOT / "kernels", "eureka_megatron.kernels")]
# heavy to import, or optional installs: the only reason to import inside a function
HEAVY = {"torch", "megatron", "transformers", "ray", "sglang", "triton",
         "liger_kernel", "transformer_engine", "nvidia", "matplotlib", "tensorboard"}


def module_name(path: Path, root: Path, package: str) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p, root, pkg): p for root, pkg in SOURCES for p in sorted(root.rglob("*.py"))}


def is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(module: str):
    """(target, top_level) for every runtime import in `module`: an intra-package target is the
    module imported (a `from pkg import name` of a submodule counts as that submodule); an
    external one is its top-level package name."""
    path = MODULES[module]
    is_pkg = path.name == "__init__.py"

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                     ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield resolve(a.name), top
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    yield (sub if sub in MODULES else resolve(base)), top
            yield from visit(child, inner)

    yield from visit(ast.parse(path.read_text()), True)


def resolve(name: str) -> str:
    if not name.startswith("eureka_megatron"):
        return name.split(".")[0]
    while name not in MODULES:
        name = name.rsplit(".", 1)[0]
    return name


EDGES = {m: list(imports(m)) for m in MODULES}


def top_closure(module: str) -> set[str]:
    """Everything importing `module` imports: its top-level imports, transitively (a package's
    `__init__` runs before any of its submodules)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in MODULES]
        todo += [t for t, top in EDGES.get(m, ()) if top]
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and MODULES[module].name == "__init__.py") \
        else module


def test_the_parse_sees_the_package():
    assert len(MODULES) > 50
    assert ("eureka_megatron.trainer.actor", True) in EDGES["eureka_megatron.trainer.loop"]


def test_no_cycle_between_modules():
    graph = {m: {t for t, _ in edges if t in MODULES and t != m} for m, edges in EDGES.items()}
    assert cycles(graph) == []


def test_no_cycle_between_subpackages():
    graph = defaultdict(set)
    for m, edges in EDGES.items():
        for t, _ in edges:
            if t in MODULES and subpackage(t) != subpackage(m):
                graph[subpackage(m)].add(subpackage(t))
    found = cycles(dict(graph))
    detail = {tuple(c): sorted((m, t) for m, edges in EDGES.items() for t, _ in edges
                               if t in MODULES and subpackage(m) in c and subpackage(t) in c
                               and subpackage(m) != subpackage(t)) for c in found}
    assert found == [], detail


def test_function_level_imports_only_defer_heavy_modules():
    closures = {m: top_closure(m) for m in MODULES}

    def heavy(m):
        return {t for x in closures[m] for t, top in EDGES.get(x, ()) if top and t in HEAVY}

    bad = []
    for m, edges in EDGES.items():
        here = heavy(m)
        for t, top in edges:
            if top:
                continue
            if t in MODULES:
                deferred = {t} | heavy(t) if t in HEAVY else heavy(t)
            else:
                deferred = {t} & HEAVY
            if not deferred - here:
                bad.append(f"{m} imports {t} inside a function")
    assert bad == []


@pytest.mark.parametrize("module", ["eureka_megatron.cli", "eureka_megatron.config"])
def test_cli_start_imports_no_heavy_module(module):
    """`eureka-megatron --help` and config validation stay torch-free."""
    pulled = {t for x in top_closure(module) for t, top in EDGES.get(x, ()) if top and t in HEAVY}
    assert pulled == set()
