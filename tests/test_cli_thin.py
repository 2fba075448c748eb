"""The CLI stays thin: small functions, one file of bounded size, one declaration per shared flag.
These fail if the command line grows back into a second library."""

import argparse
import ast
from pathlib import Path

from diffuse import cli

CLI = Path(cli.__file__)
MAX_FUNCTION_LINES = 50
MAX_FILE_LINES = 500


def test_no_function_in_cli_is_long_and_the_file_is_bounded():
    source = CLI.read_text()
    functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long = [f"{f.name}: {f.end_lineno - f.lineno + 1} lines" for f in functions
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long
    assert len(source.splitlines()) <= MAX_FILE_LINES


def test_shared_flags_are_declared_once_in_the_source():
    """--device/--precision/--threads and the sampling flags come from the parent parsers."""
    source = CLI.read_text() + "\n" + (CLI.parent / "cliflags.py").read_text()     # the commands and their parents
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", None) == "add_argument" and n.args and isinstance(n.args[0], ast.Constant)]
    flags = [c.args[0].value for c in calls]
    for flag in ("--precision", "--threads", "--sampler", "--guidance", "--class", "--seed", "--eta", "--spacing"):
        assert flags.count(flag) <= 1 + (flag == "--precision") + (flag == "--seed"), (flag, flags.count(flag))


def test_sampling_flags_mean_the_same_in_sample_and_eval():
    commands = cli.build_parser()._subparsers._group_actions[0].choices

    def flag(command: str, name: str) -> argparse.Action:
        return next(a for a in commands[command]._actions if name in a.option_strings)

    for name in ("--sampler", "--steps", "--spacing", "--eta", "--class", "--guidance", "--seed", "--clip",
                 "--device", "--precision", "--threads"):
        a, b = flag("sample", name), flag("eval", name)
        same = (a.default, a.choices, a.type, a.help.split(";")[0])
        assert same == (b.default, b.choices, b.type, b.help.split(";")[0]), name
