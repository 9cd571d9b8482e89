"""Fixtures of the security suite: the integration suite's fixtures (real relay, sshd,
keys, targets), loaded under their own module name so both conftests coexist.

Every test here plays an attacker (a third-party SSH implementation, raw sockets, an
on-path box) against a real ``labrelay relay`` process and asserts two things: the
attack fails, and honest users keep working meanwhile.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
INTEGRATION = HERE.parent / "integration"
sys.path[:0] = [str(HERE), str(INTEGRATION)]

_spec = importlib.util.spec_from_file_location(
    "labrelay_integration_fixtures", INTEGRATION / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_fixtures = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _fixtures
_spec.loader.exec_module(_fixtures)

# Fixtures and hooks are found by name in this module's namespace.
globals().update(
    {name: value for name, value in vars(_fixtures).items() if not name.startswith("__")}
)


def pytest_configure(config: object) -> None:
    """Give ``import conftest`` back to tests/integration.

    Its test modules ``import conftest`` and monkeypatch it (test_aead patches
    ``relay_command`` to make the relay rekey every MiB).  When both directories are
    given on the command line (``pytest tests/integration tests/security``), pytest
    loads both conftests first and this one is left as ``sys.modules["conftest"]``:
    the patch then lands here, never reaches the fixture, and the test fails."""
    integration = str(INTEGRATION / "conftest.py")
    for plugin in config.pluginmanager.get_plugins():  # type: ignore[attr-defined]
        if getattr(plugin, "__file__", None) == integration:
            sys.modules["conftest"] = plugin
