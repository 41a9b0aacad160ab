"""The code stays readable in an evening: no file of src/ over 450 lines, no function over 60,
each of the two benchmark studies within 300, and the reproduce tool (reproduce.py with its
jobs) within 450 in all."""
import ast
import glob
import os

from conftest import SRC


def source_files():
    return sorted(glob.glob(os.path.join(SRC, "**", "*.py"), recursive=True))


def test_no_file_over_450_lines_and_no_function_over_60():
    long_files, long_functions = [], []
    for path in source_files():
        with open(path) as f:
            text = f.read()
        name = os.path.relpath(path, SRC)
        if text.count("\n") > 450:
            long_files.append(name)
        long_functions += [f"{name}:{node.name}" for node in ast.walk(ast.parse(text))
                           if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                           and node.end_lineno - node.lineno + 1 > 60]
    assert (long_files, long_functions) == ([], [])


def lines(name):
    with open(os.path.join(SRC, name)) as f:
        return f.read().count("\n")


def test_each_benchmark_study_is_within_300_lines():
    for name in ("benchmark.py", "conv_benchmark.py"):
        assert lines(name) <= 300, name


def test_the_reproduce_tool_is_within_450_lines():
    assert lines("reproduce.py") + lines("jobs.py") <= 450
