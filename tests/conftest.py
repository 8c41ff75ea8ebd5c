"""Shared test setup: the tests directory on sys.path (for ``reference``) and a hypothesis profile."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# The test shapes are tiny: one intra-op thread avoids OpenMP spin-waiting, which on a loaded 2-core machine
# turned 10 ms tests into 2 s ones. Results do not depend on it (the tests compare with tolerances).
torch.set_num_threads(1)

try:
    from hypothesis import HealthCheck, settings

    # Derandomized so CI runs are reproducible; small example counts keep the suite fast on 2 cores.
    settings.register_profile(
        "moekit",
        max_examples=30,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "moekit"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
