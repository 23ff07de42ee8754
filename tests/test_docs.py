"""The docs show the code as it is: the one-screen function, the worked example of the mask, and
only file paths that exist."""
import inspect
import re
from pathlib import Path

import pytest

from refimpl.core.layout import worked_example
from refimpl.core.objective import trace_loss

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# a path into this repository: one of its top folders, then names
PATH = re.compile(r"(?<![\w./-])(?:\.\./)?((?:refimpl|docs|examples|tests|tools|benchmarks|tiny_data|\.ci)"
                  r"(?:/[\w.*-]+)+)")


def test_the_listing_of_trace_loss_is_the_code():
    assert inspect.getsource(trace_loss).rstrip() in (ROOT / "docs" / "method.md").read_text()


def test_the_worked_example_is_what_the_code_prints():
    assert "```\n" + worked_example() + "\n```" in (ROOT / "docs" / "method.md").read_text()


def _exists(cited):
    cited = cited.rstrip("/.")
    return any(ROOT.glob(cited)) if "*" in cited else (ROOT / cited).exists()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_path_a_doc_cites_exists(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)           # code blocks show output
    missing = sorted({c for c in PATH.findall(text) if not _exists(c)})
    assert not missing, f"{doc.name} cites paths that do not exist: {missing}"
