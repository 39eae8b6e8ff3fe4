"""The package's layers, walked from its imports: no circle, a layer imports only the ones below it, a
step imports no other step, and step files stay wiring."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cellarium_steps"

#: ground -> data/models -> transforms -> runner/outputs -> pipelines -> steps; same rank may import each other
#: except where FORBIDDEN says not
LAYER_RANK = {
    "": 0, "atomic": 0, "_batch": 0, "ontology": 0,
    "data": 1, "models": 1,
    "transforms": 2,
    "runner": 3, "outputs": 3,
    "pipelines": 4,
    "steps": 5,
}
FORBIDDEN = {("data", "models"), ("models", "data")}
#: what a step may import from steps/
STEP_SHARED = {"cellarium_steps.steps.common"}
MAX_STEP_CODE_LINES = 120
#: the command itself (option parsing, --config, provenance, exit codes), not steps
STEP_FRAMEWORK = {"__init__.py", "cli.py", "common.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every cellarium_steps module the file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cellarium_steps"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cellarium_steps"):
            found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # `from cellarium_steps.runner import X` resolves to the package; a submodule import to itself
            while imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""




def test_no_import_circle() -> None:
    graph = _graph()
    # a package's __init__ importing its own submodules is how it re-exports them, not a circle
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                circle = stack[stack.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_layers_import_only_below() -> None:
    wrong = []
    for module, targets in _graph().items():
        source = _layer(module)
        for target in targets:
            imported = _layer(target)
            if source not in LAYER_RANK or imported not in LAYER_RANK:
                wrong.append(f"{module} -> {target}: unknown layer")
            elif LAYER_RANK[imported] > LAYER_RANK[source] or (source, imported) in FORBIDDEN:
                wrong.append(f"{module} ({source}) imports {target} ({imported})")
    assert not wrong, "\n".join(sorted(wrong))


def test_steps_import_no_other_step() -> None:
    graph = _graph()
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph.items() if module.startswith("cellarium_steps.steps.")
        for target in targets
        if target.startswith("cellarium_steps.steps.") and target not in STEP_SHARED
    ]
    assert not wrong, "\n".join(wrong)


def _code_lines(path: Path) -> int:
    """Lines that are neither blank, comments, the module docstring, nor the HELP/EPILOG texts."""
    tree = ast.parse(path.read_text())
    text_lines: set[int] = set()
    for node in tree.body:
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        is_text = isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in ("HELP", "EPILOG") for t in node.targets)
        if is_docstring or is_text:
            text_lines.update(range(node.lineno, node.end_lineno + 1))
    lines = path.read_text().splitlines()
    return sum(1 for i, line in enumerate(lines, 1)
               if i not in text_lines and line.strip() and not line.strip().startswith("#"))


def test_step_files_are_wiring() -> None:
    step_files = [p for p in (PACKAGE / "steps").glob("*.py") if p.name not in STEP_FRAMEWORK]
    counts = {p.name: _code_lines(p) for p in step_files}
    too_long = {name: n for name, n in counts.items() if n > MAX_STEP_CODE_LINES}
    assert not too_long, f"step files over {MAX_STEP_CODE_LINES} lines of code: {too_long}"
    run_bodies = {}
    for path in step_files:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "run":
                run_bodies[path.name] = node.end_lineno - node.lineno
    # parse -> one pipeline call -> write: a run() of more than a few lines is science in the wrong place
    assert run_bodies and max(run_bodies.values()) <= 6, run_bodies


def test_the_walk_sees_a_circle_and_an_upward_import(tmp_path: Path, monkeypatch) -> None:
    """The checks above can fail: a made-up package with a circle and a model importing a step."""
    package = tmp_path / "cellarium_steps"
    (package / "models").mkdir(parents=True)
    (package / "steps").mkdir()
    for init in (package, package / "models", package / "steps"):
        (init / "__init__.py").write_text("")
    (package / "models" / "a.py").write_text("from cellarium_steps.models.b import x\n")
    (package / "models" / "b.py").write_text("from cellarium_steps.models.a import y\n")
    (package / "models" / "c.py").write_text("def f():\n    from cellarium_steps.steps.s import z\n")
    (package / "steps" / "s.py").write_text("import cellarium_steps.steps.t\n")
    (package / "steps" / "t.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    for check, message in ((test_no_import_circle, "import circle"),
                           (test_layers_import_only_below, "(models) imports cellarium_steps.steps.s"),
                           (test_steps_import_no_other_step, "steps.s imports cellarium_steps.steps.t")):
        try:
            check()
        except AssertionError as e:
            assert message in str(e)
        else:
            raise AssertionError(f"{check.__name__} passed on a package that breaks it")


def test_no_god_files() -> None:
    """One model per file, each under ~750 lines (helpers go to private modules beside it)."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "models").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 750} == {}
