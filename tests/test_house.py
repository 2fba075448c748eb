"""House rules for all of src/diffuse: no function or method over MAX_FUNCTION_LINES lines.

A function is measured from its ``def`` line to its last line (docstring and comments included,
decorators not), and nested functions are measured on their own as well as inside their parent.
A long function is split into named stages; only declarative tables (a literal mapping written
out in full) may stay long, and each one must be named in ALLOWED with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "diffuse"
MAX_FUNCTION_LINES = 80

# "module path under src/diffuse::function" -> why it may be longer. None today.
ALLOWED: dict[str, str] = {}


def long_functions(source: str, where: str) -> list[str]:
    """'where::name (N lines, line L)' for every function in ``source`` over MAX_FUNCTION_LINES."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and f"{where}::{node.name}" not in ALLOWED:
                out.append(f"{where}::{node.name} ({lines} lines, line {node.lineno})")
    return out


def test_no_function_in_src_diffuse_is_over_80_lines():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, "src/diffuse not found"
    long = [hit for f in files for hit in long_functions(f.read_text(), f.relative_to(SRC).as_posix())]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named stages): {long}"


def _function(header: str, lines: int, indent: str = "") -> str:
    """A function of exactly ``lines`` lines: its def line, then ``lines - 1`` statements."""
    return f"{indent}{header}\n" + f"{indent}    x = 1\n" * (lines - 1)


def test_the_measure_counts_methods_and_nested_functions_and_stops_at_80():
    n = MAX_FUNCTION_LINES
    source = (_function("def fits():", n)
              + "class C:\n" + _function("async def method(self):", n + 1, "    ")
              + "def outer():\n" + _function("def inner():", n + 1, "    "))
    found = {hit.split(" (")[0]: hit for hit in long_functions(source, "m.py")}
    assert sorted(found) == ["m.py::inner", "m.py::method", "m.py::outer"]
    assert found["m.py::outer"].startswith(f"m.py::outer ({n + 2} lines")


def test_every_allowed_entry_names_a_function_that_is_still_long():
    # A stale entry would let a new long function of the same name in unnoticed.
    for key in ALLOWED:
        path, name = key.split("::")
        tree = ast.parse((SRC / path).read_text())
        lengths = [n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
        assert lengths and max(lengths) > MAX_FUNCTION_LINES, f"{key} is no longer long: drop it from ALLOWED"
