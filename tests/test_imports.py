"""The package layout is the architecture: no import cycles (function-level imports included), the
product never imports the research systems, every module imports on its own, and the shared numerics
load nothing but MLX."""

import json
import subprocess
import sys

import grimp
import networkx as nx
import pytest

PRODUCT_ONLY = ("mlx_ltc.research",)


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("mlx_ltc", include_external_packages=False)


def edges(graph):
    return [(m, d) for m in graph.modules for d in graph.find_modules_directly_imported_by(m)]


def test_no_import_cycles(graph):
    g = nx.DiGraph(edges(graph))
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert cycles == []
    assert len(graph.modules) > 80  # the walk saw the whole package


def test_the_product_never_imports_the_research_systems(graph):
    leaks = [(m, d) for m, d in edges(graph) if not m.startswith(PRODUCT_ONLY) and d.startswith(PRODUCT_ONLY)]
    assert leaks == [("mlx_ltc.cli", d) for _, d in leaks]  # the CLI alone names them, to dispatch
    assert {m for m in ("mlx_ltc.research.bk", "mlx_ltc.research.megacontext")} <= set(graph.modules)


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_every_module_imports_alone(graph):
    modules = sorted(m for m in graph.modules if not m.endswith(".__main__"))  # that one runs the CLI
    code = f"""
import importlib, sys, traceback
failed = []
for name in {modules!r}:
    for loaded in [m for m in sys.modules if m == "mlx_ltc" or m.startswith("mlx_ltc.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed))
"""
    assert run(code).strip() == ""


def test_the_shared_numerics_load_only_mlx():
    code = """
import json, sys
import mlx_ltc.numerics.attention, mlx_ltc.numerics.loss, mlx_ltc.numerics.lora_init
print(json.dumps(sorted(m for m in sys.modules if m.startswith("mlx_ltc") or m in ("networkx", "sqlite3", "torch"))))
"""
    loaded = json.loads(run(code))
    assert loaded == [
        "mlx_ltc",
        "mlx_ltc.numerics",
        "mlx_ltc.numerics.attention",
        "mlx_ltc.numerics.lora_init",
        "mlx_ltc.numerics.loss",
        "mlx_ltc.numerics.reductions",
    ]
