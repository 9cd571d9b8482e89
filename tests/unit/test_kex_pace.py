"""The pace of key exchanges a peer starts (relay.ssh.kex.KexMixin.kexPacer), with a
Conch client and server in memory and a clock: past the burst, the peer's KEXINIT is
held, with everything it sent after it, until its turn; then the exchange and the held
packets go on in order.  A re-key the server starts itself is never held."""

from __future__ import annotations

import struct

from twisted.conch.ssh.transport import MSG_IGNORE
from twisted.internet import task

from relay.core.ratelimit import TokenBucket
from relay.ssh.kex import KEX_PACE_BURST, KEX_PACE_RATE, kex_pacer
from relay.testing import IgnoreRecorder, connect_in_memory, ssh_server
from relay.testing import TrustingSSHClient as Client


def _paced_pair(burst: int = 2) -> tuple[Client, object, object, task.Clock]:
    clock = task.Clock()
    server = ssh_server()
    server.kexClock = clock
    server.kexPacer = TokenBucket(1.0, burst, clock.seconds())
    client = Client()
    pump = connect_in_memory(server, client)
    return client, server, pump, clock


def test_rekeys_past_the_burst_wait_for_their_turn_and_then_go_on() -> None:
    client, server, pump, clock = _paced_pair(burst=2)
    at_server = IgnoreRecorder(server)
    assert server.keyExchanges == 1  # the first exchange is never paced
    for _ in range(2):  # the burst
        client.sendKexInit()
        pump.flush()
    assert server.keyExchanges == 3 and server.kexesPaced == 0

    client.sendKexInit()
    client.sendPacket(MSG_IGNORE, struct.pack(">L", 5) + b"after")  # queued by Conch
    pump.flush()
    assert server.keyExchanges == 3 and server.kexesPaced == 1 and server.kexInitHeld
    assert at_server.got == []
    clock.advance(0.5)
    pump.flush()
    assert server.keyExchanges == 3  # not yet
    clock.advance(0.5)
    pump.flush()
    assert server.keyExchanges == 4 and client.keyExchanges == 4
    assert at_server.got == [struct.pack(">L", 5) + b"after"]
    assert not server.transport.disconnecting and not client.transport.disconnecting


def test_a_rekey_the_server_starts_is_not_paced() -> None:
    _, server, pump, _ = _paced_pair(burst=1)
    for _ in range(3):
        server.sendKexInit()
        pump.flush()
    assert server.keyExchanges == 4 and server.kexesPaced == 0


def test_a_held_kexinit_goes_with_the_connection() -> None:
    client, server, pump, clock = _paced_pair(burst=1)
    client.sendKexInit()
    pump.flush()
    client.sendKexInit()
    pump.flush()
    assert server.kexInitHeld
    server.transport.loseConnection()
    pump.flush()
    assert not clock.getDelayedCalls()


def test_the_relays_pace() -> None:
    bucket = kex_pacer(0.0)
    waits = [bucket.charge(1, 0.0) for _ in range(KEX_PACE_BURST + 2)]
    assert waits[:KEX_PACE_BURST] == [0.0] * KEX_PACE_BURST
    assert waits[KEX_PACE_BURST:] == [1 / KEX_PACE_RATE, 2 / KEX_PACE_RATE]
