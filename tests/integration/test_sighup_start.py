"""A SIGHUP while a node is starting reloads it once it runs; it does not end it.

SIGHUP's default action ends a process.  logrotate, a deploy script or an operator who
just edited the grants may send it in the node's first second, while it imports and
reads its config, or after ``labrelay`` logged "started" but before its reactor runs
(its reload handler used to be installed only then).  Each case sends the signal from
inside the real process at that exact point (a wrapper around the real function the
node calls there, so the timing is not a race), then checks that the node runs,
reloads (``reload_done``), and serves its admin endpoint.  Fails without
relay.ops.hangup: the process ends by the signal (status -1).
"""

from __future__ import annotations

import json
import signal
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import free_port

pytestmark = pytest.mark.integration

#: ``labrelay ARGS`` with a SIGHUP sent to itself just before ``WHERE`` runs.
WRAPPED = """\
import os, signal, sys
import importlib
module, name = sys.argv[1].rsplit(".", 1)
target = importlib.import_module(module)
real = getattr(target, name)

def hup_first(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGHUP)
    return real(*args, **kwargs)

setattr(target, name, hup_first)
mode = sys.argv[2]
sys.argv = [mode] + sys.argv[3:]
if mode == "labrelay":
    from relay.cli.main import main
    sys.exit(main())
from twisted.scripts.twistd import run
run()
"""


def node_toml(tmp_path: Path, admin_port: int) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f"""\
[admin]
listen = "127.0.0.1:{admin_port}"

[relay]
listen = "127.0.0.1:0"
state_dir = "{tmp_path / 'state'}"
""")
    return path


@pytest.mark.parametrize(("runner", "where"), [
    # after the config was read, before the node's service exists
    ("labrelay", "relay.ops.service.make_node_service"),
    ("twistd", "relay.ops.service.make_node_service"),
    # the service built, "started" logged next, the reactor not running yet
    ("labrelay", "relay.cli.main.run_reactor"),
])
def test_a_sighup_while_the_node_starts_reloads_it_once_running(
    runner: str, where: str, tmp_path: Path,
    start_process: Callable[..., Any],
) -> None:
    admin = free_port()
    config = node_toml(tmp_path, admin)
    if runner == "labrelay":
        args = ["labrelay", "run", "--log-format", "json", str(config)]
    else:
        args = ["twistd", "-n", "--pidfile", str(tmp_path / "relay.pid"), "labrelay",
                "--config", str(config), "--log-format", "json"]
    proc = start_process([sys.executable, "-c", WRAPPED, where, *args], name=f"{runner}-hup")
    proc.wait_for("reload_requested_at_start", timeout=30)
    done = proc.wait_for("reload_done", timeout=30)
    assert done["summary"] == "nothing changed", done  # the config it read was current
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status.json", timeout=10) as r:
        status = json.load(r)
    assert status.get("relay") is not None, status
    assert proc.proc.poll() is None, "the node ended after the SIGHUP"
    proc.proc.send_signal(signal.SIGTERM)
    # a clean stop: labrelay exits 0; twistd, once shut down, ends itself by the signal
    # it stopped on (as it does without any of this)
    assert proc.proc.wait(15) == (0 if runner == "labrelay" else -signal.SIGTERM)
    assert proc.events("reload_done") == [done]  # one reload, not one per handler
