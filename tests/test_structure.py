"""The package's shape: no import cycle among kdfast modules, no module importing the CLI, and a
command line whose ``--help`` imports no torch."""
from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdfast"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(name: str, path: Path) -> set[str]:
    """kdfast modules that ``name`` imports anywhere in its file (module level or inside a function)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def test_the_import_graph_sees_the_imports():
    assert "kdfast.shards.reader" in GRAPH["kdfast.shards.writer"]  # absolute, module level
    assert "kdfast.demo" in GRAPH["kdfast.cli"]  # inside a function


def test_no_import_cycle_among_kdfast_modules():
    try:
        graphlib.TopologicalSorter(GRAPH).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_only_the_entry_point_imports_the_cli():
    assert {name for name, imports in GRAPH.items() if "kdfast.cli" in imports} == {"kdfast.__main__"}


@pytest.mark.parametrize("command", [None, "capture", "verify", "inspect", "train", "bench", "demo",
                                     "eval", "export"])
def test_help_imports_no_torch(command):
    argv = [command, "--help"] if command else ["--help"]
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "kdfast", *argv], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: kdfast" in result.stdout
    torch_lines = [line for line in result.stderr.splitlines() if "torch" in line]
    assert torch_lines == [], torch_lines[:5]


def test_bench_choices_in_the_parser_are_the_benchmark_implementations():
    from kdfast import bench, cli

    assert cli.BENCH_IMPLS == bench.IMPLS


def test_import_kdfast_is_lazy_and_every_public_name_resolves():
    code = "\n".join([
        "import sys, kdfast",
        "assert 'torch' not in sys.modules, 'import kdfast imported torch'",
        "from kdfast import kd_loss, LossComponents",
        "import kdfast.api, kdfast.reference",
        "assert kd_loss is kdfast.kd_loss is kdfast.api.kd_loss",
        "assert LossComponents is kdfast.reference.LossComponents",
        "for name in kdfast.__all__: getattr(kdfast, name)",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
