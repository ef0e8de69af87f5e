"""The package's imports point one way (docs/architecture.md): every import of a vlm_jax module
is at module top level, no two modules import each other even indirectly, and a package only
imports the packages below it. Function-local imports are allowed only for the slow optional
dependencies listed here. And no test module imports another (shared helpers are conftest.py
fixtures). Read from the source (ast), so nothing is imported or run."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "vlm_jax"

# What each top-level part may import (besides itself). Lower parts never import higher ones.
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "distributed": {"errors"},
    "sharding": {"config", "errors"},
    "models": {"config", "errors", "sharding"},
    "data": {"config", "errors"},
    "model_dir": {"config", "errors", "models", "data"},
    "train": {"config", "errors", "sharding", "distributed", "models", "data", "model_dir"},
    "inference": {"config", "errors", "models", "data", "model_dir"},
    "api": {"errors", "models", "data", "model_dir"},
    "eval": {"config", "errors", "models", "data", "model_dir", "inference"},
    "convert": {"config", "errors", "models", "data", "model_dir", "inference", "api"},
    "sweep": {"config", "errors", "train"},
    "cli": {"config", "errors", "distributed", "sharding", "models", "data", "model_dir", "train",
            "inference", "api", "eval", "convert", "sweep"},
}
# Imported inside functions on purpose: heavy or optional, needed by few code paths.
LAZY_OK = {"torch", "transformers", "tensorflow_datasets", "tensorflow", "safetensors",
           "sentencepiece", "jinja2", "libtpu"}
# vlm_jax/__init__.py exposes `vlm_jax.load` lazily so that `import vlm_jax.config` (what config
# files do) stays light.
LAZY_VLM_JAX_OK = {("vlm_jax", "vlm_jax.api")}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


MODULES = dict(_modules())


def _resolve(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _imports(module: str, path: pathlib.Path):
    """(imported module, lineno, at top level?) for every import in the file; `from X import Y`
    counts as importing X.Y when that is a module, else X."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, path, child)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if full in MODULES else base, child.lineno, top))
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                        ast.Lambda)))
    visit(tree, True)
    return found


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_imports_of_our_modules_are_at_top_level():
    """Function-local imports hide cycles and surprise at run time; only the listed slow
    optional dependencies may be imported inside functions."""
    lazy = []
    for module, path in MODULES.items():
        for name, line, top in _imports(module, path):
            root = name.split(".")[0]
            if top or root in LAZY_OK or (module, name) in LAZY_VLM_JAX_OK:
                continue
            if root == "vlm_jax":
                lazy.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name} in a function")
    assert not lazy, "\n".join(lazy)


def test_parts_import_only_the_parts_below_them():
    wrong = []
    for module, path in MODULES.items():
        part = _part(module)
        if not part:
            continue
        for name, line, top in _imports(module, path):
            other = _part(name) if name.startswith("vlm_jax.") else None
            if other and other != part and other not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line}: {part} imports {other}")
    assert not wrong, "\n".join(wrong)


def test_every_part_is_placed():
    parts = {_part(m) for m in MODULES if _part(m)}
    assert parts == set(ALLOWED), f"new parts need a place in ALLOWED: {parts ^ set(ALLOWED)}"


def test_no_module_import_cycles():
    graph = {m: {n for n, _, top in _imports(m, p) if top and n in MODULES and n != m}
             for m, p in MODULES.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for module in graph:
        graph[module] = {n for n in graph[module] if not (module + ".").startswith(n + ".")}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("bad", ["from vlm_jax.cli import main", "import vlm_jax.train.loop"])
def test_the_check_sees_an_upward_import(tmp_path, bad):
    """The walker itself: a models/ file importing cli or train is reported."""
    path = tmp_path / "x.py"
    path.write_text(bad + "\n")
    names = [name for name, _, _ in _imports("vlm_jax.models.x", path)]
    assert _part(names[0]) in ("cli", "train") and _part(names[0]) not in ALLOWED["models"]


def test_no_test_module_imports_another():
    """A test module importing another (or conftest.py) runs that module's imports and top-level
    code and ties the two files together; what several test files share is a conftest fixture."""
    tests = pathlib.Path(__file__).resolve().parent
    local = {path.stem for path in tests.glob("*.py")}
    wrong = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            wrong += [f"tests/{path.name}:{node.lineno} imports {name}" for name in names
                      if name.split(".")[0] in local]
    assert not wrong, "\n".join(wrong)
