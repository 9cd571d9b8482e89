"""The integration suite's fixtures live in :mod:`relay_fixtures` (shared with
tests/security); a conftest's namespace is where pytest finds fixtures and hooks."""

import os
from pathlib import Path

import pytest
from relay_fixtures import *  # noqa: F403
from relay_fixtures import REPO_ROOT, Targets, agent_command, child_env, twistd_command

__all__ = ["REPO_ROOT", "Targets", "agent_command", "child_env", "twistd_command"]


#: Soaks that run only when their variable gives them seconds (never a skip in the
#: default run: a skipped test reads as a pass nobody earned).
SOAKS = {"test_macstress.py": "LABRELAY_MAC_STRESS"}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    variable = SOAKS.get(collection_path.name)
    if variable is not None and not float(os.environ.get(variable, "0") or 0) > 0:
        return True
    return None
