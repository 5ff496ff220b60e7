"""The package layout (docs/architecture.md): stage subpackages import only from earlier stages, and no two modules
import each other at load time. Read from the source with `ast`, so nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "caffetune"
# Lowest first: a module may import from its own layer and the layers before it.
LAYERS = ["errors", "files", "model", "data", "surgery", "transfer", "train", "report", "demo", "cli"]
# The two imports against the flow, each inside the function that needs it (docs/architecture.md says why).
EXCEPTIONS = {("caffetune.model.shapes", "caffetune.data.lmdb_reader"),
              ("caffetune.transfer.head_fit", "caffetune.train.preflight")}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "_generated" in path.parts:
            continue
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path, load_time_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if load_time_only else ast.walk(tree)
    targets = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                        for a in node.names}
    return {target for target in targets if target in MODULES}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "caffetune"


def test_stages_import_only_earlier_stages():
    upward = set()
    for module, path in MODULES.items():
        for target in _imports(path, load_time_only=False):
            source_layer, target_layer = _layer(module), _layer(target)
            if source_layer in LAYERS and target_layer in LAYERS and \
                    LAYERS.index(target_layer) > LAYERS.index(source_layer):
                upward.add((module, target))
    assert upward <= EXCEPTIONS, f"imports against the stage order: {sorted(upward - EXCEPTIONS)}"


def test_the_exceptions_are_imported_where_they_are_used_not_at_load_time():
    for module, target in EXCEPTIONS:
        if module in MODULES and target in _imports(MODULES[module], load_time_only=True):
            raise AssertionError(f"{module} imports {target} at load time")


def test_no_import_cycle_at_load_time():
    graph = {module: _imports(path, load_time_only=True) for module, path in MODULES.items()}
    state: dict[str, int] = {}          # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_every_subpackage_says_what_it_owns():
    for package in PACKAGE.iterdir():
        init = package / "__init__.py"
        if package.is_dir() and init.is_file() and package.name != "_generated":
            assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def test_each_subpackage_names_its_public_modules_and_imports_them_only_on_use():
    import subprocess
    import sys

    packages = ["model", "data", "surgery", "transfer", "train", "report", "demo"]
    for name in packages:
        init = PACKAGE / name / "__init__.py"
        public = next(node.value for node in ast.parse(init.read_text()).body if isinstance(node, ast.Assign)
                      and any(getattr(target, "id", "") == "__all__" for target in node.targets))
        for module in ast.literal_eval(public):
            assert (PACKAGE / name / f"{module}.py").is_file(), f"caffetune.{name}.__all__ names {module}"
    code = ("import sys, caffetune.train, caffetune.model; "
            "assert 'caffetune.train.runner' not in sys.modules and 'optuna' not in sys.modules; "
            "assert caffetune.train.runner.start and 'caffetune.train.runner' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
