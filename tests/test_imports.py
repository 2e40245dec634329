"""Every module of the package imports on its own, and no two modules import each other at import
time (top-level imports only: an import inside a function runs later and cannot cycle at load)."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

PACKAGE = REPO / "evfsam_lightning"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        tree = ast.parse(path.read_text(), str(path))
        tree.is_package = is_package  # type: ignore[attr-defined]
        out[name] = tree
    return out


def _top_level_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules `name` imports when it is loaded (module body, `if`/`try` blocks included;
    `if TYPE_CHECKING:` left out)."""
    package = name if tree.is_package else name.rpartition(".")[0]  # type: ignore[attr-defined]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return {m for m in found if m in known and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycle_between_package_modules():
    modules = _modules()
    graph = {name: _top_level_imports(name, tree, set(modules)) for name, tree in modules.items()}
    assert graph["evfsam_lightning.training.module"], "the import walk found nothing: it is broken"
    assert _cycles(graph) == []


# Load-time imports go down this list only (README "Layout"); a module may import its own layer.
LAYERS = {"config": 0, "hub": 0, "data": 1, "models": 2, "training": 3, "deploy": 3, "testing": 3, "cli": 4}
ALLOWED_UPWARD = {("evfsam_lightning.models.parity", "evfsam_lightning.training.losses")}  # the fixture's loss


def test_imports_go_down_the_layers():
    modules = _modules()
    layer = {name: LAYERS.get(name.split(".")[1] if "." in name else "config", 0) for name in modules}
    upward = sorted((name, dep) for name, tree in modules.items() for dep in _top_level_imports(name, tree, set(modules))
                    if layer[dep] > layer[name] and (name, dep) not in ALLOWED_UPWARD)
    assert upward == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports_on_its_own():
    """One subprocess; before each module, every evfsam_lightning module is dropped from sys.modules,
    so each import starts from nothing of ours (third-party packages stay loaded: they are not ours
    to check, and reloading torch per module would take minutes)."""
    names = sorted(_modules())
    script = (
        "import importlib, sys, traceback\n"
        f"failed = []\nfor name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'evfsam_lightning' or m.startswith('evfsam_lightning.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception:\n        failed.append(name + ': ' + traceback.format_exc().splitlines()[-1])\n"
        "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
