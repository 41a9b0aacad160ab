"""The code stays readable in an evening: no file of src/ over 450 lines, no function over 60,
and each of the two benchmark studies within 300."""
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


def test_each_benchmark_study_is_within_300_lines():
    for name in ("benchmark.py", "conv_benchmark.py"):
        with open(os.path.join(SRC, name)) as f:
            assert f.read().count("\n") <= 300, name
