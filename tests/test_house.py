"""House rules of the code base (docs/architecture.md): no function in capsctl/ is 100 lines or
longer; no import circle among capsctl's modules, counting every import (those inside functions
too: a circle closed only at call time is still a circle of the design); the config core and
the registries load without torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "capsctl"
MAX_LINES = 100  # a function spans fewer lines than this, decorators not counted
TORCH_FREE = ["capsctl.config", "capsctl.models", "capsctl.models.registry",
              "capsctl.data.registry", "capsctl.migrate", "capsctl.tasks", "capsctl.lazy",
              "capsctl.runfolder"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def long_functions() -> list[str]:
    found = []
    for name, path in SOURCES.items():
        for node in ast.walk(parsed(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= MAX_LINES:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    return found


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def top_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported: the module body, and blocks of
    if / try / with / class at that level (not function bodies, not ``if TYPE_CHECKING``)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                stack += node.body
            stack += node.orelse
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            stack += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                stack += handler.body
        elif isinstance(node, (ast.With, ast.ClassDef)):
            stack += node.body


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def every_import(tree: ast.Module):
    """Every import statement of the module, wherever it stands (module body, functions,
    methods, ``if TYPE_CHECKING`` blocks): what the module may ever import."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def imports_of(module: str, at_import_time: bool = False) -> set[str]:
    """The capsctl modules ``module`` imports (``at_import_time``: only those its body imports
    when it is loaded): ``import a.b`` -> a.b; ``from a import b`` -> a.b when that is a module,
    else a."""
    path = SOURCES[module]
    edges = set()
    tree = parsed(path)
    for node in top_level_imports(tree) if at_import_time else every_import(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = _resolve(module, node, path.name == "__init__.py")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base
                       for a in node.names]
        edges |= {t for t in targets if t in SOURCES}
    return edges


def import_graph(at_import_time: bool = False) -> dict[str, set[str]]:
    return {m: imports_of(m, at_import_time) for m in SOURCES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with a circle in it (Tarjan), each as one circle
    through its members, starting at the smallest name."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the module count
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(_circle(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _circle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest path from the smallest member back to itself inside the component."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return [start]


# --- the checker checks -------------------------------------------------------------------

def test_cycle_finder_finds_long_circles_and_self_loops():
    g = {"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"b"}, "e": {"e"}, "f": {"a"}}
    assert cycles(g) == [["b", "c", "d", "b"], ["e", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_the_package_layout():
    graph = import_graph()
    assert len(SOURCES) > 30
    assert "capsctl.models.registry" in graph["capsctl.config"]
    assert "capsctl.cli.options" in graph["capsctl.cli.config"]
    assert "capsctl.errors" in graph["capsctl.fields"]


def test_imports_inside_functions_count_for_circles_not_for_import_time():
    tree = ast.parse("import os\nif TYPE_CHECKING:\n    import torch\ntry:\n    import json\n"
                     "except ImportError:\n    import simplejson\n"
                     "def f():\n    import capsctl.train\n"
                     "class C:\n    def g(self):\n        from capsctl import evaluate\n")
    names = sorted(a.name for n in top_level_imports(tree) for a in n.names)
    assert names == ["json", "os", "simplejson"]
    every = sorted(a.name for n in every_import(tree) for a in n.names)
    assert every == ["capsctl.train", "evaluate", "json", "os", "simplejson", "torch"]


def test_an_import_inside_a_function_is_an_edge_of_the_graph():
    graph = import_graph()
    # capsctl.data.registry reads a folder's classes through a function-level import (before
    # the layers were fixed, such edges closed a 13-module circle through checkpoint.py)
    assert "capsctl.data.folder" in graph["capsctl.data.registry"]
    assert "capsctl.data.folder" not in import_graph(at_import_time=True)["capsctl.data.registry"]


# --- the rules ----------------------------------------------------------------------------

def test_no_function_is_100_lines_or_longer():
    found = long_functions()
    assert not found, "split these functions: " + "; ".join(found)


def test_no_import_circle_among_capsctl_modules_counting_imports_inside_functions():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_layers_run_one_way():
    """Training calls the data's Task (capsctl/tasks), measure.py and confusion.py, never
    `capsctl eval`'s module or the inspection commands; data knows no model; the tasks know
    neither data nor models nor training."""
    wrong = []
    for module, edges in import_graph().items():
        for edge in sorted(edges):
            if (module.startswith("capsctl.training") and (
                    edge == "capsctl.evaluate" or edge.startswith("capsctl.inspection"))
                    or module.startswith("capsctl.data") and edge.startswith("capsctl.models")
                    or module.startswith("capsctl.tasks") and edge.split(".")[1] in (
                        "data", "models", "training", "evaluate", "measure")):
                wrong.append(f"{module} -> {edge}")
    assert not wrong, "imports against the layers: " + "; ".join(wrong)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_config_core_and_registries_do_not_import_torch(module):
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    torch_modules = json.loads(r.stdout.strip().splitlines()[-1])
    assert torch_modules == [], f"importing {module} imports torch"


def test_no_module_or_package_is_named_like_a_standard_library_module():
    """`capsctl/inspect/` once shadowed the standard library's `inspect` (now capsctl.inspection),
    `capsctl/profile.py` its `profile` (now capsctl.step_profile)."""
    named = {name for name in SOURCES if name.split(".")[-1] in sys.stdlib_module_names}
    assert not named, f"rename: {sorted(named)}"


RUN_FOLDER_NAMES = {"checkpoints", "last.pt", "best.pt", "config.yaml", "metrics.jsonl", "tb",
                    ".lock"}
RUN_FOLDER_OWNER = "capsctl.runfolder"


def _spells_a_run_folder_name(text: str) -> bool:
    """A string that names a run folder's file as a path: the name itself, or a path ending
    in or starting with it (prose, with spaces, only mentions it)."""
    return not any(c.isspace() for c in text) and any(
        text == n or text.endswith("/" + n) or text.startswith(n + "/") for n in RUN_FOLDER_NAMES)


def test_the_run_folder_file_names_are_spelled_in_one_module():
    """capsctl/runfolder.py (RunFolder) owns last.pt, best.pt, config.yaml, metrics.jsonl, tb/,
    .lock and checkpoints/; every other module asks it (a JSON key is no file name)."""
    found = []
    for name, path in SOURCES.items():
        if name == RUN_FOLDER_OWNER:
            continue
        tree = parsed(path)
        dict_keys = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict)
                     for k in node.keys if k is not None}
        found += [f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in dict_keys and _spells_a_run_folder_name(node.value)]
    assert not found, "ask capsctl.runfolder.RunFolder instead: " + "; ".join(found)


def test_every_config_section_class_is_named_config():
    """One suffix: the dataclass of a config section (model family, loss, dataset, routing,
    optimizer, trainer) is ``<Name>Config`` (checkpoints and YAML hold dicts: only these Python
    names changed from ``<Name>Options``)."""
    from capsctl.config import OptimConfig, TrainConfig
    from capsctl.data.registry import DATASETS
    from capsctl.models.registry import MODELS
    from capsctl.models.routing import ROUTINGS

    classes = {OptimConfig, TrainConfig}
    classes |= {c for s in MODELS.values() for c in (s.config, s.loss_config)}
    classes |= {s.options for s in DATASETS.values() if s.options is not None}
    classes |= {s.options for s in ROUTINGS.values()}
    wrong = sorted(c.__name__ for c in classes if not c.__name__.endswith("Config"))
    assert not wrong, f"name these <Name>Config: {wrong}"
