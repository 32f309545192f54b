"""The house: rooms without import cycles, an engine that never imports a method, methods under dd_bench."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dd_bench_has_no_import_cycle():
    tool = _import_graph()
    edges = tool.graph()
    assert len(edges) > 30 and tool.cycles(edges) == []


def test_the_cycle_check_finds_a_cycle_when_there_is_one():
    tool = _import_graph()
    assert tool.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_importing_the_engine_imports_no_method():
    code = ("import sys, dd_bench, dd_bench.cli, dd_bench.run.runner, dd_bench.report; "
            "print([m for m in sys.modules if m.startswith('dd_bench.methods')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_engine_never_imports_a_method_module():
    """Only the method registry knows where built-in methods live (it imports them on first lookup)."""
    import ast

    for path in (ROOT / "dd_bench").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("dd_bench.methods") for n in names), f"{path.relative_to(ROOT)} imports {names}"


def test_methods_are_installed_under_dd_bench():
    import dd_bench.methods.dm as dm

    assert Path(dm.__file__).resolve() == ROOT / "methods" / "dm.py"
