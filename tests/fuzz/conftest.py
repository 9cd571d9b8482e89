"""The fuzz targets' failure observer (fuzzworld.FAILURES) is process-wide."""

import fuzzworld
import pytest


@pytest.fixture(autouse=True)
def _failures_of_this_test_only() -> None:
    """What an earlier test logged on purpose (test_channels' ``RuntimeError('bug')``)
    must not fail a target run here, whichever order pytest chose."""
    fuzzworld.FAILURES.take()
