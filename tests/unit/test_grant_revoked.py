"""``grant-revoked@labrelay``: its wire format, and what the agent's forward does with it.

The relay sends it when a registration is dropped because the agent's key lost the
grant (docs/relay.md, "Reloading"); the agent logs it and asks again with backoff.
"""

from __future__ import annotations

import pytest

from relay.agent.forwards import ForwardState, RemoteForwardRunner
from relay.config.schema import HostPort, RemoteForward
from relay.ssh.wire import pack_grant_revoked, unpack_grant_revoked
from relay.testing import FakeLink, FakeLinkConnection


def test_round_trip_and_reason_bounded() -> None:
    assert unpack_grant_revoked(pack_grant_revoked("web", 8080, "gone")) == ("web", 8080, "gone")
    bind, port, why = unpack_grant_revoked(pack_grant_revoked("", 2201, "é" * 2000))
    assert (bind, port) == ("", 2201) and len(why.encode()) <= 1024


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x03web", b"\x00\x00\x00\x03web\x00\x00"])
def test_malformed_is_an_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        unpack_grant_revoked(data)


def test_a_revoked_forward_asks_again_with_backoff() -> None:
    link = FakeLink()
    runner = RemoteForwardRunner(link, RemoteForward("web", 8080, HostPort("127.0.0.1", 80), "web"),
                                 lambda failures: 2.0 * failures)  # type: ignore[arg-type]
    conn = FakeLinkConnection()
    runner.linkUp(conn)  # type: ignore[arg-type]
    conn.replies[0].callback(b"")
    assert runner.state is ForwardState.READY and runner.matches("web", 8080)
    why = "web:8080 is no longer granted to agent lab_pc"
    runner.revoked(why)
    assert runner.state is ForwardState.REFUSED and not runner.matches("web", 8080)
    assert runner.last_error == f"revoked by the relay: {why}"
    runner.revoked("twice")  # not ready: ignored
    assert runner.failures == 1
    link.clock.advance(2.0)
    assert len(conn.requests) == 2 and conn.requests[1][0] == b"tcpip-forward"
    runner.linkDown()
    assert link.clock.getDelayedCalls() == []
