"""Setup for every test file: a deterministic hypothesis profile and small float64 models.

The "ci" profile (the default) is derandomized, so a CI run draws the same examples every
time; HYPOTHESIS_PROFILE=dev draws fresh examples and more of them, for hunting bugs locally.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# test the working tree's refimpl (and benchmarks/, imported as a package) even when refimpl is not
# pip-installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refimpl.config import get_preset  # noqa: E402
from refimpl.core.decoder import init_params  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# nano (3 layers, 3 heads of 16, d=48) with a small vocab. init_std is raised from 0.02 so that
# attention scores are O(1): with near-uniform attention a wrong position or mask offset barely
# moves the logits, and tests of them would pass for the wrong reason.
NANO = get_preset("nano", vocab_size=29, init_std=0.2)


@pytest.fixture(scope="session")
def nano_cfg():
    """The nano config with a small vocab (session-scoped, so hypothesis tests may use it)."""
    return NANO


@pytest.fixture(scope="session")
def params64(nano_cfg):
    """float64 decoder params for nano_cfg (seed 0). Tests must not mutate them."""
    return init_params(nano_cfg, seed=0, dtype=np.float64)


@pytest.fixture(scope="session")
def params32(nano_cfg):
    """float32 decoder params for nano_cfg (seed 0)."""
    return init_params(nano_cfg, seed=0, dtype=np.float32)
