"""``request-refused@labrelay``: why the relay refused an agent's forward.

SSH's ``REQUEST_FAILURE`` carries no reason.  The relay tells a labrelay agent (and no
one else) why, in its own message just before the failure; the agent believes it only
for the request it names, and shows it in ``forward_refused`` and ``labrelay status``
(docs/relay.md, "labrelay's extensions").  Its wire format, the relay's side (real
``RelayConnection`` and ``RelayCore`` on a fake SSH transport), the agent's pairing
(real ``LinkConnection``) and what the agent's forward does with it.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.conch.ssh import common
from twisted.conch.ssh.connection import (
    MSG_GLOBAL_REQUEST,
    MSG_REQUEST_FAILURE,
    MSG_REQUEST_SUCCESS,
)
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from relay.agent.forwards import REFUSED_NO_REASON, ForwardState, RemoteForwardRunner
from relay.config.schema import HostPort, RelayConfig, RemoteForward
from relay.server.grants import Grants
from relay.server.relay import TAKEOVER_PROBE, RelayCore
from relay.ssh.client import LinkConnection
from relay.ssh.openerrors import RefusedWithReason, refusal_reason, refused_by_peer
from relay.ssh.server import RelayConnection
from relay.ssh.serverauth import Identity, RelayAvatar
from relay.ssh.wire import (
    REQUEST_REFUSED,
    RefusalNote,
    pack_forward,
    pack_request_refused,
    unpack_request_refused,
)
from relay.testing import FakeLink, FakeLinkConnection, FakeSSHTransport, FakeTCPTransport, KeyRing

LABRELAY = b"SSH-2.0-labrelay"
OPENSSH = b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13"
FORWARD = b"tcpip-forward"
CANCEL = b"cancel-tcpip-forward"


# --- the wire format -------------------------------------------------------------


def test_round_trip() -> None:
    note = unpack_request_refused(pack_request_refused(FORWARD, "echo2", 7, "not granted"))
    assert note == RefusalNote(FORWARD, "echo2", 7, "not granted")
    assert note.answers(FORWARD, "echo2", 7)


def test_the_reason_and_the_bind_are_bounded() -> None:
    note = unpack_request_refused(pack_request_refused(CANCEL, "b" * 1000, 2201, "é" * 2000))
    assert len(note.why.encode()) <= 1024 and set(note.why) == {"é"}  # cut on a character
    assert note.bind == "b" * 255 and note.port == 2201
    # A bind that was cut pairs with nothing: the agent never asked for that one.
    assert not note.answers(CANCEL, "b" * 1000, 2201)


@pytest.mark.parametrize("data", [
    b"", b"\x00\x00\x00\x0dtcpip-forward", b"\x00\x00\x00\x0dtcpip-forward\x00\x00\x00\x03web",
    b"\x00\x00\x00\x0dtcpip-forward\x00\x00\x00\x03web\x00\x00",
])
def test_malformed_is_an_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        unpack_request_refused(data)


def test_a_note_answers_only_the_request_it_names() -> None:
    note = RefusalNote(FORWARD, "web", 8080, "why")
    assert note.answers(FORWARD, "web", 8080)
    assert not note.answers(CANCEL, "web", 8080)
    assert not note.answers(FORWARD, "WEB", 8080)  # echoed as sent: exactly
    assert not note.answers(FORWARD, "web", 8081)


# --- the relay's side ----------------------------------------------------------------


class Relay:
    """A relay core whose agent lab_pc is granted gpu-cluster:22, with real connection
    services on fake SSH transports (what each sends lands in its ``packets``)."""

    def __init__(self) -> None:
        self.ring = KeyRing()
        config = RelayConfig(agents=(self.ring.agent("lab_pc", "gpu-cluster:22"),),
                             users=(self.ring.user("alice", "gpu-cluster:22"),))
        self.clock = MemoryReactorClock()
        self.grants = Grants(config, "test")
        self.core = RelayCore(config, self.grants, self.clock)

    def connect(self, version: bytes, name: str = "lab_pc") -> tuple[RelayConnection, Any]:
        principal = self.grants.principal_for(self.ring.blob(name))
        assert principal is not None
        link = FakeSSHTransport(FakeTCPTransport(),
                                avatar=RelayAvatar(Identity(self.ring.blob(name), principal)))
        link.otherVersionString = version  # type: ignore[attr-defined]
        conn = RelayConnection(self.core)
        conn.transport = link  # type: ignore[assignment]
        conn.serviceStarted()
        return conn, link


def ask(conn: RelayConnection, request: bytes, data: bytes) -> None:
    conn.packetReceived(MSG_GLOBAL_REQUEST, common.NS(request) + b"\xff" + data)


def replies(link: Any) -> list[tuple[int, RefusalNote | None]]:
    """What the relay sent: global replies, and its notes (decoded)."""
    out: list[tuple[int, RefusalNote | None]] = []
    for kind, payload in link.packets:
        if kind == MSG_GLOBAL_REQUEST:
            name, rest = common.getNS(payload)
            if name == REQUEST_REFUSED:
                assert rest[:1] == b"\x00", "no reply wanted"
                out.append((kind, unpack_request_refused(rest[1:])))
        elif kind in (MSG_REQUEST_SUCCESS, MSG_REQUEST_FAILURE):
            out.append((kind, None))
    return out


def test_a_labrelay_agent_hears_why_just_before_the_failure() -> None:
    relay = Relay()
    conn, link = relay.connect(LABRELAY)
    ask(conn, FORWARD, pack_forward("echo2", 7))
    ask(conn, FORWARD, pack_forward("gpu-cluster", 22))
    ask(conn, CANCEL, pack_forward("echo2", 7))
    assert replies(link) == [
        (MSG_GLOBAL_REQUEST,
         RefusalNote(FORWARD, "echo2", 7, "service echo2:7 is not granted to agent lab_pc")),
        (MSG_REQUEST_FAILURE, None),
        (MSG_REQUEST_SUCCESS, None),
        (MSG_GLOBAL_REQUEST,
         RefusalNote(CANCEL, "echo2", 7, "echo2:7 is not registered by this connection")),
        (MSG_REQUEST_FAILURE, None),
    ]


def test_a_stock_client_gets_exactly_the_plain_failure() -> None:
    relay = Relay()
    conn, link = relay.connect(OPENSSH)
    ask(conn, FORWARD, pack_forward("echo2", 7))
    ask(conn, CANCEL, pack_forward("echo2", 7))
    assert link.packets == [(MSG_REQUEST_FAILURE, b""), (MSG_REQUEST_FAILURE, b"")]


def test_no_note_for_what_names_no_forward() -> None:
    """A malformed forward names no bind and port to pair with; other requests (a
    keepalive) are refused plainly as before."""
    relay = Relay()
    conn, link = relay.connect(LABRELAY)
    ask(conn, FORWARD, b"\x00\x00\x00\x05echo2")
    ask(conn, b"keepalive@openssh.com", b"")
    assert link.packets == [(MSG_REQUEST_FAILURE, b""), (MSG_REQUEST_FAILURE, b"")]
    assert relay.core.counters["requests_refused"] == 1


def test_a_refusal_decided_later_still_comes_just_before_its_own_failure() -> None:
    """Replies keep request order: a forward refused at once waits behind one whose
    holder is being probed; each note goes out right before its own failure."""
    relay = Relay()
    holder, holder_link = relay.connect(LABRELAY)
    ask(holder, FORWARD, pack_forward("gpu-cluster", 22))
    newcomer, link = relay.connect(LABRELAY)
    ask(newcomer, FORWARD, pack_forward("gpu-cluster", 22))  # the holder is probed
    ask(newcomer, FORWARD, pack_forward("echo2", 7))  # refused at once, answered after
    assert link.packets == []
    holder.packetReceived(MSG_REQUEST_SUCCESS, b"")  # the holder answers: it is alive
    held = replies(link)
    assert [kind for kind, _ in held] == [MSG_GLOBAL_REQUEST, MSG_REQUEST_FAILURE] * 2
    first, second = held[0][1], held[2][1]
    assert first is not None and first.answers(FORWARD, "gpu-cluster", 22)
    assert first.why.startswith("held by a live session of lab_pc from ")
    assert first.why.endswith("(answered a probe just now)")
    assert second == RefusalNote(FORWARD, "echo2", 7,
                                 "service echo2:7 is not granted to agent lab_pc")
    relay.clock.advance(TAKEOVER_PROBE * 2)
    assert [kind for kind, _ in replies(holder_link)] == [MSG_REQUEST_SUCCESS]


# --- the agent's side ----------------------------------------------------------------


def agent_connection() -> tuple[LinkConnection, FakeSSHTransport]:
    conn = LinkConnection(object())  # type: ignore[arg-type]  # nothing here reads it
    link = FakeSSHTransport()
    conn.transport = link  # type: ignore[assignment]
    return conn, link


def note_from_relay(conn: LinkConnection, payload: bytes) -> None:
    conn.packetReceived(MSG_GLOBAL_REQUEST, common.NS(REQUEST_REFUSED) + b"\x00" + payload)


def outcome(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not answered"
    return results[0]


def test_the_agent_pairs_a_note_with_the_failure_it_precedes() -> None:
    conn, link = agent_connection()
    d = conn.sendGlobalRequest(FORWARD, pack_forward("echo2", 7), wantReply=1)
    note_from_relay(conn, pack_request_refused(FORWARD, "echo2", 7, "not granted"))
    conn.packetReceived(MSG_REQUEST_FAILURE, b"")
    f = outcome(d)
    assert isinstance(f, Failure) and refused_by_peer(f)
    assert refusal_reason(f, FORWARD, "echo2", 7) == "not granted"
    assert refusal_reason(f, FORWARD, "echo2", 8) is None  # about another request
    assert refusal_reason(f, CANCEL, "echo2", 7) is None
    assert link.disconnects == [] and link.packets[1:] == []  # no reply to the note


def test_the_agent_forgets_a_note_at_the_next_reply() -> None:
    """A note is about the very next reply: one before a success is dropped, and a
    failure later has no reason; a malformed note is ignored."""
    conn, _link = agent_connection()
    granted = conn.sendGlobalRequest(FORWARD, pack_forward("web", 80), wantReply=1)
    refused = conn.sendGlobalRequest(FORWARD, pack_forward("echo2", 7), wantReply=1)
    note_from_relay(conn, pack_request_refused(FORWARD, "echo2", 7, "stale"))
    conn.packetReceived(MSG_REQUEST_SUCCESS, b"")
    conn.packetReceived(MSG_REQUEST_FAILURE, b"")
    assert outcome(granted) == b""
    f = outcome(refused)
    assert refused_by_peer(f) and refusal_reason(f, FORWARD, "echo2", 7) is None
    again = conn.sendGlobalRequest(FORWARD, pack_forward("echo2", 7), wantReply=1)
    note_from_relay(conn, b"\x00\x00\x00\x0dtcpip-forward")  # cut short
    conn.packetReceived(MSG_REQUEST_FAILURE, b"")
    assert refusal_reason(outcome(again), FORWARD, "echo2", 7) is None


def test_a_note_with_no_request_waiting_is_still_a_protocol_error_reply() -> None:
    """A note changes nothing about a reply to no request: still a protocol error."""
    conn, link = agent_connection()
    note_from_relay(conn, pack_request_refused(FORWARD, "echo2", 7, "why"))
    conn.packetReceived(MSG_REQUEST_FAILURE, b"")
    assert len(link.disconnects) == 1


def runner() -> tuple[RemoteForwardRunner, FakeLinkConnection, FakeLink]:
    link, conn = FakeLink(), FakeLinkConnection()
    forward = RemoteForwardRunner(
        link, RemoteForward("echo2", 7, HostPort("127.0.0.1", 7), "echo2"),  # type: ignore[arg-type]
        lambda failures: 1.0)
    forward.linkUp(conn)  # type: ignore[arg-type]
    return forward, conn, link


def test_the_forward_logs_and_shows_the_relays_reason() -> None:
    forward, conn, link = runner()
    why = "service echo2:7 is not granted to agent lab_pc"
    with capturedLogs() as logs:
        conn.replies[0].errback(RefusedWithReason(b"", RefusalNote(FORWARD, "echo2", 7, why)))
    assert forward.state is ForwardState.REFUSED
    assert forward.last_error == f"refused by the relay: {why}"
    assert forward.status()["last_error"] == f"refused by the relay: {why}"
    refused = [e for e in logs if e.get("event") == "forward_refused"]
    assert len(refused) == 1 and refused[0]["reason"] == f"refused by the relay: {why}"
    # Without a note (a stock sshd), or with one about something else: as before.
    link.clock.advance(1.0)
    conn.replies[1].errback(RefusedWithReason(b"", RefusalNote(FORWARD, "echo2", 8, "other")))
    assert forward.last_error == REFUSED_NO_REASON
    link.clock.advance(1.0)
    from twisted.conch.error import ConchError
    conn.replies[2].errback(ConchError("global request failed", b""))
    assert forward.last_error == REFUSED_NO_REASON and forward.failures == 3


def test_a_refused_cancel_is_logged_with_the_reason() -> None:
    forward, conn, _link = runner()
    conn.replies[0].callback(b"")
    assert forward.state is ForwardState.READY
    with capturedLogs() as logs:
        done = forward.cancel()
        conn.replies[1].errback(RefusedWithReason(
            b"", RefusalNote(CANCEL, "echo2", 7, "echo2:7 is not registered by this connection")))
    assert outcome(done) is None
    said = [e for e in logs if e.get("event") == "forward_cancel_refused"]
    assert [e["reason"] for e in said] == ["echo2:7 is not registered by this connection"]


def test_the_relays_reason_is_escaped_and_cut_like_any_peer_string() -> None:
    """The reason is the relay's text: the agent's log shows it as one line of printable
    characters, cut at a peer string's 200, however the relay wrote it."""
    from relay.ops.logfmt import FIELD_LIMIT, format_event, sanitize_event

    _forward, conn, _link = runner()
    why = "not granted\r\n2026-12-07 forward_ready fake\x1b[2J" + "x" * 1000
    with capturedLogs() as logs:
        conn.replies[0].errback(RefusedWithReason(b"", RefusalNote(FORWARD, "echo2", 7, why)))
    (event,) = [e for e in logs if e.get("event") == "forward_refused"]
    reason = sanitize_event(event)["reason"]
    assert reason.startswith("refused by the relay: not granted\\r\\n2026-12-07 forward_ready")
    assert "\x1b" not in reason and "\\x1b[2J" in reason
    assert reason.endswith("more chars]") and len(reason) < FIELD_LIMIT + 40
    line = format_event(sanitize_event(event))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
