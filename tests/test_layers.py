"""The import floors of src/diffuse: every import (at module level or inside a function) goes to a
module on the same floor or a lower one, and no chain of imports comes back to where it started.

A module is named by its path under src/diffuse without ".py" ("data", "export.card",
"serve.app"); a package by its folder ("export", "serve"), and the top package by "__init__".
A new module must be placed in LAYERS before this test passes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffuse"

# Floor -> the modules on it; lower floors never import higher ones.
LAYERS: dict[int, tuple[str, ...]] = {
    # no diffuse imports: errors, maths on tensors, /proc and cgroup reads, the run's log files
    0: ("version", "errors", "rng", "diffusion", "hostmem", "runlog", "budget"),
    # files and the host: atomic writes, caches, output paths, threads, image files (torch-free)
    1: ("fsutil", "outputs", "threads", "imagefiles"),
    # the config, the UNet (config only), the device (its layout probe times the UNet), checkpoints,
    # images, Inception, the denoiser interface, samplers and the on-disk image cache
    2: ("config", "models", "device", "checkpoint", "images", "inception", "denoiser", "samplers", "datacache"),
    # data sets and the batch stream, the objectives, the sampling request, the diffusers mapping and
    # card, consistency tuning's math (distill)
    3: ("data", "objectives", "sampling", "distill", "stepsearch", "export.mapping", "export.card"),
    # FID statistics (of data sets and of images)
    4: ("fid",),
    # torchrun: sharded sampling and FID statistics; a model size from a time budget (measured UNet rungs)
    5: ("distributed", "sizing"),
    # checkpoint -> images; a training run's setup and the duties between its steps
    6: ("generate", "run", "duties"),
    # what uses a trained model or trains one: training, evaluation (FID of a model), the judge,
    # visualize, `info`, export, serve's workers
    7: ("train", "searchrun", "evaluation", "classifier", "visualize", "runinfo", "export", "serve.guard", "serve.jobs"),
    # the serve app, then its entry point; a training run's config from named settings (train's flags,
    # the Python API); visualize's views as runs (a model loaded, files written)
    8: ("serve.app", "runs", "views"),
    9: ("serve",),
    # the command line
    10: ("cli", "cliflags", "__main__"),
    # the public Python API (it reads the train flags from the CLI's parser), then the package,
    # which loads it lazily
    11: ("api",),
    12: ("__init__",),
}
FLOOR = {module: floor for floor, modules in LAYERS.items() for module in modules}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(importer: Path, node: ast.ImportFrom) -> str | None:
    """The module (in our naming; "" for the top package) that ``node`` imports from, or None
    for an import from outside diffuse."""
    if node.level == 0:
        if node.module != "diffuse" and not (node.module or "").startswith("diffuse."):
            return None
        return (node.module or "").removeprefix("diffuse").lstrip(".")
    package = list(importer.relative_to(SRC).parent.parts)     # the importer's own package
    package = package[:len(package) - (node.level - 1)] if node.level > 1 else package
    return ".".join(package + ([node.module] if node.module else []))


def imports_of(path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import of a diffuse module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "diffuse" or alias.name.startswith("diffuse."):
                    found.append((alias.name.removeprefix("diffuse").lstrip(".") or "__init__", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(path, node)
            if base is None:
                continue
            for alias in node.names:                # `from . import x`: x is a module or a name in base
                sub = f"{base}.{alias.name}" if base else alias.name
                found.append((sub if sub in modules else (base or "__init__"), node.lineno))
    return found


def import_graph() -> dict[str, list[tuple[str, int, str]]]:
    """module -> [(imported module, line, source file)], self-imports left out."""
    files = {module_name(p) or "__init__": p for p in sorted(SRC.rglob("*.py"))}
    modules = set(files)
    graph: dict[str, list[tuple[str, int, str]]] = {}
    for name, path in files.items():
        rel = path.relative_to(SRC.parents[1]).as_posix()
        graph[name] = [(target, line, rel) for target, line in imports_of(path, modules) if target != name]
    return graph


def find_cycle(graph: dict[str, list[tuple[str, int, str]]]) -> list[tuple[str, str, int, str]] | None:
    """One cycle as [(importer, imported, line, file)], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}                  # 1: on the current path, 2: done
    path: list[tuple[str, str, int, str]] = []

    def visit(node: str) -> list[tuple[str, str, int, str]] | None:
        state[node] = 1
        for target, line, rel in graph.get(node, []):
            path.append((node, target, line, rel))
            if state.get(target) == 1:
                start = next(i for i, edge in enumerate(path) if edge[0] == target)
                return path[start:]
            if target not in state and (cycle := visit(target)):
                return cycle
            path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_parser_sees_every_kind_of_import(tmp_path, monkeypatch):
    """Module-level and function-level imports, `from . import x`, `from .x import y`,
    `import diffuse.x` and the relative imports of a sub-package all count."""
    pkg = tmp_path / "src" / "diffuse"
    (pkg / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "b.py", "c.py", "d.py", "sub/__init__.py", "sub/e.py"):
        (pkg / name).write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom .c import thing\n\ndef f():\n    import diffuse.d\n"
                              "    from . import __version__\n")
    (pkg / "sub" / "e.py").write_text("from ..b import x\nfrom . import something\nfrom .. import c\n")
    (pkg / "sub" / "__init__.py").write_text("from .e import y\nimport os\n")
    monkeypatch.setitem(globals(), "SRC", pkg)
    graph = import_graph()
    assert sorted(graph["a"]) == [("__init__", 6, "src/diffuse/a.py"), ("b", 1, "src/diffuse/a.py"),
                                  ("c", 2, "src/diffuse/a.py"), ("d", 5, "src/diffuse/a.py")]
    assert sorted(t for t, _, _ in graph["sub.e"]) == ["b", "c", "sub"]
    assert [t for t, _, _ in graph["sub"]] == ["sub.e"]


def test_every_module_has_a_floor():
    modules = set(import_graph())
    missing = sorted(modules - set(FLOOR))
    assert not missing, (f"place these modules in LAYERS (tests/test_layers.py): {', '.join(missing)}")
    stale = sorted(set(FLOOR) - modules)
    assert not stale, f"LAYERS names modules that no longer exist: {', '.join(stale)}"
    twice = sorted(m for m in FLOOR if sum(m in mods for mods in LAYERS.values()) > 1)
    assert not twice, f"modules on two floors: {', '.join(twice)}"


def upward_imports(graph: dict[str, list[tuple[str, int, str]]]) -> list[str]:
    """One line per import that goes up a floor, naming its file, line and both modules."""
    return [f"{rel}:{line}: {name} (floor {FLOOR[name]}) imports {target} (floor {FLOOR[target]})"
            for name, edges in graph.items() if name in FLOOR
            for target, line, rel in edges if target in FLOOR and FLOOR[target] > FLOOR[name]]


def cycle_message(cycle: list[tuple[str, str, int, str]]) -> str:
    return ("import cycle: " + " -> ".join([cycle[0][0]] + [edge[1] for edge in cycle]) + "\n"
            + "\n".join(f"{rel}:{line}: {a} imports {b}" for a, b, line, rel in cycle))


def test_no_import_goes_up_a_floor():
    upward = upward_imports(import_graph())
    assert not upward, "imports that go up a floor:\n" + "\n".join(upward)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, cycle_message(cycle)


def test_failures_name_the_file_line_and_modules():
    graph = {"config": [("data", 369, "src/diffuse/config.py")], "data": [("config", 12, "src/diffuse/data.py")]}
    assert upward_imports(graph) == ["src/diffuse/config.py:369: config (floor 2) imports data (floor 3)"]
    assert cycle_message(find_cycle(graph)) == ("import cycle: config -> data -> config\n"
                                                 "src/diffuse/config.py:369: config imports data\n"
                                                 "src/diffuse/data.py:12: data imports config")


@pytest.mark.parametrize("edges, cycle", [({"a": ["b"], "b": ["c"], "c": ["a"]}, ["a", "b", "c"]),
                                          ({"a": ["b"], "b": ["c"], "c": []}, None)])
def test_find_cycle_on_small_graphs(edges, cycle):
    graph = {k: [(t, 1, f"{k}.py") for t in v] for k, v in edges.items()}
    found = find_cycle(graph)
    assert (None if found is None else [edge[0] for edge in found]) == cycle


def test_config_and_imagefiles_load_without_torch():
    """A folder's defaults are read before torch is needed (docs/development.md, "Layer order")."""
    import subprocess
    import sys
    code = "import sys, diffuse.config, diffuse.imagefiles; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert got == "[]"
