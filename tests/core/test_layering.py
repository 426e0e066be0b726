"""The package's layering: core (torch only) <- strategies <- backends <- harness, tools and
integrations. Nothing imports a module of a higher layer, the core and the strategies never import
transformers, and there is no import cycle.

The import graph is read from the source (every ``import`` statement, function-level ones too,
except those under ``if TYPE_CHECKING:``), so a lazy import cannot hide a back-arrow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "contrastive_decoding"
HARNESS = ROOT / "eval"  # installed as contrastive_decoding.eval

# Layer of each module, by the longest matching prefix.
LAYERS = {
    "contrastive_decoding.core": 0,
    "contrastive_decoding.strategies": 1,
    "contrastive_decoding.backends": 2,
    "contrastive_decoding.eval": 3,
    "contrastive_decoding.integrations": 3,
    "contrastive_decoding.layer_map": 3,
    "contrastive_decoding.demo": 3,
    "contrastive_decoding.lm_eval": 3,
    "contrastive_decoding.prompts": 3,
    "contrastive_decoding": 3,  # the package's lazy __init__ re-exports every layer
}
BACKEND_LIBRARIES = ("transformers", "vllm", "accelerate", "lm_eval")


def _module_name(path: Path) -> str:
    if path.is_relative_to(HARNESS):
        parts = ("contrastive_decoding", "eval", *path.relative_to(HARNESS).with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    match = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[match]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[str]:
    """Absolute names of everything the module imports (outside ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node)
        for child in node.body
        for n in ast.walk(child)
    }
    own = _module_name(path).split(".")
    package = own if path.name == "__init__.py" else own[:-1]
    names = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            # `from pkg import submodule` imports the submodule too.
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py")) + sorted(HARNESS.rglob("*.py"))
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


GRAPH = _graph()


def _internal_imports(path: Path) -> list[str]:
    return [m for m in _imports(path) if m.split(".")[0] in BACKEND_LIBRARIES]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_reaches_a_higher_layer(module):
    up = sorted(m for m in GRAPH[module] if _layer(m) > _layer(module))
    assert not up, f"{module} (layer {_layer(module)}) imports higher layers: {up}"


def test_the_library_never_imports_its_harness():
    offenders = sorted(
        (module, m)
        for module, deps in GRAPH.items()
        if not module.startswith(("contrastive_decoding.eval", "contrastive_decoding.integrations"))
        for m in deps
        if m.startswith("contrastive_decoding.eval")
    )
    assert not offenders


@pytest.mark.parametrize("folder", ["core", "strategies"])
def test_core_and_strategies_import_no_backend_library(folder):
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        assert not _internal_imports(path), f"{path.relative_to(ROOT)} imports {_internal_imports(path)}"


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                # A package's __init__ importing its own submodules is how Python packages work.
                if not all(cycle[0].startswith(c) or c.startswith(cycle[0]) for c in cycle):
                    raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_graph_reads_real_imports():
    """The checks above would pass on an empty graph: make sure they read what is there."""
    assert "contrastive_decoding.core.contract" in GRAPH["contrastive_decoding.strategies.dola"]
    assert "contrastive_decoding.backends.hf.sources" in GRAPH["contrastive_decoding.backends.hf.processor"]
    assert _layer("contrastive_decoding.backends.hf.readout") == 2


@pytest.mark.parametrize("module", ["contrastive_decoding.core", "contrastive_decoding.strategies"])
def test_importing_the_core_and_strategies_loads_no_transformers(module):
    code = (
        f"import sys, {module} as m; "
        "m.registered_strategies(); "
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('transformers', 'vllm'));"
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_backends_do_not_import_each_other():
    # Each backend consumes the same strategy declarations on its own (the vLLM one needs no
    # transformers hooks, the transformers one no vLLM).
    pairs = [
        (module, m)
        for module, deps in GRAPH.items()
        for m in deps
        for a, b in (("hf", "vllm"), ("vllm", "hf"))
        if module.startswith(f"contrastive_decoding.backends.{a}")
        and m.startswith(f"contrastive_decoding.backends.{b}")
    ]
    assert not pairs, pairs
