"""The package's shape: no import cycle (imports inside functions included), intra-package imports at module
top, and importing it changes nothing in transformers."""

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


def test_importing_the_package_patches_nothing_in_transformers():
    code = ("import transformers; before = dict(vars(transformers.PreTrainedModel)); import mosa_retrofit; "
            "after = vars(transformers.PreTrainedModel); "
            "assert all(after[k] is v for k, v in before.items()) and set(after) == set(before)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
