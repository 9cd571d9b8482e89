"""Fixtures of the security suite: the integration suite's fixtures (real relay, sshd,
keys, targets) from :mod:`relay_fixtures`.

Every test here plays an attacker (a third-party SSH implementation, raw sockets, an
on-path box) against a real ``labrelay relay`` process and asserts two things: the
attack fails, and honest users keep working meanwhile.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "integration")]

from relay_fixtures import *  # noqa: E402, F403
from relay_fixtures import REPO_ROOT, Targets, agent_command, child_env  # noqa: E402

__all__ = ["REPO_ROOT", "Targets", "agent_command", "child_env"]
