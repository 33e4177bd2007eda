"""The architecture holds: core's import graph has no cycle, layers import downwards only,
core imports no driver, and core defers imports only where start-up time asks for it.

Imports are read from the source (ast), including imports inside functions; imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "core"
PACKAGE = "vmconfine"

#: lowest first: a module may import its own layer and the layers before it
LAYERS = ("base", "domain", "config", "plugin", "qemu", "launch", "report", "daemon", "cli")
BASE_MODULES = {"vmconfine", "vmconfine.errors", "vmconfine.fsinfo", "vmconfine.inputs",
                "vmconfine.perms", "vmconfine.remember", "vmconfine.client",
                "vmconfine.sanitize"}
CLI_MODULES = {"vmconfine.cli", "vmconfine.cli_daemon", "vmconfine.__main__",
               "vmconfine.remote"}
#: where a function-level import is allowed: the CLI imports each verb's code when the verb
#: runs, so ``vmconfine --help`` and light verbs start fast; the connection every command opens
#: and the definitions store load the plugins, the domain model and the pipeline only when a
#: command needs them (a daemonless ``list`` of an idle instance imports none of them)
DEFERRED_IMPORTS_ALLOWED = {"vmconfine.cli", "vmconfine.cli_daemon",
                            "vmconfine.launch.connection", "vmconfine.daemon.store"}


def module_name(path: Path) -> str:
    rel = path.relative_to(CORE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PACKAGE, *parts])


MODULES = {module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def layer(module: str) -> str:
    if module in BASE_MODULES:
        return "base"
    if module in CLI_MODULES:
        return "cli"
    return module.split(".")[1]


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported vmconfine module, line, inside a function) for every runtime import."""
    tree = ast.parse(MODULES[module].read_text())
    found: list[tuple[str, int, bool]] = []
    is_pkg = MODULES[module].name == "__init__.py"

    def resolve(name: str) -> str:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        return name

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    visit(sub, in_func)
                continue
            func = in_func or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        found.append((resolve(alias.name), child.lineno, in_func))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module if is_pkg else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                if base.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in MODULES else resolve(base), child.lineno,
                                  in_func))
            visit(child, func)

    visit(tree, False)
    return [(m, line, f) for m, line, f in found if m and m != module]


GRAPH = {m: imports(m) for m in MODULES}


def test_every_core_module_imports():
    import importlib

    for module in MODULES:
        if module != "vmconfine.__main__":  # it runs the CLI
            importlib.import_module(module)


def test_no_import_cycle():
    edges = {m: {dep for dep, _line, _f in deps} for m, deps in GRAPH.items()}
    # a package imports its submodules to re-export them: count the submodule's imports only
    cycles = _cycles(edges)
    assert not cycles, "import cycles in core: " + "; ".join(" -> ".join(c) for c in cycles)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_layers_import_downwards_only():
    bad = []
    for module, deps in GRAPH.items():
        mine = LAYERS.index(layer(module))
        for dep, line, _f in deps:
            if LAYERS.index(layer(dep)) > mine:
                bad.append(f"{MODULES[module].relative_to(CORE.parent)}:{line}: {module} "
                           f"({layer(module)}) imports {dep} ({layer(dep)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_deferred_imports_only_where_start_up_time_needs_them():
    bad = [f"{MODULES[m].relative_to(CORE.parent)}:{line}: imports {dep} inside a function"
           for m, deps in GRAPH.items() if m not in DEFERRED_IMPORTS_ALLOWED
           for dep, line, in_func in deps if in_func]
    assert not bad, "\n".join(bad)


def test_core_imports_no_driver():
    drivers = {p.name for p in (CORE.parent / "plugins").iterdir() if p.is_dir()}
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{module} imports {n}" for n in names
                    if n.split(".")[0].startswith(f"{PACKAGE}_") and
                    n.split(".")[0].removeprefix(f"{PACKAGE}_") in drivers | {"aa_helper"}]
    assert not bad, "\n".join(bad)


def _driver_names_in_code(source: str, names: set[str]) -> list[tuple[int, str]]:
    """String constants in ``source`` (docstrings aside) that are exactly a driver's name."""
    tree = ast.parse(source)
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in names and id(node) not in docs]


def test_core_names_no_driver():
    """Which driver is autodetected or always stacked is the driver's own declaration
    (``registry.add(..., autodetect=, implicit=)``): core code spells no driver's name."""
    drivers = {p.name for p in (CORE.parent / "plugins").iterdir()
               if (p / "__init__.py").is_file()}
    assert {"dac", "selinux", "apparmor"} <= drivers
    bad = [f"{path.relative_to(CORE.parent)}:{line}: {value!r}"
           for path in MODULES.values()
           for line, value in _driver_names_in_code(path.read_text(), drivers)]
    assert not bad, "\n".join(bad)
    # the check can fail
    assert _driver_names_in_code('"""dac"""\nORDER = ("selinux", "x")\n', drivers) == [
        (2, "selinux")]


@pytest.mark.parametrize("module", ["vmconfine.launch.pipeline", "vmconfine.plugin.stack"])
def test_graph_reader_sees_real_imports(module):
    """The checks above can fail: the reader finds the imports these modules really have."""
    deps = {d for d, _l, _f in GRAPH[module]}
    assert deps, module
    assert all(d in MODULES for d in deps)
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(fake) == [["a", "b", "c"]]
