"""A user asks for a tiny channel maximum packet (asyncssh, not our client).

SSH lets the receiver of a channel say how large a packet it takes; Conch refuses
only 0.  alice, a valid user, opened a channel to ``web:8080`` (an echo) with
``max_pktsize=1``: every byte the relay sent her was a packet of its own, and each
32 KiB packet the agent sent became 32 768 packets written in one reactor turn.  One
asyncssh client echoing 1 MiB that way cost the relay 4 s of CPU in 15 s and made
bob's 100-byte echoes through the same relay wait **up to 0.77 s** (p99 751 ms,
median 32 ms; 9-13 ms with her at 32 KiB).

Now the relay refuses an open (and an agent's confirmation) with a maximum packet
below 1024 bytes (``MIN_PEER_MAX_PACKET``, the floor of labrelay's own
``max_packet``; stock clients say 16-32 KiB): ``maximum packet size 1 is below
1024``.  At 1024 she is served, and bob's echo does not notice.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest
from conftest import Targets
from harness import AgentProcess, RelayNode
from test_greedy_user import _login, _world

pytestmark = [pytest.mark.integration, pytest.mark.security]

ECHOED = 256 * 1024


def test_a_tiny_maximum_packet_is_refused_and_the_floor_served(
    start_relay: Callable[..., RelayNode], start_agent: Callable[..., AgentProcess],
    targets: Targets, tmp_path: Path,
) -> None:
    relay, keys = _world(start_relay, start_agent, targets, tmp_path)
    bob = _login(relay, keys["bob"], "bob")
    ch = bob.open_channel("direct-tcpip", ("web", 8080), ("127.0.0.1", 1), timeout=20)
    ch.settimeout(20)
    stop, waits = threading.Event(), []

    def bob_echoes() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            ch.sendall(b"p" * 100)
            got = 0
            while got < 100:
                got += len(ch.recv(100 - got))
            waits.append(time.perf_counter() - t)
            stop.wait(0.01)

    async def alice() -> tuple[list[str], int]:
        refusals = []
        async with asyncssh.connect(
            "127.0.0.1", relay.port, username="alice", known_hosts=None,
            client_keys=[str(keys["alice"].path)],
        ) as conn:
            for size in (1, 64, 1023):
                with pytest.raises(asyncssh.ChannelOpenError) as refused:
                    await conn.open_connection("web", 8080, max_pktsize=size)
                refusals.append(refused.value.reason)
            reader, writer = await conn.open_connection("web", 8080, max_pktsize=1024)
            writer.write(b"x" * ECHOED)
            got = 0
            while got < ECHOED:
                got += len(await asyncio.wait_for(reader.read(65536), 20))
            return refusals, got

    bob_thread = threading.Thread(target=bob_echoes)
    bob_thread.start()
    try:
        refusals, echoed = asyncio.run(alice())
    finally:
        stop.set()
        bob_thread.join()
    waits.sort()
    print(f"\nrefused: {refusals}; {echoed} bytes echoed at 1024; bob {len(waits)} echoes, "
          f"median {statistics.median(waits) * 1000:.1f} ms, max {waits[-1] * 1000:.1f} ms")
    assert refusals == [f"maximum packet size {n} is below 1024" for n in (1, 64, 1023)]
    assert echoed == ECHOED
    assert waits and waits[-1] < 0.5, waits[-5:]
