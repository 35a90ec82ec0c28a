"""The package's shape, checked: no private attribute of a dependency is touched, the module graph has no cycle,
every module imports on its own, and one API's handlers never import another API's."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
# Modules that hold one API's HTTP handlers.
API_HANDLERS = {"gateway.handlers", "gateway.batch_api", "gateway.openai_batches", "gateway.admin_api"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def private_accesses(tree: ast.AST) -> list[str]:
    """`x._name` where `x` is not `self` or `cls`: our own classes use their private state only through self,
    so anything else is some other object's, a dependency's included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_no_private_attribute_of_another_object_is_read_or_written() -> None:
    offences = {name: private_accesses(ast.parse(path.read_text())) for name, path in modules().items()}
    assert {name: hits for name, hits in offences.items() if hits} == {}


def test_the_private_access_check_can_fail() -> None:
    sample = "import aiohttp\ndef f(resp):\n    resp._headers = 1\n    return self._ok, logging._srcfile\n"
    assert private_accesses(ast.parse(sample)) == ["resp._headers (line 3)", "logging._srcfile (line 4)"]


def imports_of(name: str, path: Path) -> set[str]:
    """The package modules `name` imports when it is loaded (imports under `if TYPE_CHECKING` are not run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(n) for node in guarded for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.startswith("gateway"):
                out.add(base)
                out.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("gateway"))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports_of(name, path) if m in mods and m != name} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], dict.fromkeys(edges, 0)  # 0 new, 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state[nxt] == 1:
                found.append([*path[path.index(nxt):], nxt])
            elif state[nxt] == 0:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if state[start] == 0:
            visit(start, [start])
    return found


def test_the_module_graph_has_no_cycle() -> None:
    assert cycles(graph()) == []


def test_the_cycle_check_can_fail() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_one_apis_handlers_do_not_import_another_apis() -> None:
    edges = graph()
    assert {name: sorted(edges[name] & (API_HANDLERS - {name})) for name in API_HANDLERS if name in edges} == {
        name: [] for name in API_HANDLERS if name in edges
    }


@pytest.mark.slow
def test_every_module_imports_on_its_own() -> None:
    names = sorted(n for n in modules() if n != "gateway.__main__")
    script = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    failures = []
    for name in names:  # one interpreter per module: a cycle shows only when its module is imported first
        run = subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True, check=False)
        if run.returncode:
            failures.append(f"{name}: {run.stderr.strip().splitlines()[-1]}")
    assert failures == []
