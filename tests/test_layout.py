"""The layout of training/ and loaders/ stays as built (issue 20), read from the source with `ast`:

- no import circles among their modules (module-level imports, `if TYPE_CHECKING:` ones too);
- no imports inside functions or classes, except of optional dependencies that a function
  guards (DALI, PyAV, TensorBoard) and the command-line module's lazy imports, which keep
  `train --help` fast and DALI's source workers free of torch;
- no module above MAX_LINES lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "loaders")
MAX_LINES = 400
# Imported where they are used, by name, since not every machine has them.
OPTIONAL = ("nvidia.dali", "av", "torch.utils.tensorboard", "tensorboard")
# Modules whose every import may be lazy: the console scripts' entry module.
LAZY_MODULES = {"training.cli"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules an import statement names (for `from pkg import name`, pkg.name where that
    is a module of ours, else pkg)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
            for alias in node.names]


def imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules imported at module level, [(line, module) imported inside a def or class])."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    top, nested = set(), []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = imported_modules(child, module, is_package)
                if inside:
                    nested.extend((child.lineno, name) for name in names)
                else:
                    top.update(names)
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.ClassDef, ast.Lambda)))

    visit(tree, False)
    return top, nested


def internal_graph() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        top, _ = imports(module)
        deps = set()
        for name in top:
            # `import a.b.c` runs a, a.b and a.b.c: each is a dependency
            parts = name.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[module] = {dep for dep in deps if dep in MODULES and dep != module
                         and not module.startswith(dep + ".")}   # a package's own __init__
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_modules_are_found():
    assert "training.cli" in MODULES and "loaders.contract" in MODULES
    assert len(MODULES) > 30


def test_no_import_circles():
    cycle = find_cycle(internal_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def optional(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in OPTIONAL)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_level_imports(module):
    if module in LAZY_MODULES:
        return
    _, nested = imports(module)
    bad = [f"{MODULES[module].relative_to(ROOT)}:{line} imports {name}"
           for line, name in nested if not optional(name)]
    assert not bad, "import at module level instead:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_above_the_line_limit(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)}: {lines} lines > {MAX_LINES}"
