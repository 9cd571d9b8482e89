"""The integration suite's fixtures live in :mod:`relay_fixtures` (shared with
tests/security); a conftest's namespace is where pytest finds fixtures and hooks."""

from relay_fixtures import *  # noqa: F403
from relay_fixtures import REPO_ROOT, Targets, agent_command, child_env, twistd_command

__all__ = ["REPO_ROOT", "Targets", "agent_command", "child_env", "twistd_command"]
