"""Shared test setup: hypothesis profiles and the `gpu` marker."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci" runs more examples and never times out on a slow shared machine; "dev" is the quick default.
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)

# The test models are tiny: torch's intra-op threads only fight over the cores (on a 2-core machine the
# engine tests ran several times slower with the default thread count).
torch.set_num_threads(1)


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Skip `gpu`-marked tests cleanly, with the reason, when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
