"""The fixed world the fuzz targets run in: keys, grants, a relay core, transports.

Everything here is deterministic (fixed key seeds, fixed IVs, a memory reactor), so
a crashing input replays the same way on any machine.  The targets reach the code
under test only through what a peer reaches: ``dataReceived`` of the relay's SSH
transport, ``packetReceived`` of its connection service, ``RelayCore.globalRequest``
and the public parse functions of the wire modules.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh import keys
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher

from relay.config.schema import PrincipalConfig, RelayConfig, ServiceGrant
from relay.server.grants import Grants
from relay.server.relay import RelayCore
from relay.ssh import policy
from relay.ssh.server import RelayConnection, RelayFactory
from relay.ssh.serverauth import Identity, RelayAvatar
from relay.testing import FakeSSHTransport, FakeTCPTransport, new_key

CLIENT_VERSION = b"SSH-2.0-OpenSSH_9.6p1 Debian-4\r\n"


def fixed_key(seed: int) -> keys.Key:
    """An ed25519 key from a fixed seed: the same on every run."""
    return new_key(seed=seed).key


def key_line(seed: int, comment: str) -> str:
    return new_key(comment, seed=seed).line


HOST_KEY = fixed_key(1)
AGENT_KEY = fixed_key(2)
USER_KEY = fixed_key(3)
PUBLIC_PORT = 2201


def relay_config() -> RelayConfig:
    """An agent ``lab_pc`` (gpu-cluster:22, jupyter:*, public port 2201) and a user
    ``alice`` granted everything, with the fast path on (gpu-cluster:22 end-to-end)."""
    return RelayConfig(
        agents=(
            PrincipalConfig(
                "agent", "lab_pc", (key_line(2, "lab_pc"),),
                (ServiceGrant("gpu-cluster", 22), ServiceGrant("jupyter", None)),
                public_ports=(PUBLIC_PORT,),
            ),
        ),
        users=(PrincipalConfig("user", "alice", (key_line(3, "alice"),),
                               (ServiceGrant("*", None),)),),
        data_port=0,
        e2e_services=(ServiceGrant("gpu-cluster", 22),),
        idle_timeout=60,
    )


_CONFIG = relay_config()
_GRANTS = Grants(_CONFIG, "fuzz")


def new_core() -> tuple[RelayCore, MemoryReactorClock]:
    """A fresh relay core on a memory reactor, its data port listening (in memory).

    With grants of its own: a core subscribes to its ``Grants`` for reloads and
    nothing unsubscribes it (one core per relay process), so a shared ``Grants`` kept
    every input's core, connections and transports alive (RSS grew by ~2 MiB per
    thousand inputs, to 750 MiB in a minute of ``userauth``)."""
    clock = MemoryReactorClock()
    core = RelayCore(_CONFIG, Grants(_CONFIG, "fuzz"), clock)
    core.dataport.start()
    return core, clock


def identity(kind: str) -> Identity:
    key = AGENT_KEY if kind == "agent" else USER_KEY
    principal = _GRANTS.principal_for(key.public().blob())
    assert principal is not None
    return Identity(key.public().blob(), principal)


TCP = FakeTCPTransport  # the TCP options the relay sets, in memory


def new_transport(core: RelayCore) -> Any:
    """The relay's SSH server transport for one accepted connection, over a StringTransport.

    ``sendDisconnect`` calls are recorded in ``t.disconnects``."""
    factory = RelayFactory(core, {b"ssh-ed25519": HOST_KEY})
    factory.startFactory()
    t = factory.buildProtocol(None)
    assert t is not None
    disconnects: list[tuple[int, bytes]] = []
    send = t.sendDisconnect

    def recorded(reason: int, desc: bytes) -> None:
        disconnects.append((reason, desc))
        send(reason, desc)

    t.sendDisconnect = recorded
    t.disconnects = disconnects
    t.makeConnection(TCP())
    return t


SESSION_ID = bytes(range(32))


def after_strict_kex(t: Any) -> None:
    """Put the relay's transport ``t`` (past the version line) where a completed strict
    key exchange leaves it, without running one (a curve25519 exchange and a host-key
    signature per fuzz input would cost most of the budget).

    Through the seams the transport itself uses: its ``KexGuard`` is told of the peer's
    first KEXINIT (packet 0, with the strict-KEX marker) and its NEWKEYS, exactly the
    calls ``ssh_KEXINIT`` and the packet reader make; ``sessionID`` and
    ``keyExchanges`` are what ``_keySetup``/``_newKeys`` set.  The keys themselves do
    not matter to targets that call ``dispatchMessage``.
    ``test_fuzz_regressions.test_an_honest_client_still_gets_through_the_kex`` checks
    that a real exchange ends in this same state."""
    guard = t.kexGuard
    assert guard.kexinit_received([policy.CURVE25519, policy.STRICT_KEX_CLIENT], 0) is None
    guard.newkeys_received()
    assert guard.strict and not guard.initial
    t.sessionID = SESSION_ID
    t.keyExchanges = 1


def new_connection(core: RelayCore, kind: str) -> tuple[RelayConnection, FakeSSHTransport]:
    """An authenticated agent's or user's connection service on a fake SSH transport
    (what it sends is in ``link.packets``, its disconnects in ``link.disconnects``)."""
    conn = RelayConnection(core)
    link = FakeSSHTransport(TCP(), avatar=RelayAvatar(identity(kind)))
    conn.transport = link  # type: ignore[assignment]  # as Conch's transport.setService does
    conn.serviceStarted()
    return conn, link


def frame_plain(payload: bytes, pad: int | None = None) -> bytes:
    """One unencrypted SSH packet (before the first NEWKEYS), padded to 8 bytes."""
    if pad is None:
        pad = 8 - (5 + len(payload)) % 8
        pad += 8 if pad < 4 else 0
    body = bytes((pad,)) + payload + b"\x00" * pad
    return struct.pack(">L", len(body)) + body


class FailureLog:
    """Log events at level error or critical that carry a failure: "Unhandled Error",
    and ``log.failure`` of an exception the code did not expect.  (A failure logged as
    a warning was expected and handled, e.g. FlowConnection's ``malformed_packet``.)"""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self)

    def __call__(self, event: dict[str, Any]) -> None:
        if "log_failure" in event and event.get("log_level") in (LogLevel.error,
                                                                  LogLevel.critical):
            self.events.append(event)

    def take(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


FAILURES = FailureLog()
"""The one observer every target checks (``no_failures_logged``) at its end."""


def no_failures_logged() -> None:
    events = FAILURES.take()
    assert not events, "a failure was logged: " + "; ".join(
        repr(e["log_failure"].value) for e in events
    )


def records(data: bytes) -> list[tuple[int, bytes]]:
    """``data`` as ``(selector byte, payload)`` records: ``sel, len u16, payload``."""
    out = []
    at = 0
    while at + 3 <= len(data):
        sel = data[at]
        (n,) = struct.unpack_from(">H", data, at + 1)
        out.append((sel, data[at + 3 : at + 3 + n]))
        at += 3 + n
    return out
