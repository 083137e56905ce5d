"""The package's shape: stage packages that import one way only, no import circles, pytest only in ``plugin/``.

The stages, in the order they may import each other (a module imports its own stage or earlier ones):
``io`` → ``capture`` → ``zoo`` → ``training`` → ``profiling`` → ``judging`` → ``cache`` → ``report`` →
``plugin``. The top-level entry points (``__init__``, ``__main__``, ``train``) may import any stage.
See docs/architecture.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "pytest_ditredundancy"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
STAGES = ("io", "capture", "zoo", "training", "profiling", "judging", "cache", "report", "plugin")
ENTRY_POINTS = {PACKAGE, f"{PACKAGE}.__main__", f"{PACKAGE}.train"}
#: the most modules the package may hold at its top level (entry points and the shared file helpers)
TOP_LEVEL = {"__init__.py", "__main__.py", "io.py", "train.py"}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every module of the package under ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package modules ``name`` imports (anywhere in the file, type-checking blocks excepted) -> line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def stage_of(module: str) -> int | None:
    parts = module.split(".")
    if module in ENTRY_POINTS or len(parts) < 2:
        return None
    return STAGES.index(parts[1]) if parts[1] in STAGES else None


def layering_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        here = stage_of(module)
        if here is None:
            continue
        for target, line in targets.items():
            there = stage_of(target)
            if target in ENTRY_POINTS and module != PACKAGE:
                problems.append(f"{module}:{line} imports the entry point {target}")
            elif there is not None and there > here:
                problems.append(f"{module}:{line} imports {target}, a later stage ({STAGES[here]} -> {STAGES[there]})")
    return problems


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every import circle (one per strongly connected component of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def pytest_importers(root: Path = ROOT) -> list[str]:
    """Modules outside ``plugin/`` that import pytest anywhere."""
    found = []
    for name, path in module_files(root).items():
        if name.startswith(f"{PACKAGE}.plugin"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n.split(".")[0] in ("pytest", "_pytest") for n in names):
                found.append(f"{name}:{node.lineno}")
    return found


# -- the checks must fail on a bad tree --------------------------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_find_a_circle_a_climb_and_pytest_in_the_core(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "", "zoo/__init__.py": "", "capture/__init__.py": "",
        "zoo/a.py": "def f():\n    from . import b\n",  # a lazy import still closes the circle
        "zoo/b.py": "from .a import f\n",
        "capture/hooks.py": "from ..zoo import a\nimport pytest\n",
    })
    graph = import_graph(root)
    assert cycles(graph) == [[f"{PACKAGE}.zoo.a", f"{PACKAGE}.zoo.b"]]
    assert layering_violations(graph) == [f"{PACKAGE}.capture.hooks:1 imports {PACKAGE}.zoo.a, a later stage "
                                          "(capture -> zoo)"]
    assert pytest_importers(root) == [f"{PACKAGE}.capture.hooks:2"]


# -- the package -------------------------------------------------------------------------------------------------
def test_the_top_level_holds_entry_points_only():
    assert {p.name for p in ROOT.glob("*.py")} <= TOP_LEVEL
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(STAGES) - {"io"}


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_imports_go_one_way_through_the_stages():
    assert layering_violations(import_graph()) == []


def test_only_the_plugin_imports_pytest():
    assert pytest_importers() == []


def test_every_core_module_imports_with_pytest_unimportable():
    """Not only no ``import pytest`` in the text: nothing the core imports pulls pytest in either."""
    core = sorted(name for name in module_files() if not name.startswith(f"{PACKAGE}.plugin"))
    script = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pytest', '_pytest'):\n"
        "            raise ImportError(f'pytest is not importable here ({name})')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=ROOT.parent)
    assert result.returncode == 0, result.stderr[-3000:]


def protocol_name_comparisons(path: Path, names: tuple[str, ...] = ("project", "paper")) -> list[int]:
    """Lines of ``path`` that compare something with a protocol's name (``protocol == "paper"``, ``in (...)``)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            constants = [c for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
            if any(c.value in names for c in constants):
                lines.append(node.lineno)
    return lines


def test_the_name_check_finds_a_comparison(tmp_path):
    path = tmp_path / "runner.py"
    path.write_text('"""protocol="paper" in a docstring is fine"""\nif protocol == "paper":\n    pass\n'
                    'if name in ("paper", "x"):\n    pass\n')
    assert protocol_name_comparisons(path) == [2, 4]


@pytest.mark.parametrize("module", ["profiling.runner", "profiling.settings", "plugin.session", "plugin.options",
                                    "plugin.checks", "plugin.cache_gate", "judging.suites", "plugin.merge"])
def test_nothing_that_runs_a_protocol_compares_its_name(module):
    """Protocols are objects (profiling/protocols.py): the code that runs them asks them, never compares names."""
    assert protocol_name_comparisons(module_files()[f"{PACKAGE}.{module}"]) == []


def test_every_public_name_resolves():
    import pytest_ditredundancy

    missing = [name for name in pytest_ditredundancy.__all__ if getattr(pytest_ditredundancy, name, None) is None]
    assert missing == []
