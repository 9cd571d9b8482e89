"""Issue 14, metrics and the status page, on a running relay with two services and two
users and a running agent:

- ``promtool check metrics`` (Debian ``prometheus``) passes on both ``/metrics``;
- the page at ``/``, opened in headless Chromium (Debian ``chromium``), shows the
  services, their agent, each agent's version and the users; the test reads the
  page's text as Chromium rendered it (``--dump-dom``) and takes the screenshot committed as
  ``docs/status-page.png`` (rewritten when ``LABRELAY_UPDATE_SCREENSHOT=1``).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, Targets, in_ci
from harness import (
    AgentProcess,
    KeyPair,
    RelayNode,
    SshProcess,
    connect,
    echo_roundtrip,
    free_port,
    make_key,
    ssh_argv,
)

from relay import __version__ as relay_version

pytestmark = pytest.mark.integration

SCREENSHOT = REPO_ROOT / "docs" / "status-page.png"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (scripts/dev setup installs it as root)"
        if in_ci():
            pytest.fail(reason + " and CI=true")
        pytest.skip(reason)
    return path


@pytest.fixture
def site(
    start_relay: Callable[..., RelayNode],
    start_agent: Callable[..., AgentProcess],
    start_ssh: Callable[..., SshProcess],
    targets: Targets,
    tmp_path: Path,
) -> Iterator[tuple[RelayNode, AgentProcess, str]]:
    """A relay with lab_pc's gpu-cluster:22 and web:8080, alice and bob each with an
    open session to web:8080, and the agent's own admin endpoint."""
    keys: dict[str, KeyPair] = {n: make_key(tmp_path / "keys" / n, n)
                                for n in ("lab_pc", "alice", "bob")}
    web = targets.echo(greeting=b"web\n")
    gpu = targets.echo(greeting=b"SSH-2.0-fake\r\n")
    relay = start_relay(
        agents=['permitlisten="gpu-cluster:22",permitlisten="web:8080" '
                f'{keys["lab_pc"].public_blob()} lab_pc'],
        users=[f'permitopen="gpu-cluster:22",permitopen="web:8080" '
               f'{keys[u].public_blob()} {u}' for u in ("alice", "bob")],
        relay_toml='penalty_exempt = ["127.0.0.1"]',
    )
    agent_admin = f"127.0.0.1:{free_port()}"
    agent = start_agent("-p", str(relay.port), "-i", str(keys["lab_pc"].path),
                        "-o", f"UserKnownHostsFile={relay.known_hosts}",
                        "-o", "StrictHostKeyChecking=yes", "--admin", agent_admin,
                        "-R", f"gpu-cluster:22:127.0.0.1:{gpu.port}",
                        "-R", f"web:8080:127.0.0.1:{web.port}", "lab_pc@127.0.0.1")
    agent.wait_for("forward_ready", timeout=30, bind="gpu-cluster")
    agent.wait_for("forward_ready", timeout=30, since=0, bind="web")
    held = []
    for user in ("alice", "bob"):
        port = free_port()
        ssh = start_ssh(ssh_argv(relay.port, keys[user].path, relay.known_hosts, "-v", "-N",
                                 "-o", "ExitOnForwardFailure=yes",
                                 "-L", f"127.0.0.1:{port}:web:8080", user=user),
                        name=f"ssh-{user}")  # fmt: skip
        ssh.wait_stderr(r"new port-listener")
        assert echo_roundtrip(port, user.encode() * 1000, greeting=b"web\n") \
            == user.encode() * 1000
        sock = connect(port)  # an open session, shown on the page
        held.append(sock)
        assert sock.recv(4) == b"web\n"
    yield relay, agent, agent_admin
    for sock in held:
        sock.close()


def get(address: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as r:
        return r.read().decode()


def test_promtool_accepts_metrics_of_a_running_relay_and_agent(
    site: tuple[RelayNode, AgentProcess, str],
) -> None:
    promtool = tool("promtool")
    relay, _agent, agent_admin = site
    for name, address in (("relay", relay.admin), ("agent", agent_admin)):
        text = get(address, "/metrics")
        out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and out.stdout + out.stderr == "", (name, out, text)
        families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
        helps = set(re.findall(r"^# HELP (\S+) ", text, re.M))
        assert families == helps, families ^ helps
        assert "labrelay_build_info" in families and "process_cpu_seconds_total" in families
        print(f"\n{name} /metrics: {len(families)} families, promtool OK")
    relay_text = get(relay.admin, "/metrics")
    assert re.search(r'^labrelay_relay_service_up\{owner="lab_pc",service="web:8080"\} 1\.0$',
                     relay_text, re.M)
    assert re.search(r'^labrelay_relay_user_sessions_active\{user="alice"\} 1\.0$',
                     relay_text, re.M)
    agent_text = get(agent_admin, "/metrics")
    assert re.search(r'^labrelay_link_up\{link="[^"]+"\} 1\.0$', agent_text, re.M)
    assert re.search(r'^labrelay_link_reconnects_total\{link="[^"]+"\} 0\.0$', agent_text, re.M)
    assert re.search(r"^labrelay_link_last_up_timestamp_seconds\{", agent_text, re.M)
    assert re.search(r'^labrelay_forward_bytes_total\{direction="to_target",forward=', agent_text,
                     re.M)


def test_status_page_in_headless_chromium(
    site: tuple[RelayNode, AgentProcess, str], tmp_path: Path,
) -> None:
    chromium = tool("chromium")
    relay, _, _ = site
    url = f"http://{relay.admin}/"
    raw = get(relay.admin, "/")
    assert "<script" not in raw.lower() and 'http-equiv="refresh"' in raw
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr
    text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom.stdout)))
    for expected in ("labrelay", "Services", "gpu-cluster:22 up lab_pc",
                     "web:8080 up lab_pc", "Users", "alice connected 1 2",
                     "bob connected 1 2", "Open sessions", "Agents"):
        assert expected in text, f"{expected!r} not on the page:\n{text}"
    # Each agent's version, as its version line named it (SSH-2.0-labrelay_<version>).
    [agent] = relay.status()["relay"]["agents"]
    assert agent["version"] == relay_version, agent
    shown = re.search(r"lab_pc (127\.0\.0\.1:\d+) (\S+) (gpu-cluster:22, web:8080|"
                      r"web:8080, gpu-cluster:22)", text)
    assert shown is not None, f"lab_pc's row not on the page:\n{text}"
    assert shown.group(1, 2) == (agent["peer"], relay_version), shown.group(0)
    shot = tmp_path / "status-page.png"
    out = subprocess.run([chromium, *flags, "--window-size=1100,900",
                          f"--screenshot={shot}", url], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and shot.stat().st_size > 10_000, out.stderr
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("LABRELAY_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    assert SCREENSHOT.exists(), "docs/status-page.png: run with LABRELAY_UPDATE_SCREENSHOT=1"
