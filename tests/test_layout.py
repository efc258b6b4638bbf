"""The layout's one rule that code can break silently: imports point down, never in a circle. Entry points
(train.py, eval_gen.py, sample.py, bench.py) are imported only by experiments/ and benchmarks/; infra/ never
imports the objectives or an entry point; model.py, ift.py and generate.py import nothing of this repository."""
import ast
import glob
import os

from test_train import ROOT

ENTRY = {"train", "eval_gen", "sample", "bench"}
LEAVES = {"model", "ift", "generate"}


def import_graph():
    """{module: {modules of this repository it imports, at any depth of the file}}."""
    files = [f for f in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))
             if os.sep + "tests" + os.sep not in f and not f.endswith("__init__.py")]
    mods = {os.path.relpath(f, ROOT)[:-3].replace(os.sep, "."): f for f in files}
    graph = {}
    for m, f in mods.items():
        deps = set()
        for n in ast.walk(ast.parse(open(f).read())):
            if isinstance(n, ast.Import):
                deps |= {a.name for a in n.names if a.name in mods}
            elif isinstance(n, ast.ImportFrom) and n.module:
                deps |= {n.module} & set(mods) | {f"{n.module}.{a.name}" for a in n.names} & set(mods)
        graph[m] = deps - {m}
    return graph


def cycles(graph):
    found, state = [], {}

    def visit(u, path):
        state[u] = "open"
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v, path + [v])
        state[u] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_imports_point_down_and_never_circle():
    g = import_graph()
    assert {"train", "model", "infra.parallel", "experiments.study", "benchmarks.gpu"} <= set(g)   # the walk sees them
    assert cycles(g) == []
    for m, deps in g.items():
        if not m.startswith(("experiments.", "benchmarks.")) and m != "bench":
            assert not deps & ENTRY, f"{m} imports the entry point(s) {deps & ENTRY}"
        if m.startswith("infra."):
            assert not deps & {"train", "onpolicy", "reference", "ift", "eval_gen"}, (m, deps)
        if m in LEAVES:
            assert not deps, (m, deps)


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
