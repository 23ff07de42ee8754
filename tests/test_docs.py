"""The docs show the method's one-screen function as it is in the code, never an older copy."""
import inspect
from pathlib import Path

import pytest

from refimpl.core.objective import trace_loss

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("doc", ["method.md", "algorithm.md"])
def test_the_listing_of_trace_loss_is_the_code(doc):
    assert inspect.getsource(trace_loss).rstrip() in (DOCS / doc).read_text()
