"""The code's shape, read from its source (nothing is imported): no import circle among the project's modules,
and no function in the data, training and command code wider than a reader can hold (8 parameters).

An import circle makes a module's behaviour depend on which side was imported first, and hides in imports
placed inside functions; a 14-parameter builder is a signature each caller must repeat. Both come back one
small edit at a time, so they are checked on every run rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_PARAMETERS = 8  # keyword-only, *args and **kwargs included; a method's self/cls not
# Where every function must stay within MAX_PARAMETERS: the packages and the entry points.
NARROW = ("datasets", "training", "commands", "train.py", "evaluate.py", "export.py", "preview.py")


def project_files() -> list[Path]:
    """Every .py of the project, not the run folders nor hidden tool folders (.git, .venv)."""
    return sorted(path for path in ROOT.rglob("*.py")
                  if not any(part.startswith(".") or part == "outputs" for part in path.relative_to(ROOT).parts))


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The project modules importing `path` runs, wherever its import statements stand (inside functions
    too): the named module and, from outside a package, the package's __init__ first."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..a import b
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    edges = set()
    for target in targets:
        parts = target.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            # A module's own packages are already being imported when it runs: no edge back to them.
            if prefix in modules and prefix != name and not (name + ".").startswith(prefix + "."):
                edges.add(prefix)
    return edges


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    modules = {module_name(path) for path in files}
    return {module_name(path): imported_modules(path, modules) for path in files}


@pytest.fixture(scope="module")
def project_graph() -> dict[str, set[str]]:
    """The project's import graph, read once for the tests that only read it (parsing every file: ~0.5 s CPU)."""
    return import_graph()


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as the list of modules around it (first repeated last), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is checked
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_training_and_data_never_import_the_commands(project_graph):
    """commands/ (evaluate, export, preview) builds on training/ and datasets/; the reverse would put them back
    into a training run's imports."""
    below = {module: targets for module, targets in project_graph.items()
             if module.partition(".")[0] in ("training", "datasets")}
    reaching_back = {module: sorted(t for t in targets if t.partition(".")[0] == "commands")
                     for module, targets in below.items()}
    assert not {module: targets for module, targets in reaching_back.items() if targets}


def parameter_count(function: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> int:
    arguments = function.args
    names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
    names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
    if in_class and names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names)


def wide_functions(path: Path, root: Path = ROOT) -> dict[str, int]:
    """`file:function` -> its parameter count, for every function in `path` wider than MAX_PARAMETERS."""
    wide = {}

    def visit(node: ast.AST, scope: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = parameter_count(child, in_class)
                if count > MAX_PARAMETERS:
                    wide[f"{path.relative_to(root).as_posix()}:{scope}{child.name}"] = count
                visit(child, f"{scope}{child.name}.", in_class=False)
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{scope}{child.name}.", in_class=True)
            else:
                visit(child, scope, in_class)

    visit(ast.parse(path.read_text(), str(path)), "", in_class=False)
    return wide


def narrow_files() -> list[Path]:
    return [path for path in project_files() if path.relative_to(ROOT).parts[0] in NARROW]


def test_no_import_cycle(project_graph):
    cycle = find_cycle(project_graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_function_takes_more_than_eight_parameters():
    wide = {}
    for path in narrow_files():
        wide.update(wide_functions(path))
    assert not wide, f"functions with more than {MAX_PARAMETERS} parameters (group them in a small object): {wide}"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The two checks on code written for them: a circle through a package's __init__ and a lazy import,
    and a wide function (self aside) next to a narrow method."""
    (tmp_path / "pkg").mkdir()
    files = {
        "pkg/__init__.py": "from pkg.runner import run\n",
        "pkg/runner.py": "import pkg.helper\n",
        "pkg/helper.py": "def go():\n    from other import thing\n",
        "other.py": "from pkg import helper\n",
        "wide.py": "def wide(a, b, c, d, e, *args, f, g, **kw): pass\n"
                   "class C:\n    def narrow(self, a, b, c, d, e, f, g, h): pass\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    paths = [tmp_path / name for name in files]
    modules = {module_name(path, tmp_path) for path in paths}
    graph = {module_name(path, tmp_path): imported_modules(path, modules, tmp_path) for path in paths}
    assert find_cycle(graph) == ["other", "pkg", "pkg.runner", "pkg.helper", "other"]
    graph["pkg.helper"] = set()
    assert find_cycle(graph) is None
    assert wide_functions(tmp_path / "wide.py", tmp_path) == {"wide.py:wide": 9}
    (tmp_path / "wide.py").write_text("class C:\n    def method(self, a, b, c, d, e, f, g, h, i): pass\n")
    assert wide_functions(tmp_path / "wide.py", tmp_path) == {"wide.py:C.method": 9}
