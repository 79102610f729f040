"""The project's import graph keeps the shape it was designed with: entry points import model, lora
and data; lora and data never import each other; model imports nothing of ours; nothing imports
in a circle (a function-level import counts: it is a cycle deferred, not removed); and at run time
nothing imports transformers, peft or trl, which are references for tests and benchmarks only.
"""

import ast
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = ("model", "lora", "data")
REFERENCES = ("transformers", "peft", "trl")


def our_modules() -> dict[str, Path]:
    """module name -> file, for the library and the entry points (not tests, not bench)."""
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).glob("*.py"):
            modules[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return modules


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """The modules of ours that `name` imports anywhere in its file, and the outside top-level names."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y, from . import y
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            subs = {f"{base}.{alias.name}" for alias in node.names} & set(modules)
            # `from . import fused` reads the submodule; `from model import load_model`, the package
            found.update(subs if len(subs) == len(node.names) else subs | {base})
    return found


def graph():
    modules = our_modules()
    edges, outside = {}, {}
    for name, path in modules.items():
        found = imports_of(name, path, modules)
        edges[name] = {m for m in found if m in modules and m != name}
        outside[name] = {m.split(".")[0] for m in found if m.split(".")[0] not in modules
                         and m.split(".")[0] not in PACKAGES}
    return edges, outside


def test_nothing_imports_in_a_circle():
    edges, _ = graph()
    # A package's __init__ re-exports its modules; a module importing its own package's __init__
    # would close a circle through it, so those edges count as they are.
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_layers_import_one_way():
    edges, _ = graph()
    top = lambda m: m.split(".")[0]
    for name, deps in edges.items():
        if top(name) == "model":
            assert all(top(d) == "model" for d in deps), f"{name} imports {sorted(deps)}: model imports nothing of ours"
        if top(name) in ("lora", "data"):
            other = {"lora": "data", "data": "lora"}[top(name)]
            assert not any(top(d) == other for d in deps), f"{name} imports {other}"
            assert all(top(d) in PACKAGES for d in deps), f"{name} imports an entry point: {sorted(deps)}"


def test_no_reference_library_at_run_time():
    _, outside = graph()
    for name, libs in outside.items():
        assert not libs & set(REFERENCES), f"{name} imports {sorted(libs & set(REFERENCES))}"


def test_the_graph_sees_imports():
    """The checks above would pass on an empty graph: the known edges must be there."""
    edges, outside = graph()
    assert "model.llama" in edges["model.load"] and "model.files" in edges["model.gguf"]
    assert "lora.fused" in edges["lora.layer"] and "model.fused" in edges["lora.layer"]
    assert {"model", "lora", "data", "settings"} <= edges["train"]
    assert "model.gguf" in edges["model.load"]  # a function-level import counts
    assert "safetensors" in outside["model.files"] and "jinja2" in outside["model.chat_template"]
    assert sys.modules  # (conftest put ROOT on sys.path)


def test_train_reads_in_one_screen_per_function():
    """train.py: no function over 80 lines, and the loop of run_training fits a screen (60 lines)."""
    tree = ast.parse((ROOT / "train.py").read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert len(functions) > 20
    long = {f.name: f.end_lineno - f.lineno + 1 for f in functions if f.end_lineno - f.lineno + 1 > 80}
    assert not long, f"functions over 80 lines: {long}"
    run_training = next(f for f in functions if f.name == "run_training")
    loop = next(n for n in ast.walk(run_training) if isinstance(n, ast.While))
    assert loop.end_lineno - loop.lineno + 1 <= 60


def test_one_ignore_index():
    """-100 is written once, as model.loss.IGNORE_INDEX; everything else names it."""
    bare = []
    for name, path in our_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                    and isinstance(node.operand, ast.Constant) and node.operand.value == 100):
                bare.append(f"{name}:{node.lineno}")
    assert len(bare) == 1 and bare[0].startswith("model.loss:"), bare
