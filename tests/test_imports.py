"""The package's imports run one way, entry points -> stages -> models, diffusion and
metrics: no module imports one that imports it back, directly or through others."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ldm_jax"


def import_graph() -> dict[str, set[str]]:
    """{module: the ldm_jax modules it imports anywhere in its file, lazy imports included}."""
    names = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ldm_jax"):
                sub = node.module.split(".")[1:]
                deps |= {sub[0]} if sub else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level:  # from . import x
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ldm_jax.")}
        graph[path.stem] = (deps & names) - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_low_modules_import_no_entry_point():
    graph = import_graph()
    entry_points = {"train", "sample", "evaluate", "pipeline", "benchmark"}
    for low in ("nets", "diffusion", "metrics", "data"):
        assert not graph[low] & entry_points, f"{low} imports {graph[low] & entry_points}"
