"""The project's house: the four commands on top and nothing else; the library in training/, deploy/,
model/, lora/ and data/; imports flowing down (commands -> training/, deploy/ -> model/, lora/,
data/), with model/ importing nothing of ours, lora/ and data/ never each other, deploy/ never
training/, no command another command; nothing importing in a circle (a function-level import
counts: it is a cycle deferred, not removed); at run time nothing importing transformers, peft or
trl, which are references for tests and benchmarks only; and files and functions short enough to
read (no library file over 500 lines, no function over 60).
"""

import ast
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = ("training", "deploy", "model", "lora", "data")
COMMANDS = ("train", "chat", "merge", "demo")
# What each package may import of ours (besides itself): the layers, top to bottom.
MAY_IMPORT = {"training": {"model", "lora", "data"}, "deploy": {"model", "lora", "data"},
              "lora": {"model"}, "data": {"model"}, "model": set()}
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


def test_the_top_holds_the_commands_alone():
    assert sorted(p.stem for p in ROOT.glob("*.py")) == sorted(COMMANDS)
    assert all((ROOT / pkg / "__init__.py").is_file() for pkg in PACKAGES)  # each a package, with its docstring
    assert not (set(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
                - set(PACKAGES))


def test_the_layers_import_one_way():
    edges, _ = graph()
    top = lambda m: m.split(".")[0]
    for name, deps in edges.items():
        others = {top(d) for d in deps} - {top(name)}
        if top(name) in COMMANDS:
            assert not others & set(COMMANDS), f"{name} imports another command: {sorted(others)}"
        else:
            assert others <= MAY_IMPORT[top(name)], f"{name} imports {sorted(others - MAY_IMPORT[top(name)])}"


def test_no_reference_library_at_run_time():
    _, outside = graph()
    for name, libs in outside.items():
        assert not libs & set(REFERENCES), f"{name} imports {sorted(libs & set(REFERENCES))}"


def test_the_graph_sees_imports():
    """The checks above would pass on an empty graph: the known edges must be there."""
    edges, outside = graph()
    assert "model.llama" in edges["model.load"] and "model.files" in edges["model.gguf"]
    assert "lora.fused" in edges["lora.layer"] and "model.fused" in edges["lora.layer"]
    assert {"training.loop", "training.flags", "training.sweep"} <= edges["train"]
    assert {"model.gguf", "data.chat_template", "deploy.ollama"} <= edges["deploy.gguf"]
    assert {"training.parallel", "training.run_dir"} <= edges["training.loop"]  # relative imports
    assert "model.gguf" in edges["model.load"]  # a function-level import counts
    assert "safetensors" in outside["model.files"] and "jinja2" in outside["data.chat_template"]
    assert sys.modules  # (conftest put ROOT on sys.path)


def test_files_and_functions_read_in_a_sitting():
    """No library or command file over 500 lines, no function over 60 (benchmarks included), and
    the loop of run_training fits a screen (60 lines)."""
    files = {**our_modules(), **{f"bench.{p.stem}": p for p in (ROOT / "bench").glob("*.py")}}
    long_files, long_functions = {}, {}
    for name, path in files.items():
        text = path.read_text()
        if text.count("\n") > 500:
            long_files[name] = text.count("\n")
        for f in ast.walk(ast.parse(text)):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 60:
                long_functions[f"{name}.{f.name}"] = f.end_lineno - f.lineno + 1
    assert len(files) > 50
    assert not long_files, f"files over 500 lines: {long_files}"
    assert not long_functions, f"functions over 60 lines: {long_functions}"
    tree = ast.parse((ROOT / "training" / "loop.py").read_text())
    run_training = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "run_training")
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
