"""The package's layers (docs/architecture.md): imports go down, never in a circle, inline ones included."""
import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"
spec = importlib.util.spec_from_file_location("import_graph", TOOL)
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_no_cycles_and_every_import_goes_down():
    assert import_graph.problems(import_graph.graph()) == []


def test_the_checker_sees_inline_imports_and_cycles():
    g = import_graph.graph()
    assert "refimpl.core.ops" in g["refimpl.core.decoder"]
    assert "refimpl.training.pretrain" in g["refimpl.cli"]          # imported inside a function
    bad = {**g, "refimpl.core.ops": g["refimpl.core.ops"] + ["refimpl.core.objective"],
           "refimpl.core.layout": ["refimpl.training.train"]}
    found = import_graph.problems(bad)
    assert any(p.startswith("cycle:") and "refimpl.core.ops" in p for p in found)
    assert any("refimpl.core.layout (core) imports refimpl.training.train" in p for p in found)


def test_the_core_imports_nothing_above_it():
    g = import_graph.graph()
    for m, deps in g.items():
        if m.startswith("refimpl.core"):
            assert all(d.startswith(("refimpl.core", "refimpl.backend", "refimpl.errors", "refimpl.config"))
                       or d == "refimpl" for d in deps), (m, deps)
