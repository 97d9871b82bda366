"""The layout contract of docs/architecture.md, checked on the source itself.

- No module reaches into another module's private names (`from x import _y`, `obj._y`,
  `getattr(obj, "_y")` on anything but `self`, `cls` or `super()`).
- No import cycles between the top-level packages (`dlpipe.serving`, `dlpipe.tracking`, ...),
  counting imports inside functions too (TYPE_CHECKING-only imports aside): the data flow from
  config to served prediction goes one way.
- Routing and admission each have one module a reader can name.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dlpipe"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The top-level package (or module) a module belongs to: `dlpipe.serving`, `dlpipe.cli`."""
    return ".".join(module.split(".")[:2])


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(n) for n in ast.walk(node))
    return inside


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own(value: ast.expr) -> bool:
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls")
    return isinstance(value, ast.Call) and ast.unparse(value.func) == "super"


def _private_access(node: ast.AST) -> bool:
    """`obj._name` or `getattr(obj, "_name")` on something that is not `self`/`cls`/`super()`."""
    if isinstance(node, ast.Attribute):
        return _is_private(node.attr) and not _own(node.value)
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "setattr", "hasattr"):
        args = node.args
        return (
            len(args) >= 2
            and isinstance(args[1], ast.Constant)
            and isinstance(args[1].value, str)
            and _is_private(args[1].value)
            and not _own(args[0])
        )
    return False


def _scan() -> tuple[list[str], dict[str, set[str]]]:
    private: list[str] = []
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text())
        typing_only = _type_checking_nodes(tree)
        where = f"{path.relative_to(SRC.parent)}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dlpipe"):
                assert node.module is not None
                for alias in node.names:
                    if _is_private(alias.name):
                        private.append(
                            f"{where}:{node.lineno}: from {node.module} import {alias.name}"
                        )
                if id(node) not in typing_only:
                    edges[_unit(module)].add(_unit(node.module))
            elif isinstance(node, ast.Import) and id(node) not in typing_only:
                for alias in node.names:
                    if alias.name.startswith("dlpipe"):
                        edges[_unit(module)].add(_unit(alias.name))
            elif _private_access(node):
                private.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    for unit, targets in edges.items():
        targets.discard(unit)
    return private, edges


def test_no_module_reaches_into_another_modules_private_names() -> None:
    private, _ = _scan()
    assert private == []


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_no_import_cycles_between_packages() -> None:
    _, edges = _scan()
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])
    # The ends of the data flow stay ends: the schema and the routing rules depend on no stage.
    assert edges.get("dlpipe.config", set()) <= {"dlpipe.models"}
    assert edges.get("dlpipe.routing", set()) == set()
    assert "dlpipe.serving" not in set().union(*edges.values())  # nothing depends on the server


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    ("concern", "module", "owns"),
    [
        ("routing", "routing", ("RoutingCache", "RoutingPlan", "RoutingSignal", "choose_version")),
        ("admission", "serving/admission.py", ("Admission", "check_queue", "LoopLagMonitor")),
    ],
)
def test_each_concern_has_one_home(concern: str, module: str, owns: tuple[str, ...]) -> None:
    defined: dict[str, list[str]] = defaultdict(list)
    for path in SRC.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef):
                defined[node.name].append(str(path.relative_to(SRC)))
    for name in owns:
        assert len(defined[name]) == 1 and defined[name][0].startswith(module), (
            name,
            defined[name],
        )
