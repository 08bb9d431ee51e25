"""The shape of the code itself: fastgpt's modules import each other without a cycle (counting
the imports inside functions too, which would otherwise hide one), and stay small enough to
read: no module over 500 lines, no function over 60."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fastgpt", "kernels", "benchmarks")
# The wheel installs kernels/ and benchmarks/ as fastgpt.kernels and fastgpt.benchmarks (and a
# checkout maps those names onto the folders, fastgpt/__init__.py): one module, two names.
ALIASES = {"fastgpt.kernels": "kernels", "fastgpt.benchmarks": "benchmarks"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
    }


def canonical(name: str) -> str:
    """The folder name of a module: "fastgpt.kernels.activation" -> "kernels.activation"."""
    for alias, folder in ALIASES.items():
        if name == alias or name.startswith(alias + "."):
            return folder + name[len(alias) :]
    return name


def _imported_names(node: ast.AST, package: str, known: set[str]) -> list[str]:
    """The modules one AST node imports ([] for a node that imports nothing); `package` is
    the package a relative import starts from."""
    if isinstance(node, ast.Import):
        return [canonical(alias.name) for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # `from . import x` in kernels/activation.py: x of kernels
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, node.module or ""]).strip(".")
        else:
            base = node.module or ""
        base = canonical(base)
        # `from fastgpt import weights` imports the module fastgpt.weights; `from fastgpt.model
        # import GPTModel` the module fastgpt.model
        subs = [f"{base}.{alias.name}" for alias in node.names]
        return [sub if sub in known else base for sub in subs]
    if (  # importlib.import_module("fastgpt.kernels.activation"), a literal name
        isinstance(node, ast.Call)
        and isinstance(node.func, (ast.Attribute, ast.Name))
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [canonical(node.args[0].value)]
    return []


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (module level or inside functions):
    absolute and relative imports, under either name of kernels/ and benchmarks/, and
    `import_module` of a literal name."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        found.update(m for m in _imported_names(node, package, known) if m in known)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(path, known) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}  # "active" on the current path, "done" when finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "active"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "active":
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target, [*path, target])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "fastgpt.model" in graph and "fastgpt.weights" in graph["fastgpt.model"]
    # every kind of import is seen: relative, through fastgpt.kernels / fastgpt.benchmarks,
    # `from package import submodule`, and import_module("literal")
    assert "kernels.flash_core" in graph["kernels.flash_attention_varlen"]  # from .flash_core
    assert "kernels._dispatch" in graph["kernels.activation"]  # from ._dispatch import
    assert {"kernels.activation", "kernels.normalization"} <= graph["kernels"]  # its __init__
    assert "fastgpt.hf_format" in graph["fastgpt.lora"]  # from fastgpt import hf_format
    assert "kernels" in graph["fastgpt.hf_patch"]  # ... bias_gelu, a function of the package
    assert "benchmarks.run" in graph["fastgpt.commands.selftest"]  # fastgpt.benchmarks.run
    assert "kernels.normalization" in graph["fastgpt.selftest.compile_check"]  # import_module
    assert "fastgpt.train.runner" in graph["fastgpt.commands.pretrain"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Modules of kernels/ that hold what several ops share (their private names are meant to be
# imported); every other module of kernels/ is one op's.
SHARED_KERNEL_MODULES = {"flash_core", "__init__"}


def test_no_kernel_op_imports_another_ops_private_names():
    """One home per mechanism: what two ops share lives in a shared module (kernels/_*.py,
    flash_core.py), never in one op's file imported by another."""
    found = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 1 and node.module):
                continue
            shared = node.module.startswith("_") or node.module in SHARED_KERNEL_MODULES
            private = [a.name for a in node.names if a.name.startswith("_")]
            if not shared and private:
                found.append(f"kernels/{path.name} imports {private} from .{node.module}")
    assert found == []


def test_every_kind_of_import_is_an_edge():
    known = {"kernels", "kernels.activation", "kernels._dispatch", "fastgpt", "fastgpt.model"}
    source = """
from .. import _dispatch
from .._dispatch import use_triton
from . import helper
import fastgpt.kernels.activation as G
from fastgpt.kernels import gelu_reference
from fastgpt import model, __version__
importlib.import_module("fastgpt.kernels._dispatch")
import_module("fastgpt.model")
import_module(name)
"""
    # as if in kernels/sub/x.py
    names = [_imported_names(node, "kernels.sub", known) for node in ast.parse(source).body]
    assert names == [
        ["kernels._dispatch"], ["kernels._dispatch"], ["kernels.sub"],
        ["kernels.activation"], ["kernels"], ["fastgpt.model", "fastgpt"], [], [], [],
    ]  # fmt: skip
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)]
    assert [_imported_names(n, "kernels.sub", known) for n in calls] == [
        ["kernels._dispatch"], ["fastgpt.model"], []
    ]  # fmt: skip


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_and_functions_stay_readable():
    too_long = []
    for name, path in project_modules().items():
        if not name.startswith("fastgpt"):
            continue  # kernels/: one file per op, kernels and their launchers together
        source = path.read_text(encoding="utf-8")
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
