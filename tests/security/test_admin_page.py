"""Peer strings on the admin endpoint's HTML page, in the audit log and in /metrics,
and a web page that tries to make the operator's browser reload the relay.

alice (granted) opens a ``direct-tcpip`` with paramiko whose originator address, the
one string of a session a user chooses freely, is HTML that would run script and a
forged log line with an ANSI escape.  A headless chromium renders ``/`` with that
session listed: the markup must show as text and no script may run.  The audit
log's ``session_open`` and every other log line must carry it escaped, ``/metrics``
must stay parseable.  A reload refused for a config key that is itself markup shows
its error escaped too.  Then a page from another origin, opened in chromium, posts
``/reload`` with and without ``X-Labrelay-Action``: nothing reloads.  alice's honest
session keeps working throughout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from conftest import Targets
from harness import AgentProcess, RelayNode, make_key, recv_exactly
from prometheus_client.parser import text_string_to_metric_families

from relay.ops.page import REFRESH

pytestmark = [pytest.mark.integration, pytest.mark.security]

PWN = "document.body.setAttribute('data-pwned','1')"
XSS_ORIGIN = (f'<img src=x onerror="{PWN}"><script>{PWN}</script>'
              "\n2026-01-01 00:00:00 info  forged\x1b[2J")
XSS_KEY = f'"<img src=x onerror=\\"{PWN}\\">"'
XSS_VERSION = "<img/src=x/onerror=document.body.dataset.pwned=1>"
"""An agent's version line's software field: printable ASCII without spaces, which the
relay keeps (relay.ssh.peersoftware) and shows on the page as the agent's version."""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is needed (scripts/dev setup installs it)")
    return path


BUDGET_MS = (REFRESH - 2) * 1000
"""Chromium's virtual time for the page's scripts (if markup got in and ran): under the
page's own ``<meta http-equiv="refresh">``.  At 5000 ms, equal to REFRESH, the reload
started as the budget ran out and chromium dumped the DOM of a page in mid-navigation:
nothing, now and then (seen in the clean-clone CI run)."""


def render(url: str) -> str:
    """The DOM chromium built for ``url`` after its scripts ran.  A profile of its own
    each time (another chromium on the machine holding the default profile makes this
    one exit at once with nothing), and a second try if it still printed no page."""
    assert BUDGET_MS >= 2000, "the page refreshes too often for scripts to be given time"
    for _ in range(3):
        with tempfile.TemporaryDirectory(prefix="labrelay-chromium-") as profile:
            done = subprocess.run(
                [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 f"--user-data-dir={profile}", f"--virtual-time-budget={BUDGET_MS}", "--dump-dom",
                 url], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        if "<body" in done.stdout:
            return done.stdout
    raise AssertionError(f"chromium printed no page for {url}: {done.stderr[-2000:]}")


def echo_chan(t: paramiko.Transport, origin: str) -> paramiko.Channel:
    chan = t.open_channel("direct-tcpip", ("web", 8080), (origin, 4242), timeout=30)
    chan.settimeout(30)
    return chan


def roundtrip(chan: paramiko.Channel, data: bytes) -> bytes:
    chan.sendall(data)
    return recv_exactly(chan, len(data))  # type: ignore[arg-type]


def test_peer_markup_is_text_on_the_page_in_the_logs_and_metrics(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    lab_pc, alice = make_key(tmp_path / "lab_pc", "lab_pc"), make_key(tmp_path / "alice", "alice")
    mallory = make_key(tmp_path / "mallory", "mallory")
    relay = start_relay(agents=[f'permitlisten="web:8080" {lab_pc.public_blob()} lab_pc',
                                f'permitlisten="spare:9" {mallory.public_blob()} mallory'],
                        users=[f'permitopen="web:8080" {alice.public_blob()} alice'],
                        relay_toml='penalty_exempt = ["127.0.0.1"]\n')
    echo = targets.echo()
    agent = start_agent("-p", str(relay.port), "-i", str(lab_pc.path),
                        "-o", f"UserKnownHostsFile={relay.known_hosts}",
                        "-R", f"web:8080:127.0.0.1:{echo.port}", "lab_pc@127.0.0.1",
                        name="agent")
    agent.wait_for("forward_ready", timeout=20, since=0, kind="remote", bind="web")
    t = paramiko.Transport(("127.0.0.1", relay.port))
    t.connect(username="alice", pkey=paramiko.Ed25519Key.from_private_key_file(str(alice.path)))
    honest = echo_chan(t, "127.0.0.1")
    hostile = echo_chan(t, XSS_ORIGIN)
    assert roundtrip(hostile, b"hostile") == b"hostile"
    assert roundtrip(honest, b"one") == b"one"
    # An agent whose version line is markup: shown as its version, as text.
    m = paramiko.Transport(("127.0.0.1", relay.port))
    m.local_version = "SSH-2.0-" + XSS_VERSION
    m.connect(username="mallory",
              pkey=paramiko.Ed25519Key.from_private_key_file(str(mallory.path)))
    agents = {a["name"]: a for a in relay.status()["relay"]["agents"]}
    assert agents["mallory"]["version"] == "not labrelay: " + XSS_VERSION, agents

    dom = render(f"http://{relay.admin}/")
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0], dom[:2000]
    assert "<img" not in dom and "<script>document" not in dom
    assert "&lt;img src=x onerror=" in dom  # shown, as text
    assert "alice" in dom
    assert "not labrelay: &lt;img/src=x/onerror=document.body.dataset.pwned=1&gt;" in dom

    # (each written just after its set-up: audit.SetupLog)
    opened = relay.events_at_least("session_open", 2, user="alice")
    assert len(opened) == 2
    shown = [e["origin"] for e in opened if "img" in e["origin"]]
    assert len(shown) == 1 and "\n" not in shown[0] and "\x1b" not in shown[0], shown
    assert "\\n2026-01-01" in shown[0] and "\\x1b[2J" in shown[0], shown
    assert relay.events("_raw") == []  # every line one JSON event: none forged

    with urllib.request.urlopen(f"http://{relay.admin}/metrics", timeout=10) as reply:
        families = list(text_string_to_metric_families(reply.read().decode()))
    assert any(f.name == "labrelay_relay_sessions_active" for f in families)

    # A reload refused for a key that is markup: its error is text on the page too.
    config = Path(relay.dir) / "node.toml"
    good = config.read_text()
    config.write_text(good.replace("[relay]\n", f"[relay]\n{XSS_KEY} = 1\n", 1))
    request = urllib.request.Request(f"http://{relay.admin}/reload", data=b"", method="POST",
                                     headers={"X-Labrelay-Action": "reload"})
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("the reload of a broken config was applied")
    except urllib.error.HTTPError as e:
        assert e.code == 409
    config.write_text(good)
    dom = render(f"http://{relay.admin}/")
    assert "refused" in dom and "&lt;img src=x" in dom and "<img" not in dom
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]
    assert roundtrip(honest, b"two") == b"two"
    t.close()
    m.close()


def test_a_web_page_cannot_make_the_browser_reload_the_relay(
    start_relay: Callable[..., RelayNode], tmp_path: Path,
) -> None:
    relay = start_relay()
    relay.wait_for("admin_listening", since=0)
    evil = tmp_path / "evil.html"
    url = f"http://{relay.admin}/reload"
    evil.write_text(f"""<html><body><script>
fetch("{url}", {{method: "POST", headers: {{"X-Labrelay-Action": "reload"}}}})
  .then(r => document.body.setAttribute("data-with-header", "status " + r.status))
  .catch(e => document.body.setAttribute("data-with-header", "blocked"));
fetch("{url}", {{method: "POST", mode: "no-cors", body: "x"}})
  .then(r => document.body.setAttribute("data-simple", "sent"))
  .catch(e => document.body.setAttribute("data-simple", "blocked"));
</script></body></html>""")
    dom = render(evil.as_uri())
    # The preflight is never granted: the page never gets an answer to read.
    assert 'data-with-header="status' not in dom, dom
    relay.proc.assert_no_event("reload_done")
    relay.proc.assert_no_event("reload_failed")
    # What the preflight got: no CORS grant (and the simple POST, if sent, a 403).
    request = urllib.request.Request(url, method="OPTIONS", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-labrelay-action"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            headers = reply.headers
    except urllib.error.HTTPError as e:
        headers = e.headers
    assert headers.get("Access-Control-Allow-Origin") is None
    assert headers.get("Access-Control-Allow-Headers") is None
    # The operator's own reload still works.
    request = urllib.request.Request(url, data=b"", method="POST",
                                     headers={"X-Labrelay-Action": "reload"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert json.load(reply)["ok"] is True
