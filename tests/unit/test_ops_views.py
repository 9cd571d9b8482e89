"""The operator's views of a node, from plain snapshots: the status page (escaped, no
script, refreshes itself), the metrics (conventional names, HELP on every family),
the per-user totals of the session table, the audit fields, sd_notify's messages on a
real datagram socket with a fake clock, and journald-style text logs."""

from __future__ import annotations

import html
import io
import re
import socket
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from relay.core.sessions import SessionTable
from relay.ops.logfmt import text_observer
from relay.ops.metrics import MetricsRegistry, prometheus_text
from relay.ops.notify import SystemdNotifier
from relay.ops.page import render_page
from relay.server.audit import key_fingerprint, path_of

HOSTILE = '<script>alert("x")</script>'
HOSTILE_VERSION = "\"><img/src=x/onerror=alert(1)>&amp;"

SNAPSHOT = {
    "version": "9.9", "pid": 7, "started": 1000.0,
    "links": [{"name": "up", "server": "relay:2222", "state": "connected", "since": 1000.0,
               "reconnects": 2, "last_up": 1010.0, "last_error": None,
               "fast_path": {"state": "ready", "idle": 3},
               "forwards": [{"name": "gpu", "kind": "remote", "state": "ready",
                             "failures": 0, "sessions_active": 1, "sessions_total": 5,
                             "bytes_to_target": 10, "bytes_from_target": 20}]}],
    "relay": {
        "listen": "0.0.0.0:2222",
        "agents": [{"name": "lab_pc", "peer": "1.2.3.4:5", "version": "0.2.0.dev0",
                    "services": ["gpu-cluster:22"]},
                   # a stock client's software field: printable ASCII, markup included
                   {"name": "spare", "peer": "1.2.3.4:6", "services": [],
                    "version": "not labrelay: " + HOSTILE_VERSION}],
        "users": [{"name": "alice", "peer": "5.6.7.8:9"}],
        "services": [{"service": "gpu-cluster:22", "owner": "lab_pc", "since": 1000.0}],
        "service_grants": [{"service": "gpu-cluster:22", "owner": "lab_pc"},
                           {"service": "web:8080", "owner": "lab_pc"}],
        "sessions": [{"user": "alice", "service": "gpu-cluster:22", "origin": HOSTILE,
                      "path": "channel", "age": 3.0, "bytes_to_service": 100,
                      "bytes_from_service": 2048}],
        "per_service": {"gpu-cluster:22": {"sessions_total": 4, "sessions_active": 1,
                                           "bytes_to_service": 100,
                                           "bytes_from_service": 2048}},
        "per_user_totals": {"alice": {"sessions_total": 4, "sessions_active": 1,
                                      "bytes_to_service": 100, "bytes_from_service": 2048},
                            HOSTILE: {"sessions_total": 1, "sessions_active": 0,
                                      "bytes_to_service": 0, "bytes_from_service": 0}},
        "counters": {"auth_refused": 2},
        "fast_path": {"data_port": None},
    },
    "reload": {"source": "n.toml", "reloads": {"success": 1, "failure": 1},
               "last_success": 1005.0,
               "last": {"ok": False, "at": 1006.0, "changes": [],
                        "errors": ["n.toml: relay.max_channels: must be at least 1"]}},
}


def test_page_shows_services_users_links_and_escapes_peers() -> None:
    page = render_page(SNAPSHOT, now=1010.0)
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "<script" not in page and "&lt;script&gt;" in page
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert "gpu-cluster:22 up lab_pc 10s 1 4" in text
    assert "web:8080 down lab_pc" in text  # granted, not registered
    assert "alice connected 1 4 100 B 2.0 KiB" in text
    assert "up relay:2222 connected 10s 2 gpu (ready) ready" in text
    # Each agent's version, escaped (it is the peer's version line).
    assert "<img" not in page and "&lt;img/src=x/onerror=alert(1)&gt;&amp;amp;" in page
    assert "lab_pc 1.2.3.4:5 0.2.0.dev0 gpu-cluster:22" in text
    assert html.unescape(text).count("spare 1.2.3.4:6 not labrelay: " + HOSTILE_VERSION) == 1
    assert "refused, the previous config still runs: n.toml: relay.max_channels" in text


def test_page_lists_grant_problems_escaped() -> None:
    """A grant file the watch applied as "grants nothing" shows on the page too (round
    16: before, only the log said so); its text is the operator's file's, escaped."""
    relay = {**SNAPSHOT["relay"], "grant_problems": [f"users:2: this line grants nothing: "
                                                     f"{HOSTILE}"], "grant_problem_count": 1}
    page = render_page({**SNAPSHOT, "relay": relay}, now=1010.0)
    assert "<script" not in page
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert "Grant problems: 1" in text and "users:2: this line grants nothing" in text
    assert "Grant problems" not in render_page(SNAPSHOT, now=1010.0)


def test_metrics_are_conventional_and_described() -> None:
    text = prometheus_text(SNAPSHOT)
    families = list(text_string_to_metric_families(text))
    names = {f.name: f for f in families}
    for family in families:
        assert family.documentation, family.name
        assert family.name.startswith("labrelay_"), family.name
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
    assert names["labrelay_build_info"].samples[0].labels["version"] == "9.9"
    sample = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in families for s in f.samples}
    assert sample[("labrelay_link_reconnects_total", (("link", "up"),))] == 2
    assert sample[("labrelay_link_last_up_timestamp_seconds", (("link", "up"),))] == 1010.0
    assert sample[("labrelay_relay_service_up", (("owner", "lab_pc"),
                                                 ("service", "web:8080")))] == 0
    assert sample[("labrelay_relay_user_bytes_total", (("direction", "from_service"),
                                                       ("user", "alice")))] == 2048
    assert sample[("labrelay_config_last_reload_successful", ())] == 0
    assert sample[("labrelay_config_reloads_total", (("result", "failure"),))] == 1
    assert "process_cpu_seconds_total" in MetricsRegistry(lambda: SNAPSHOT).exposition().decode()


def test_per_user_totals_outlive_sessions() -> None:
    table = SessionTable()
    a = table.open("alice", "gpu:22", "1.2.3.4:5", 0.0, key=b"k")
    b = table.open("alice", "web:80", "1.2.3.4:6", 1.0, key=b"k")
    table.moving(b, lambda: (7, 8))
    table.close(a, 5.0, 100, 200, "bridge closed")
    assert table.per_user_totals() == {"alice": {
        "sessions_total": 2, "sessions_active": 1, "bytes_to_service": 107,
        "bytes_from_service": 208}}
    table.close(b, 6.0, 10, 20)
    assert table.per_user_totals()["alice"]["bytes_to_service"] == 110
    assert table.per_user() == {"alice": 0}


def test_audit_fingerprint_and_path() -> None:
    import base64

    blob = base64.b64decode("AAAAC3NzaC1lZDI1NTE5AAAAIBUYQ1BAWDNbB+RDfTw+aDhQTjOiUNO9XmXSvMyzu9nZ")
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", key_fingerprint(blob))
    assert key_fingerprint(None) == "-"
    table = SessionTable()
    assert path_of(table.open("public:2201", "public:2201", "9.9.9.9:1", 0)) == "public"
    assert path_of(table.open("bob", "gpu:22", "9.9.9.9:1", 0, key=blob)) == "channel"


def test_notifier_sends_datagrams_and_pings_the_watchdog(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(5)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
        assert notifier.watchdog_interval == 1.0
        notifier.ready("running")
        assert listener.recv(4096) == b"READY=1\nSTATUS=running"
        clock = Clock()
        notifier.start_watchdog(clock)
        assert listener.recv(4096) == b"WATCHDOG=1"
        clock.advance(1.0)
        assert listener.recv(4096) == b"WATCHDOG=1"
        notifier.stop_watchdog()
        assert clock.getDelayedCalls() == []
    quiet = SystemdNotifier({})
    quiet.ready()
    assert not quiet.enabled and quiet.sent == []
    other = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "5",
                             "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is another process's


def test_journal_text_has_priority_and_no_time_stamp() -> None:
    from twisted.logger import LogLevel

    event = {"log_format": "relay listening on {port}", "port": 22,
             "log_level": LogLevel.warn, "log_time": 0.0, "event": "x"}
    plain, journal = io.StringIO(), io.StringIO()
    text_observer(plain)(dict(event))
    text_observer(journal, journal=True)(dict(event))
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d warn  relay listening on 22\n",
                    plain.getvalue())
    assert journal.getvalue() == "<4>warn  relay listening on 22\n"


def test_audit_events_in_text_and_json() -> None:
    """One close event, as the text and the JSON observers write it (peer strings
    escaped in both)."""
    import json

    from twisted.logger import globalLogPublisher

    from relay.ops.logfmt import json_observer
    from relay.server import audit

    text, lines = io.StringIO(), io.StringIO()
    observers = [text_observer(text), json_observer(lines)]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    try:
        table = SessionTable()
        row = table.open("alice", "gpu:22", "1.2.3.4:5\x1b[2J", 10.0, key=b"key")
        table.close(row, 12.5, 100, 2048, "bridge closed")
        audit.closed(row)
    finally:
        for observer in observers:
            globalLogPublisher.removeObserver(observer)
    assert re.search(r"info  session close: alice \(SHA256:\S+\) to gpu:22 from "
                     r"1\.2\.3\.4:5\\x1b\[2J by channel: 100 bytes to it, 2048 from it in "
                     r"2\.500s \(bridge closed\)", text.getvalue()), text.getvalue()
    event = json.loads(lines.getvalue().splitlines()[-1])
    assert (event["event"], event["bytes_to_service"], event["bytes_from_service"],
            event["duration"], event["path"], event["audit"]) == (
        "session_close", 100, 2048, 2.5, "channel", True)
    assert event["origin"] == "1.2.3.4:5\\x1b[2J"
