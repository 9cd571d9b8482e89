"""relay.ops.status: the admin endpoint answers only requests addressed to itself (DNS
rebinding), and only with the bearer token when one is configured.

The gate is sans-IO and tested directly; the resource tree is driven through
twisted.web's in-memory ``DummyRequest`` so the refusals are seen as HTTP answers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from relay.ops.status import (
    MIN_TOKEN_LENGTH,
    AdminGate,
    TokenError,
    TokenFile,
    admin_resource,
    read_token,
)

TOKEN = b"0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("host", "local", "port", "answered"),
    [
        (b"127.0.0.1:7022", "127.0.0.1", 7022, True),
        (b"localhost:7022", "127.0.0.1", 7022, True),
        (b"LOCALHOST:7022", "127.0.0.1", 7022, True),
        (b"[::1]:7022", "::1", 7022, True),
        (b"localhost:7022", "::1", 7022, True),
        (b"127.0.0.1:7022", "::1", 7022, True),
        (b"evil.example", "127.0.0.1", 7022, False),
        (b"evil.example:7022", "127.0.0.1", 7022, False),
        (b"127.0.0.1", "127.0.0.1", 7022, False),  # no port: only on port 80
        (b"127.0.0.1:7023", "127.0.0.1", 7022, False),
        (b"localhost.:7022", "127.0.0.1", 7022, False),
        (b"", "127.0.0.1", 7022, False),
        (None, "127.0.0.1", 7022, False),
        (b"localhost", "127.0.0.1", 80, True),
        (b"localhost:80", "127.0.0.1", 80, True),
        (b"evil.example", "127.0.0.1", 80, False),
    ],
)
def test_host_must_name_the_endpoint(host: bytes | None, local: str, port: int,
                                     answered: bool) -> None:
    refusal = AdminGate("127.0.0.1").check(host, local, port, None)
    assert (refusal is None) is answered
    if refusal is not None:
        assert refusal.code == 421


def test_a_non_loopback_endpoint_answers_its_own_address_only() -> None:
    gate = AdminGate("0.0.0.0", TOKEN)
    auth = b"Bearer " + TOKEN
    assert gate.check(b"10.0.0.5:7022", "10.0.0.5", 7022, auth) is None
    assert gate.check(b"[2001:db8::5]:7022", "2001:db8::5", 7022, auth) is None
    for host in (b"localhost:7022", b"127.0.0.1:7022", b"evil.example:7022"):
        refusal = gate.check(host, "10.0.0.5", 7022, auth)
        assert refusal is not None and refusal.code == 421
    named = AdminGate("status.lab.example", TOKEN)
    assert named.check(b"status.lab.example:7022", "10.0.0.5", 7022, auth) is None


@pytest.mark.parametrize(
    ("authorization", "answered"),
    [
        (b"Bearer " + TOKEN, True),
        (b"bearer " + TOKEN, True),
        (None, False),
        (b"", False),
        (b"Bearer", False),
        (b"Bearer " + TOKEN[:-1], False),
        (b"Bearer " + TOKEN + b"x", False),
        (b"Basic " + TOKEN, False),
    ],
)
def test_bearer_token(authorization: bytes | None, answered: bool) -> None:
    gate = AdminGate("127.0.0.1", TOKEN)
    refusal = gate.check(b"127.0.0.1:7022", "127.0.0.1", 7022, authorization)
    assert (refusal is None) is answered
    if refusal is not None:
        assert refusal.code == 401
        assert dict(refusal.headers)[b"www-authenticate"].startswith(b"Bearer")


def test_the_host_is_checked_before_the_token() -> None:
    refusal = AdminGate("127.0.0.1", TOKEN).check(b"evil.example", "127.0.0.1", 7022, None)
    assert refusal is not None and refusal.code == 421


def render(root: Resource, path: bytes, host: bytes | None, local: object,
           authorization: bytes | None = None) -> tuple[int, bytes]:
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.uri = request.path = path
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host])
    if authorization is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [authorization])
    request.getHost = lambda: local  # type: ignore[method-assign]
    resource = getChildForRequest(root, request)
    body = resource.render(request)
    return request.responseCode or 200, body


@pytest.mark.parametrize("path", [b"/status.json", b"/metrics", b"/", b"/nothing"])
def test_every_path_is_gated(path: bytes) -> None:
    root = admin_resource(lambda: {"version": "x", "secret": "who is connected"},
                          AdminGate("127.0.0.1"))
    local = IPv4Address("TCP", "127.0.0.1", 7022)
    code, body = render(root, path, b"evil.example", local)
    assert code == 421 and b"secret" not in body and b"{" not in body
    code, body = render(root, path, b"localhost:7022", local)
    assert code == (404 if path == b"/nothing" else 200)
    if path == b"/status.json":
        assert b"who is connected" in body
    if path == b"/":
        assert b"<h1>labrelay x</h1>" in body


def test_token_over_http() -> None:
    root = admin_resource(lambda: {"version": "x"}, AdminGate("::1", TOKEN))
    local = IPv6Address("TCP", "::1", 7022)
    assert render(root, b"/status.json", b"[::1]:7022", local)[0] == 401
    assert render(root, b"/status.json", b"[::1]:7022", local, b"Bearer nope")[0] == 401
    code, body = render(root, b"/status.json", b"[::1]:7022", local, b"Bearer " + TOKEN)
    assert code == 200 and b'"version": "x"' in body


# --- the token file ----------------------------------------------------------------


def write(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def test_read_token(tmp_path: Path) -> None:
    assert read_token(write(tmp_path / "t", TOKEN + b"\n", 0o600)) == TOKEN
    assert read_token(write(tmp_path / "r", TOKEN, 0o400)) == TOKEN


@pytest.mark.parametrize(
    ("data", "mode", "fragment"),
    [
        (TOKEN, 0o640, "readable by others"),
        (TOKEN, 0o604, "readable by others"),
        (b"short", 0o600, f"at least {MIN_TOKEN_LENGTH}"),
        (b"with a space in the token", 0o600, "without spaces"),
        (b"", 0o600, "at least"),
    ],
)
def test_bad_token_files(tmp_path: Path, data: bytes, mode: int, fragment: str) -> None:
    with pytest.raises(TokenError, match=fragment):
        read_token(write(tmp_path / "t", data, mode))


def test_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="cannot read"):
        read_token(tmp_path / "absent")
    with pytest.raises(TokenError, match=r"cannot read|not a regular file"):
        read_token(tmp_path)  # a directory


# --- labrelay status output ----------------------------------------------------------


def test_status_tables_escape_peer_strings() -> None:
    """A session's origin is the client's own claim; ``labrelay status`` prints it to the
    operator's terminal as one visible, bounded cell."""
    from relay.ops.status import CELL_LIMIT, format_status

    forged = "10.0.0.1\x1b]0;owned\x07\n2026-01-01 fake line" + "x" * 500
    snapshot = {"version": "x", "pid": 1, "relay": {
        "listen": "127.0.0.1:2222", "agents": [], "users": [], "services": [],
        "sessions": [{"user": "alice", "service": "web:8080", "origin": forged + ":5",
                      "age": 1.0, "bytes_to_service": 0, "bytes_from_service": 0}],
    }}
    text = format_status(snapshot, now=0.0)
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b]0;owned\\x07\\n2026-01-01 fake line" in text
    assert not any(line.startswith("2026-01-01") for line in text.splitlines())
    assert max(len(line) for line in text.splitlines()) < CELL_LIMIT + 150


def test_status_shows_held_sessions_with_their_age_at_both_ends() -> None:
    """docs/resilience.md: status lists each held session, how long it has been held and
    when it will be reset, on the relay and on each agent link."""
    from relay.ops.status import format_status

    held = [{"session": "public:2202 from 10.0.0.9:5000", "id": "0a1b2c3d", "age": 12.4,
             "expires_in": 47.6, "unacked_bytes": 65536}]
    snapshot = {"version": "x", "pid": 1,
                "links": [{"name": "cloud", "server": "cloud:2222", "state": "connecting",
                           "since": 0.0, "last_error": None, "forwards": [],
                           "held_sessions": held}],
                "relay": {"listen": "127.0.0.1:2222", "agents": [], "users": [],
                          "services": [], "sessions": [], "held_sessions": held}}
    text = format_status(snapshot, now=0.0)
    assert "link cloud: sessions held for resumption" in text
    assert "sessions held for their agent to resume them" in text
    rows = [line for line in text.splitlines() if line.startswith("public:2202")]
    assert len(rows) == 2 and all("12s" in r and "48s" in r and "65536" in r for r in rows)


def test_the_relays_held_sessions_name_their_agent_and_its_login() -> None:
    """At the relay each held session names the agent it is held for, and the login that
    agent made when it is not the agent's name (one certificate may log in under two
    names; a held session is checked, and resumed, as its agent's)."""
    from relay.ops.status import format_status

    held = [{"session": "public:2202 from 10.0.0.9:5000", "id": "0a1b2c3d", "age": 1.0,
             "expires_in": 59.0, "unacked_bytes": 7, "agent": "lab_pc", "login": "lab_pc"},
            {"session": "public:2203 from 10.0.0.9:5001", "id": "1a1b2c3d", "age": 1.0,
             "expires_in": 59.0, "unacked_bytes": 0, "agent": "lab_pc", "login": "pc7"},
            {"session": "public:2204 from 10.0.0.9:5002", "id": "2a1b2c3d", "age": 1.0,
             "expires_in": 59.0, "unacked_bytes": 0, "agent": "gpu_box", "login": ""}]
    snapshot = {"version": "x", "pid": 1,
                "relay": {"listen": "127.0.0.1:2222", "agents": [], "users": [],
                          "services": [], "sessions": [], "held_sessions": held}}
    lines = format_status(snapshot, now=0.0).splitlines()
    header = lines.index("sessions held for their agent to resume them") + 1
    assert lines[header].split()[:2] == ["AGENT", "SESSION"]
    rows = lines[header + 1:header + 4]
    assert rows[0].startswith("lab_pc ") and "(login" not in rows[0]
    assert rows[1].startswith("lab_pc (login pc7) ")
    assert rows[2].startswith("gpu_box ")


def test_status_shows_each_links_reconnects() -> None:
    """How often a link came back (``reconnects`` in ``/status.json``) is in the LINK
    table too: a flapping link shows there, not only in the JSON."""
    from relay.ops.status import format_status

    snapshot = {"version": "x", "pid": 1,
                "links": [{"name": "cloud", "server": "cloud:2222", "state": "ready",
                           "since": 0.0, "last_error": None, "forwards": [],
                           "connects": 8, "reconnects": 7}]}
    lines = format_status(snapshot, now=0.0).splitlines()
    header = next(line for line in lines if line.startswith("LINK  "))
    row = next(line for line in lines if line.startswith("cloud "))
    assert header.split()[:6] == ["LINK", "SERVER", "STATE", "FOR", "RECONNECTS", "LAST"]
    assert row.split()[4] == "7", row


def test_a_rotated_token_file_is_in_force_at_the_next_request(tmp_path: Path) -> None:
    """Rotating the admin token is writing its file: the old token is refused from the
    next request on, the new one answered, without a restart (which would end every
    session through a relay).  A file made unusable refuses everything (503), the old
    token included, until it is fixed."""
    path = tmp_path / "admin.token"
    old, new = TOKEN, b"fedcba9876543210fedcba9876543210"
    path.write_bytes(old + b"\n")
    path.chmod(0o600)
    gate = AdminGate("127.0.0.1", token_file=TokenFile(path, read_token(path)))

    def ask(token: bytes) -> int | None:
        refusal = gate.check(b"127.0.0.1:7022", "127.0.0.1", 7022, b"Bearer " + token)
        return None if refusal is None else refusal.code

    assert ask(old) is None
    path.write_bytes(new + b"\n")  # as `openssl rand -hex 16 > admin.token` does
    assert ask(old) == 401
    assert ask(new) is None
    path.chmod(0o644)
    assert ask(new) == 503 and ask(old) == 503
    path.chmod(0o600)
    assert ask(new) is None
    path.unlink()
    assert ask(new) == 503
