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


def _user_pair(shared: TokenBucket, clock: task.Clock) -> tuple[Client, object, object]:
    server = ssh_server()
    server.kexClock = clock
    server.kexPacer = TokenBucket(1.0, 16, clock.seconds())
    server.kexUserPacer = shared
    client = Client()
    pump = connect_in_memory(server, client)
    return client, server, pump


def test_a_users_connections_share_one_pace() -> None:
    """Round 17: the per-connection pace let a user with many connections have many
    bursts and many re-keys a second.  Four connections of one user, a shared bucket
    of 2 at once and 1 a second: the third re-key of hers, on whichever connection,
    waits, though each connection's own bucket has tokens left; then they go in turn,
    one a second, and all complete."""
    clock = task.Clock()
    shared = TokenBucket(1.0, 2, clock.seconds())
    pairs = [_user_pair(shared, clock) for _ in range(4)]
    for client, _, pump in pairs:
        client.sendKexInit()
        pump.flush()
    servers = [server for _, server, _ in pairs]
    assert [s.keyExchanges for s in servers] == [2, 2, 1, 1]
    assert [s.kexInitHeld for s in servers] == [False, False, True, True]
    clock.advance(1.0)
    for _, _, pump in pairs:
        pump.flush()
    assert [s.keyExchanges for s in servers] == [2, 2, 2, 1]  # one a second, in turn
    clock.advance(1.0)
    for _, _, pump in pairs:
        pump.flush()
    assert [s.keyExchanges for s in servers] == [2, 2, 2, 2]
    assert all(c.keyExchanges == 2 for c, _, _ in pairs)
    assert not any(s.transport.disconnecting for s in servers)


def test_without_a_user_pace_a_connection_keeps_its_own() -> None:
    """Before authentication (no ``kexUserPacer``) only the connection's pace applies."""
    client, server, pump, _ = _paced_pair(burst=3)
    for _ in range(3):
        client.sendKexInit()
        pump.flush()
    assert server.keyExchanges == 4 and server.kexesPaced == 0


def test_the_relays_user_pace_is_kept_with_her_turn_share() -> None:
    """The relay's shared bucket is the user's turn share's: one per user, the same
    for every connection of hers, fresh for another user."""
    from twisted.internet.testing import MemoryReactorClock

    from relay.ssh.kex import USER_KEX_PACE_BURST, USER_KEX_PACE_RATE
    from relay.ssh.turnshare import UserTurnShares

    shares = UserTurnShares(MemoryReactorClock(), 128)
    alice = shares.of("alice")
    assert shares.of("alice").kexPacer is alice.kexPacer
    assert shares.of("bob").kexPacer is not alice.kexPacer
    assert (alice.kexPacer.rate, alice.kexPacer.burst) == (USER_KEX_PACE_RATE,
                                                           USER_KEX_PACE_BURST)
