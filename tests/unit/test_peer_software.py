"""Which version each agent runs, as a relay's operator sees it (relay.ssh.peersoftware):
read from the agent's SSH version line, shown in the relay's ``relay_connected`` and
``relay_service_registered`` lines, in ``labrelay status`` (JSON and text) and in the
metrics; an agent that names no version (before 0.2.0.dev0) is shown as such, and a
hostile version line is cut and made printable everywhere."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.conch.ssh import common
from twisted.conch.ssh.connection import MSG_GLOBAL_REQUEST
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs

from relay import __version__
from relay.config.schema import RelayConfig
from relay.ops.logfmt import json_observer
from relay.ops.metrics import prometheus_text
from relay.ops.status import format_status
from relay.server.grants import Grants
from relay.server.relay import RelayCore
from relay.ssh import policy
from relay.ssh.peersoftware import (
    CUT,
    FIRST_SENT,
    SOFTWARE_LIMIT,
    client_version_string,
    read_version_line,
)
from relay.ssh.server import RelayConnection
from relay.ssh.serverauth import Identity, RelayAvatar
from relay.ssh.wire import pack_forward
from relay.testing import FakeSSHTransport, FakeTCPTransport, KeyRing

OLD = f"unknown (before {FIRST_SENT})"


@pytest.mark.parametrize(("line", "software", "labrelay", "version", "shown"), [
    (b"SSH-2.0-labrelay_0.2.0.dev0", "labrelay_0.2.0.dev0", True, "0.2.0.dev0", "0.2.0.dev0"),
    (b"SSH-2.0-labrelay_1.4+local comment", "labrelay_1.4+local", True, "1.4+local",
     "1.4+local"),
    (b"SSH-2.0-labrelay", "labrelay", True, None, OLD),  # before 0.2.0.dev0
    (b"SSH-2.0-labrelay comment", "labrelay", True, None, OLD),
    (b"SSH-2.0-labrelay_", "labrelay_", True, None, OLD),
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10", "OpenSSH_9.2p1", False, None,
     "not labrelay: OpenSSH_9.2p1"),
    (b"SSH-1.99-OpenSSH_3.0", "OpenSSH_3.0", False, None, "not labrelay: OpenSSH_3.0"),
    (b"SSH-2.0-labrelayx_1", "labrelayx_1", False, None, "not labrelay: labrelayx_1"),
    (b"SSH-2.0", "", False, None, "not labrelay: (no software named)"),
    (None, "", False, None, "not labrelay: (no software named)"),
])
def test_the_software_and_version_a_version_line_names(
        line: bytes | None, software: str, labrelay: bool, version: str | None,
        shown: str) -> None:
    got = read_version_line(line)
    assert (got.software, got.labrelay, got.version, got.shown) == (
        software, labrelay, version, shown)


def test_a_hostile_version_line_is_cut_and_printable() -> None:
    """The line is the peer's, before any authentication: up to 4 KiB of any bytes but
    a newline.  Kept: the software field, SOFTWARE_LIMIT characters of printable ASCII."""
    evil = b"\x1b[2J\r\x00\xe2\x80\xae<b>\"'\\" + b"9" * 4000
    got = read_version_line(b"SSH-2.0-labrelay_" + evil + b" and a comment")
    assert got.labrelay and got.version is not None
    assert len(got.software) == SOFTWARE_LIMIT + len(CUT) and got.software.endswith(CUT)
    assert got.version.startswith("?[2J?????<b>\"'\\999") and got.version.endswith(CUT)
    assert all(0x21 <= ord(c) <= 0x7E for c in got.software + got.version)
    other = read_version_line(b"SSH-2.0-" + "é\u202e".encode() + b"x" * 5000)
    assert not other.labrelay and other.software.startswith("?????xx")
    assert len(other.software) == SOFTWARE_LIMIT + len(CUT)


def test_the_agent_names_its_version_the_relay_does_not() -> None:
    """A labrelay client's line names its version; the relay answers anyone on the
    internet, so its line stays bare.  Both are labrelay's to the other side, of this
    version and of the previous (labrelay_peer has taken `labrelay_...` since 9834174)."""
    from relay.ssh.client import LinkTransport
    from relay.ssh.server import RelayTransport

    assert LinkTransport.ourVersionString == b"SSH-2.0-labrelay_" + __version__.encode()
    assert RelayTransport.ourVersionString == b"SSH-2.0-labrelay"
    assert policy.labrelay_peer(LinkTransport.ourVersionString)
    assert read_version_line(LinkTransport.ourVersionString).shown == __version__


@pytest.mark.parametrize("bad", ["", "1.0-rc1", "1.0 beta", "1.0\n", "é"])
def test_a_version_that_cannot_go_in_a_version_line_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="SSH version line"):
        client_version_string(bad)


# --- the relay's views --------------------------------------------------------------


class Relay:
    """A relay core whose agents lab_pc and old_lab hold services, each on a real
    connection service over a fake SSH transport with the version line given."""

    def __init__(self) -> None:
        self.ring = KeyRing()
        config = RelayConfig(agents=(self.ring.agent("lab_pc", "gpu-cluster:22"),
                                     self.ring.agent("old_lab", "web:80"),
                                     self.ring.agent("evil", "evil:1")),
                             users=(self.ring.user("alice", "gpu-cluster:22"),))
        self.clock = MemoryReactorClock()
        self.grants = Grants(config, "test")
        self.core = RelayCore(config, self.grants, self.clock)

    def connect(self, name: str, version: bytes, service: str | None) -> RelayConnection:
        principal = self.grants.principal_for(self.ring.blob(name))
        assert principal is not None
        link = FakeSSHTransport(FakeTCPTransport(),
                                avatar=RelayAvatar(Identity(self.ring.blob(name), principal)))
        link.otherVersionString = version  # type: ignore[attr-defined]
        conn = RelayConnection(self.core)
        conn.transport = link  # type: ignore[assignment]
        conn.serviceStarted()
        if service is None:
            return conn
        bind, port = service.split(":")
        conn.packetReceived(MSG_GLOBAL_REQUEST, common.NS(b"tcpip-forward") + b"\xff"
                            + pack_forward(bind, int(port)))
        return conn


EVIL = b"SSH-2.0-labrelay_\x1b]0;pwned\x07" + b"A" * 3000


def test_the_relay_shows_each_agents_version_in_its_log_status_and_metrics() -> None:
    relay = Relay()
    with capturedLogs() as events:
        relay.connect("lab_pc", client_version_string("0.2.0.dev0"), "gpu-cluster:22")
        relay.connect("old_lab", b"SSH-2.0-labrelay", "web:80")
        relay.connect("evil", EVIL, "evil:1")
        relay.connect("alice", b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10", None)
    connected = {e["name"]: e for e in events if e.get("event") == "relay_connected"}
    registered = {e["agent"]: e for e in events if e.get("event") == "relay_service_registered"}
    assert connected["lab_pc"]["version"] == registered["lab_pc"]["version"] == "0.2.0.dev0"
    assert connected["old_lab"]["version"] == registered["old_lab"]["version"] == OLD
    assert connected["old_lab"]["software"] == "labrelay"
    # a user's software is a field (which ssh she runs), not in her line's text
    assert connected["alice"]["software"] == "OpenSSH_9.2p1"
    assert "version" not in connected["alice"]["log_format"].format(**connected["alice"])
    # The log's lines say it in words, the hostile one made safe and short.
    out = io.StringIO()
    observer = json_observer(out)
    for e in events:
        if e.get("event") in ("relay_connected", "relay_service_registered"):
            observer(e)
    text = "\n".join(json.loads(line)["text"] for line in out.getvalue().splitlines())
    assert ", version 0.2.0.dev0" in text and "(agent version 0.2.0.dev0)" in text
    assert f", version {OLD}" in text and f"registered web:80 (agent version {OLD})" in text
    assert "\x1b" not in text and "\x07" not in text and "A" * 100 not in text

    snapshot = {"version": __version__, "pid": 1, "started": 0.0, "relay": relay.core.status()}
    agents = {a["name"]: a for a in snapshot["relay"]["agents"]}
    assert (agents["lab_pc"]["version"], agents["lab_pc"]["software"]) == (
        "0.2.0.dev0", "labrelay_0.2.0.dev0")
    assert agents["old_lab"]["version"] == OLD
    evil = agents["evil"]["version"]
    assert evil.startswith("?]0;pwned?AAA") and evil.endswith(CUT), evil
    assert len(evil) < SOFTWARE_LIMIT + len(CUT)

    table = format_status(snapshot, now=10.0)
    assert table.startswith(f"labrelay {__version__} (pid 1)\n")  # the relay's own
    head = next(line for line in table.splitlines() if line.startswith("AGENT"))
    assert head.split() == ["AGENT", "FROM", "VERSION", "SERVICES"]
    rows = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert "0.2.0.dev0" in rows["lab_pc"] and "gpu-cluster:22" in rows["lab_pc"]
    assert OLD in rows["old_lab"] and "web:80" in rows["old_lab"]
    assert "\x1b" not in table and "\x07" not in table

    samples = {(s.labels["agent"], s.labels["version"]): s.value
               for f in text_string_to_metric_families(prometheus_text(snapshot))
               if f.name == "labrelay_relay_agent_connections" for s in f.samples}
    assert samples == {("lab_pc", "0.2.0.dev0"): 1, ("old_lab", OLD): 1, ("evil", evil): 1}


def test_status_of_a_relay_that_reports_no_versions_still_renders() -> None:
    """This version's ``labrelay status`` against an older relay's admin port: its
    agents carry no version."""
    snapshot: dict[str, Any] = {"version": "0.1.0", "pid": 1, "started": 0.0, "relay": {
        "listen": "x", "agents": [{"name": "lab_pc", "peer": "p", "services": []}]}}
    row = next(line for line in format_status(snapshot, now=1.0).splitlines()
               if line.startswith("lab_pc"))
    assert row.split() == ["lab_pc", "p", "?", "-"]
    assert "labrelay_relay_agent_connections" in prometheus_text(snapshot)

