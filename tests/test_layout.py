"""The code goes one way: stage packages import only downward (import-linter `layers` contract in
pyproject.toml), no module imports another module's private name, internal imports sit at module level
(function-level imports are for heavy optional dependencies only), sizes stay small, and ruff is clean."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "moesift"
sys.path.insert(0, str(ROOT / "tools"))
import code_shape  # noqa: E402 - tools/ is not a package

# heavy or optional dependencies a function may import on first use, so `import moesift` stays light
LAZY_OK = {"torch", "transformers", "accelerate", "mlx", "mlx_lm", "llama_cpp", "gguf", "plotly", "scipy",
           "pyarrow", "datasets", "huggingface_hub", "lm_eval"}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    return code_shape.modules(PKG)


def _function_imports(tree: ast.AST):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield fn, node


def test_import_linter_layers_contract():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports (import-linter, in the dev extra) is not installed")
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)  # reads [tool.importlinter] in pyproject.toml
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "BROKEN" not in r.stdout and "KEPT" in r.stdout


def test_no_private_name_crosses_a_module_and_no_cycle_is_dodged():
    mods = _modules()
    edges, private, internal_in_functions = code_shape.graph(mods, "moesift")
    assert not private, "\n".join(private)
    assert internal_in_functions == 0, "moesift's own modules are imported inside functions"
    assert code_shape.cycles(mods, edges) == []


def test_function_level_imports_only_for_heavy_dependencies():
    bad = []
    for path in _modules().values():
        for fn, node in _function_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                names = ["moesift"]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                names = [a.name for a in node.names]
            for n in names:
                if n.split(".")[0] not in LAZY_OK:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {n} inside {fn.name}()")
    assert not bad, "\n".join(bad)


def test_sizes_a_person_can_hold():
    big = []
    for path in _modules().values():
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(ROOT)}: {n} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() is {length} lines")
    assert not big, "\n".join(big)


def test_ruff_clean():
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff (in the dev extra) is not installed")
    r = subprocess.run([exe, "check", "moesift", "tests", "bench", "tools"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-4000:]
