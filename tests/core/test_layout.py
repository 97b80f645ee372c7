"""The house's layout holds: the package import graph has no cycle, no module imports one of ours
inside a function, every module imports on its own (first, in a fresh interpreter's view of our
packages), and everything a plugin author needs comes from ``rlhf_core`` alone."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: import name -> folder (pyproject's package-dir)
PACKAGES = {"rlhf_core": ROOT / "rlhf_core", "rlhf_plugins": ROOT / "plugins", "rlhf_kernels": ROOT / "kernels",
            "rlhf_bench": ROOT / "benchmarks"}
#: Imports inside functions that load an optional backend on first use (the C++ extension may not be
#: built, triton may be missing or broken): the dispatcher reports why and falls back.
LAZY_BACKENDS = {("rlhf_kernels", "rlhf_kernels.triton.ops"), ("rlhf_kernels", "rlhf_kernels.cpp")}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            if any(part in ("csrc", "build") or part.endswith(".egg-info") for part in path.parts):
                continue
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], list[tuple[str, int]]]:
    """``(module-level imports of our modules, [(module imported inside a function, line)])``;
    imports under ``if TYPE_CHECKING:`` are annotations only and left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    top, inner = set(), []

    def resolve(node: ast.ImportFrom | ast.Import) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
            if node.level else node.module
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in resolve(node):
                if target.split(".")[0] in PACKAGES:
                    (inner.append((target, node.lineno)) if in_function else top.add(target))
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return {t for t in top if t in known and t != name}, inner


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def test_the_tarjan_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_import_graph_has_no_cycle_and_no_import_inside_a_function():
    known = modules()
    assert "rlhf_core.runtime.pipeline" in known and "rlhf_plugins.ppo.run" in known
    graph, inner = {}, []
    for name, path in known.items():
        graph[name], found = imports(name, path, known)
        inner += [(name, target, line) for target, line in found if (name, target) not in LAZY_BACKENDS]
    assert cycles(graph) == []
    # benchmarks' worker processes import what they measure inside the worker on purpose
    assert [i for i in inner if not i[0].startswith("rlhf_bench")] == []


def test_the_engine_never_imports_a_plugin():
    """Arrows point down: rlhf_core knows contracts, not the built-in plugins or the benchmarks."""
    known = modules()
    for name, path in known.items():
        if name.startswith("rlhf_core"):
            reached = imports(name, path, known)[0]
            assert not [t for t in reached if t.startswith(("rlhf_plugins", "rlhf_bench"))], name


def test_every_module_imports_on_its_own():
    """Each of our modules imported first, with none of our other modules loaded before it (a
    cycle or an import-order dependency fails here). One interpreter: torch and transformers stay
    loaded, our packages are dropped from ``sys.modules`` before each import."""
    names = [n for n in modules() if not n.startswith("rlhf_bench")]
    script = (
        "import importlib, json, sys\n"
        "ours = ('rlhf_core', 'rlhf_plugins', 'rlhf_kernels', 'kernels')\n"
        "import torch, transformers\n"
        "failed = {}\n"
        f"for name in {names!r}:\n"
        "    for key in [k for k in sys.modules if k.split('.')[0] in ours]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed[name] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(failed))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}
    assert len(names) > 50


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("rlhf-*/rlhf_*/*.py")), ids=lambda p: p.name)
def test_the_example_plugins_import_from_rlhf_core_alone(path):
    """A third-party component or stage needs nothing of rlhf but ``rlhf_core`` (and the kernels)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    ours = sorted({node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                   and node.module.split(".")[0] in PACKAGES} |
                  {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
                   if a.name.split(".")[0] in PACKAGES})
    assert set(ours) <= {"rlhf_core", "rlhf_kernels"}, ours


def test_the_plugin_api_is_one_namespace():
    """Every name in ``rlhf_core.__all__`` exists and is documented; the contracts, the stage base
    class and the data types are there, and the deprecated ``rlhf_core.interfaces`` forwards to
    them with a warning naming the new import."""
    import rlhf_core

    for name in rlhf_core.__all__:
        obj = getattr(rlhf_core, name)
        if callable(obj) and not name.isupper():
            assert getattr(obj, "__doc__", None), name
    for name in ("Stage", "StageContext", "StageResult", "StageInput", "Uses", "Reward", "PolicyLoss",
                 "PolicyLossInputs", "AdvantageEstimator", "AdvantageInputs", "Generator", "TrackerBackend",
                 "Rollout", "Trainer", "OptimizerStep", "hookimpl", "UserError", "StageError", "ComponentError"):
        assert name in rlhf_core.__all__, name
    import rlhf_core.interfaces as old

    with pytest.warns(DeprecationWarning, match="use 'from rlhf_core import StageResult'"):
        assert old.StageResult is rlhf_core.StageResult
    with pytest.raises(AttributeError):
        old.NotAName
