"""The package's shape: no import cycle (imports inside functions included), intra-package imports at module
top, subpackages import only downward, no module imports another's private names, no function over 60 lines,
and importing the package changes nothing in transformers."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mosa_retrofit"


def _graph() -> tuple[dict[str, set[str]], dict[str, list[int]]]:
    modules, inner = {}, {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_init else parts)
        tree = ast.parse(f.read_text())
        deps, nested = set(), []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = name.split(".") if is_init else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                targets = [node.module] if node.module else [a.name for a in node.names]
                deps |= {".".join(base + [t]) for t in targets}
                if node not in tree.body:
                    nested.append(node.lineno)
        modules[name], inner[name] = deps, nested
    return {m: {d for d in deps if d in modules} for m, deps in modules.items()}, inner


def test_no_import_cycle_and_imports_at_module_top():
    graph, inner = _graph()
    assert {m: lines for m, lines in inner.items() if lines} == {}
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = "open"
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [u, v] if v in stack else [u, v])
            elif v not in state:
                visit(v, stack + [u])
        state[u] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert cycles == []


# Subpackages from the bottom up: a module imports from its own subpackage or from a lower layer, never upward.
LAYERS = [{"validate", "atomic", "kinds"}, {"ops", "text"}, {"layers"}, {"convert"}, {"eval"}, {"train"}, {"study", "bench"}, {"cli"}]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None  # the package's __init__ re-exports the public API from every layer; __main__ runs the CLI
    return next(i for i, names in enumerate(LAYERS) if parts[1] in names)


def test_subpackages_import_only_downward():
    graph, _ = _graph()
    assert {_layer(m) for m in graph if _layer(m) is not None} == set(range(len(LAYERS) - 1))  # cli is not here
    upward = sorted((m, d) for m, deps in graph.items() for d in deps
                    if _layer(m) is not None and m.split(".")[1] != d.split(".")[1] and _layer(d) >= _layer(m))
    assert upward == []


def test_the_config_is_a_leaf():
    """MoSAConfig validates against the kinds' published declarations (kinds.py), importing no kernel: nothing it
    reaches, directly or not, is a head kind or an op."""
    graph, _ = _graph()
    reached, todo = set(), ["mosa_retrofit.convert.config"]
    while todo:
        for d in graph[todo.pop()] - reached:
            reached.add(d)
            todo.append(d)
    assert reached == {"mosa_retrofit.kinds"}


def test_the_longest_import_chain_is_at_most_10_modules():
    """A set of rooms, not a deep stack: the longest chain of module imports in the package (package __init__
    files included, function-level imports too: there are none) is at most 10 modules."""
    graph, _ = _graph()
    longest: dict[str, list[str]] = {}

    def chain(m: str) -> list[str]:
        if m not in longest:
            longest[m] = [m] + max((chain(d) for d in graph[m]), key=len, default=[])
        return longest[m]

    worst = max((chain(m) for m in graph), key=len)
    assert len(worst) <= 10, " -> ".join(worst)


def test_the_kv_stores_hold_tensors_and_compute_no_attention():
    """The sparse KV stores (convert/cache.py, window_store.py) import no attention op: the heads' attention
    (ops/sparse.py, ops/keys.py) reads them, once for cached and full forwards alike."""
    graph, _ = _graph()
    for store in ("mosa_retrofit.convert.cache", "mosa_retrofit.convert.window_store"):
        ops = {d for d in graph[store] if d.startswith("mosa_retrofit.ops")}
        assert ops <= {"mosa_retrofit.ops.routing"}, (store, ops)


def test_no_module_imports_private_names_of_another():
    found = []
    for f in list(PACKAGE.rglob("*.py")) + list((PACKAGE.parent / "cli").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                found += [f"{f.name}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_no_function_is_longer_than_60_lines():
    """Small units: every function of the package and the CLI, docstring included, fits on a screen."""
    long = []
    for f in list(PACKAGE.rglob("*.py")) + list((PACKAGE.parent / "cli").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                long += [f"{f.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)"] if n > 60 else []
    assert long == []


def test_importing_the_package_patches_nothing_in_transformers():
    code = ("import transformers; before = dict(vars(transformers.PreTrainedModel)); import mosa_retrofit; "
            "after = vars(transformers.PreTrainedModel); "
            "assert all(after[k] is v for k, v in before.items()) and set(after) == set(before)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
