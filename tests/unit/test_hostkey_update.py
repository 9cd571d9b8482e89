"""OpenSSH's host key update (``hostkeys-00`` / ``hostkeys-prove-00@openssh.com``):
the encoding and the prover (relay.ssh.hostkeyupdate), and the relay's connection
service announcing its keys and answering proofs, on Conch's doubles (a fake SSH
transport; real ``RelayConnection`` and ``RelayCore``).  The real OpenSSH client
learning a key: tests/integration/test_hostkey_rotation.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.conch.ssh import common, keys
from twisted.conch.ssh.connection import (
    MSG_GLOBAL_REQUEST,
    MSG_REQUEST_FAILURE,
    MSG_REQUEST_SUCCESS,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from relay.config.schema import RelayConfig
from relay.server.grants import Grants
from relay.server.relay import RelayCore
from relay.ssh.hostkeyupdate import (
    HOSTKEYS,
    HOSTKEYS_AGAIN,
    HOSTKEYS_PROVE,
    MAX_PROVE_KEYS,
    HostKeyProver,
    ProveRefused,
    pack_blobs,
    prove_signed_data,
    rsa_signature_type,
    unpack_blobs,
)
from relay.ssh.server import RelayConnection
from relay.ssh.serverauth import Identity, RelayAvatar
from relay.testing import FakeSSHTransport, FakeTCPTransport, KeyRing
from relay.testing.keys import new_key

SID = b"\x42" * 32


def _rsa() -> keys.Key:
    return keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _signatures(payload: bytes) -> list[bytes]:
    return unpack_blobs(payload, limit=1000)


# --- encoding -------------------------------------------------------------------------


def test_blobs_round_trip_in_order() -> None:
    blobs = [new_key().blob, b"", new_key().blob]
    assert unpack_blobs(pack_blobs(blobs)) == blobs
    assert unpack_blobs(b"") == []


@pytest.mark.parametrize("data", [
    b"\x00\x00\x00",                       # a length cut short
    b"\x00\x00\x00\x05abc",                # a string longer than the request
    common.NS(b"abc") + b"\x00",           # bytes after the last string
    b"\xff\xff\xff\xff" + b"x" * 8,        # a length of 4 GiB
])
def test_malformed_payloads_are_refused(data: bytes) -> None:
    with pytest.raises(ProveRefused):
        unpack_blobs(data)


def test_more_than_the_bound_is_refused_before_reading_on() -> None:
    assert len(unpack_blobs(pack_blobs([b"k"] * MAX_PROVE_KEYS))) == MAX_PROVE_KEYS
    with pytest.raises(ProveRefused, match="more than"):
        unpack_blobs(pack_blobs([b"k"] * (MAX_PROVE_KEYS + 1)))


# --- the prover -------------------------------------------------------------------------


def test_announces_every_key_the_current_one_first_and_each_once() -> None:
    current, nxt = new_key().key, new_key().key
    prover = HostKeyProver([current, nxt, current])
    assert prover.blobs == [current.public().blob(), nxt.public().blob()]
    assert unpack_blobs(prover.announcement()) == prover.blobs


def test_each_signature_verifies_over_the_session_and_the_key_in_request_order() -> None:
    current, nxt = new_key().key, new_key().key
    prover = HostKeyProver([current, nxt])
    request = pack_blobs([nxt.public().blob(), current.public().blob()])
    sigs = _signatures(prover.prove(request, SID, b"ssh-ed25519", [b"ssh-ed25519"]))
    assert len(sigs) == 2
    for key, sig in zip((nxt, current), sigs, strict=True):
        blob = key.public().blob()
        assert key.public().verify(sig, prove_signed_data(SID, blob))
        # bound to this session: another session's identifier does not verify
        assert not key.public().verify(sig, prove_signed_data(b"\x43" * 32, blob))
    # the signed data is exactly PROTOCOL §2.5's
    blob = nxt.public().blob()
    assert prove_signed_data(SID, blob) == (
        common.NS(b"hostkeys-prove-00@openssh.com") + common.NS(SID) + common.NS(blob))


def test_an_empty_request_is_answered_with_no_signatures() -> None:
    assert HostKeyProver([new_key().key]).prove(b"", SID, b"ssh-ed25519", ()) == b""


@pytest.mark.parametrize("forged", ["unknown key", "twice", "garbage", "public of other type"])
def test_a_request_for_a_key_the_relay_does_not_hold_is_refused(forged: str) -> None:
    current = new_key().key
    prover = HostKeyProver([current])
    mine = current.public().blob()
    request = {
        "unknown key": pack_blobs([mine, new_key().blob]),
        "twice": pack_blobs([mine, mine]),
        "garbage": pack_blobs([b"\x00\x00\x00\x0bssh-ed25519garbage"]),
        "public of other type": pack_blobs([_rsa().public().blob()]),
    }[forged]
    with pytest.raises(ProveRefused):
        prover.prove(request, SID, b"ssh-ed25519", [b"ssh-ed25519"])


@pytest.mark.parametrize(("kex_alg", "client_algs", "expected"), [
    (b"rsa-sha2-256", [b"rsa-sha2-512", b"rsa-sha2-256"], b"rsa-sha2-256"),  # the kex's
    (b"ssh-ed25519", [b"ssh-ed25519", b"rsa-sha2-512", b"rsa-sha2-256"], b"rsa-sha2-512"),
    (b"ssh-ed25519", [b"ssh-ed25519", b"rsa-sha2-256"], b"rsa-sha2-256"),
    (b"ssh-ed25519", [b"ssh-ed25519", b"ssh-rsa"], None),  # never SHA-1
])
def test_rsa_signature_type_as_sshd_chooses_it(kex_alg: bytes, client_algs: list[bytes],
                                               expected: bytes | None) -> None:
    assert rsa_signature_type(kex_alg, client_algs) == expected


def test_an_rsa_next_key_is_signed_with_the_sha2_algorithm_the_client_offered() -> None:
    current, nxt = new_key().key, _rsa()
    prover = HostKeyProver([current, nxt])
    blob = nxt.public().blob()
    sig = _signatures(prover.prove(pack_blobs([blob]), SID, b"ssh-ed25519",
                                   [b"ssh-ed25519", b"rsa-sha2-256"]))[0]
    assert common.getNS(sig)[0] == b"rsa-sha2-256"
    assert nxt.public().verify(sig, prove_signed_data(SID, blob))
    with pytest.raises(ProveRefused, match="rsa-sha2"):
        prover.prove(pack_blobs([blob]), SID, b"ssh-ed25519", [b"ssh-ed25519", b"ssh-rsa"])


# --- the relay's connection service -----------------------------------------------------


class Relay:
    """A relay core with the user alice, and real connection services on fake SSH
    transports whose factory holds the current and next host keys."""

    def __init__(self) -> None:
        self.ring = KeyRing()
        config = RelayConfig(users=(self.ring.user("alice", "gpu-cluster:22"),))
        self.grants = Grants(config, "test")
        self.core = RelayCore(config, self.grants, MemoryReactorClock())
        self.current, self.next = new_key().key, new_key().key
        self.prover = HostKeyProver([self.current, self.next])

    def connect(self, client_kexinit: bytes = b"") -> tuple[RelayConnection, Any]:
        principal = self.grants.principal_for(self.ring.blob("alice"))
        assert principal is not None
        link: Any = FakeSSHTransport(FakeTCPTransport(),
                                     avatar=RelayAvatar(Identity(self.ring.blob("alice"),
                                                                 principal)))
        link.otherVersionString = b"SSH-2.0-OpenSSH_9.2p1"
        link.factory = SimpleNamespace(hostKeyProver=self.prover)
        link.sessionID = SID
        link.keyAlg = b"ssh-ed25519"
        link.otherKexInitPayload = client_kexinit
        conn = RelayConnection(self.core)
        conn.transport = link
        conn.serviceStarted()
        return conn, link


def _ask(conn: RelayConnection, data: bytes) -> None:
    conn.packetReceived(MSG_GLOBAL_REQUEST, common.NS(HOSTKEYS_PROVE) + b"\x01" + data)


def test_the_keys_are_announced_first_thing_after_login_and_want_no_reply() -> None:
    relay = Relay()
    _, link = relay.connect()
    kind, payload = link.packets[0]
    assert kind == MSG_GLOBAL_REQUEST
    name, rest = common.getNS(payload)
    assert name == HOSTKEYS
    assert rest[:1] == b"\x00"  # want-reply false, as sshd sends it
    assert unpack_blobs(rest[1:]) == [relay.current.public().blob(),
                                      relay.next.public().blob()]


def test_a_proof_is_answered_with_signatures() -> None:
    relay = Relay()
    conn, link = relay.connect()
    link.packets.clear()
    blob = relay.next.public().blob()
    _ask(conn, pack_blobs([blob]))
    assert link.kinds() == [MSG_REQUEST_SUCCESS]
    (sig,) = _signatures(link.of(MSG_REQUEST_SUCCESS)[0])
    assert relay.next.public().verify(sig, prove_signed_data(SID, blob))


def test_a_forged_proof_request_fails_and_the_connection_goes_on() -> None:
    relay = Relay()
    conn, link = relay.connect()
    link.packets.clear()
    _ask(conn, pack_blobs([new_key().blob]))          # a key the relay does not hold
    _ask(conn, b"\x00\x00\x01\x00garbage")            # not even a string
    _ask(conn, pack_blobs([relay.next.public().blob()] * (MAX_PROVE_KEYS + 1)))
    _ask(conn, pack_blobs([relay.current.public().blob()]))  # still answered
    assert link.kinds() == [MSG_REQUEST_FAILURE] * 3 + [MSG_REQUEST_SUCCESS]
    assert link.disconnects == []
    assert not link.transport.disconnecting
    assert relay.core.counters["requests_refused"] == 3


def test_a_transport_without_a_prover_announces_nothing() -> None:
    """Conch's own factories (and older tests' fakes) hold no prover: no announce."""
    relay = Relay()
    principal = relay.grants.principal_for(relay.ring.blob("alice"))
    link: Any = FakeSSHTransport(FakeTCPTransport(), avatar=RelayAvatar(
        Identity(relay.ring.blob("alice"), principal)))
    conn = RelayConnection(relay.core)
    conn.transport = link
    conn.serviceStarted()
    assert MSG_GLOBAL_REQUEST not in link.kinds()


# --- the next key's file (relay.server.hostkeyfile) ---------------------------------------


def test_next_host_key_is_read_relative_to_the_config(tmp_path: Path) -> None:
    from relay.config.loader import parse_config

    config = parse_config('[relay]\nstate_dir = "state"\nnext_host_key = "next/key"\n',
                          "t.toml", base_dir=tmp_path)
    assert config.relay is not None
    assert config.relay.next_host_key == tmp_path / "next" / "key"
    plain = parse_config("[relay]\n", "t.toml", base_dir=tmp_path).relay
    assert plain is not None and plain.next_host_key is None


# --- the agent's side: told, not learning ---------------------------------------------


def _agent_told(tmp_path: Path, known: list[keys.Key], announced: list[keys.Key],
                pin: keys.Key | None = None) -> list[dict[str, Any]]:
    from twisted.logger import capturedLogs

    from relay.config.schema import HostKeyPolicy
    from relay.ssh.client import LinkConnection
    from relay.ssh.hostkeys import HostKeyVerifier, fingerprint_sha256

    kh = tmp_path / "known_hosts"
    kh.write_text("".join(f"[relay.example]:2222 {k.public().toString('OPENSSH').decode()}\n"
                          for k in known))
    policy = (HostKeyPolicy(fingerprint=fingerprint_sha256(pin)) if pin is not None
              else HostKeyPolicy(known_hosts=kh))
    link: Any = SimpleNamespace(name="cloud", clock=Clock(),
                                verifier=HostKeyVerifier(policy, "relay.example", 2222))
    before = kh.read_bytes()
    with capturedLogs() as events:
        for _ in range(2):  # a reconnect: said once per link
            assert LinkConnection(link).gotGlobalRequest(
                HOSTKEYS, pack_blobs(k.public().blob() for k in announced))
        LinkConnection(link).gotGlobalRequest(HOSTKEYS, b"\x00\x00\x00\x09garbage")
    assert kh.read_bytes() == before  # the agent never writes an announced key
    return [e for e in events if e.get("event") == "link_hostkey_announced"]


def test_the_agent_says_which_announced_key_it_would_refuse_with_the_line_to_add(
        tmp_path: Path) -> None:
    from relay.ssh.hostkeys import fingerprint_sha256

    current, nxt = new_key().key, new_key().key
    told = _agent_told(tmp_path, [current], [current, nxt])
    assert [e["fingerprint"] for e in told] == [fingerprint_sha256(nxt)]
    assert told[0]["line"] == ("[relay.example]:2222 "
                               + nxt.public().toString("OPENSSH").decode())
    assert _agent_told(tmp_path, [current, nxt], [current, nxt]) == []  # given it: quiet
    pinned = _agent_told(tmp_path, [], [current, nxt], pin=current)
    assert [e["fingerprint"] for e in pinned] == [fingerprint_sha256(nxt)]


def _agent_link(tmp_path: Path, current: keys.Key,
                learns: bool = True) -> tuple[Any, Any, Path]:
    """A LinkConnection on a fake transport whose link verified ``current`` from its
    first known_hosts file, as a real link does before login."""
    from relay.config.schema import HostKeyPolicy
    from relay.ssh.client import LinkConnection
    from relay.ssh.hostkeys import HostKeyVerifier

    kh = tmp_path / "known_hosts"
    kh.write_text(f"[relay.example]:2222 {current.public().toString('OPENSSH').decode()}\n")
    verifier = HostKeyVerifier(HostKeyPolicy(known_hosts=kh), "relay.example", 2222)
    verifier.verify(current.public())
    link: Any = SimpleNamespace(name="cloud", verifier=verifier, learnHostKeys=learns,
                                clock=Clock())
    conn = LinkConnection(link)
    fake: Any = FakeSSHTransport(FakeTCPTransport())
    fake.sessionID = SID
    conn.transport = fake
    return conn, fake, kh


def test_the_agent_learns_a_proven_next_key_beside_the_current_one(tmp_path: Path) -> None:
    from twisted.logger import capturedLogs

    current, nxt = new_key().key, new_key().key
    conn, fake, kh = _agent_link(tmp_path, current)
    prover = HostKeyProver([current, nxt])
    with capturedLogs() as events:
        conn.gotGlobalRequest(HOSTKEYS, prover.announcement())
        (asked,) = fake.of(MSG_GLOBAL_REQUEST)
        name, rest = common.getNS(asked)
        assert name == HOSTKEYS_PROVE and rest[:1] == b"\xff"  # reply wanted
        assert unpack_blobs(rest[1:]) == [nxt.public().blob()]  # only the one it lacks
        conn.ssh_REQUEST_SUCCESS(prover.prove(rest[1:], SID, b"ssh-ed25519", ()))
    assert [e["event"] for e in events if e.get("event", "").startswith("link_hostkey")] \
        == ["link_hostkey_learned"]
    lines = kh.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("|1|")  # appended, hashed, old kept
    assert conn.link.verifier.verify(nxt.public()).startswith("known_hosts")


@pytest.mark.parametrize("answer", ["other session", "wrong key", "cut", "refused"])
def test_the_agent_records_nothing_the_relay_did_not_prove(tmp_path: Path,
                                                           answer: str) -> None:
    from twisted.logger import capturedLogs

    current, nxt = new_key().key, new_key().key
    conn, _fake, kh = _agent_link(tmp_path, current)
    before = kh.read_bytes()
    blob = nxt.public().blob()
    with capturedLogs() as events:
        conn.gotGlobalRequest(HOSTKEYS, pack_blobs([current.public().blob(), blob]))
        if answer == "refused":
            conn.ssh_REQUEST_FAILURE(b"")
        else:
            signer = current if answer == "wrong key" else nxt
            sid = b"\x43" * 32 if answer == "other session" else SID
            sig = signer.sign(prove_signed_data(sid, blob))
            conn.ssh_REQUEST_SUCCESS(pack_blobs([sig])[:-3] if answer == "cut"
                                     else pack_blobs([sig]))
    assert kh.read_bytes() == before
    assert [e["event"] for e in events if e.get("event", "").startswith("link_hostkey")] \
        == ["link_hostkey_unproven"]


def test_refused_proofs_in_a_loop_are_one_line_then_a_count(tmp_path: Path) -> None:
    """Round 19: ``hostkeys-again@labrelay`` is taken as often as it comes; a relay
    that announces a key and refuses its proof in a loop made one warning each."""
    from twisted.logger import capturedLogs

    from relay.ssh.client import UNPROVEN_WINDOW

    current = new_key().key
    conn, _fake, _kh = _agent_link(tmp_path, current)
    with capturedLogs() as events:
        for _ in range(50):
            conn.gotGlobalRequest(HOSTKEYS_AGAIN, pack_blobs([current.public().blob(),
                                                               new_key().key.public().blob()]))
            conn.ssh_REQUEST_FAILURE(b"")
        conn.link.clock.advance(UNPROVEN_WINDOW)
    unproven = [e for e in events if e.get("event") == "link_hostkey_unproven"]
    assert len(unproven) == 2 and unproven[1]["count"] == 49


def test_a_pinned_agent_asks_for_no_proof(tmp_path: Path) -> None:
    current, nxt = new_key().key, new_key().key
    told = _agent_told(tmp_path, [], [current, nxt], pin=current)
    assert len(told) == 1


def test_labrelay_connect_learns_nothing(tmp_path: Path) -> None:
    """``labrelay connect`` (SingleConnection.learnHostKeys False) asks no proof and
    writes nothing; it says which key it would refuse, as a pinned agent does."""
    from relay.ssh.single import SingleConnection

    assert SingleConnection.learnHostKeys is False
    current, nxt = new_key().key, new_key().key
    conn, fake, kh = _agent_link(tmp_path, current, learns=False)
    before = kh.read_bytes()
    conn.gotGlobalRequest(HOSTKEYS, pack_blobs([current.public().blob(), nxt.public().blob()]))
    assert fake.of(MSG_GLOBAL_REQUEST) == [] and kh.read_bytes() == before


def test_only_the_first_announcement_of_a_connection_is_handled(tmp_path: Path) -> None:
    """As ssh (which ends the connection on a second one): a relay repeating it cannot
    make the agent ask proof after proof."""
    current, nxt = new_key().key, new_key().key
    conn, fake, _ = _agent_link(tmp_path, current)
    announced = pack_blobs([current.public().blob(), nxt.public().blob()])
    for _ in range(3):
        conn.gotGlobalRequest(HOSTKEYS, announced)
    assert len(fake.of(MSG_GLOBAL_REQUEST)) == 1


# --- told again after a reload (hostkeys-again@labrelay) ---------------------------------


def _relay_peer(relay: Relay, kind: str, version: bytes) -> tuple[RelayConnection, Any]:
    """A connection service of an agent (lab_pc) or user (alice) whose version line is
    ``version``, its login announcement cleared."""
    name = "lab_pc" if kind == "agent" else "alice"
    principal = relay.grants.principal_for(relay.ring.blob(name))
    assert principal is not None and principal.kind == kind
    link: Any = FakeSSHTransport(FakeTCPTransport(), avatar=RelayAvatar(
        Identity(relay.ring.blob(name), principal)))
    link.otherVersionString = version
    link.factory = SimpleNamespace(hostKeyProver=relay.prover)
    conn = RelayConnection(relay.core)
    conn.transport = link
    conn.serviceStarted()
    link.packets.clear()
    return conn, link


def test_a_reload_tells_connected_labrelay_agents_only() -> None:
    """OpenSSH's client ends a connection told ``hostkeys-00`` twice: the relay tells
    again only a labrelay agent, under a name of its own, no reply wanted."""
    relay = Relay()
    config = RelayConfig(users=(relay.ring.user("alice", "gpu-cluster:22"),),
                         agents=(relay.ring.agent("lab_pc", "gpu-cluster:22"),))
    relay.grants = Grants(config, "test")
    relay.core = RelayCore(config, relay.grants, MemoryReactorClock())
    ours = b"SSH-2.0-labrelay_0.3.0"
    agent, agent_link = _relay_peer(relay, "agent", ours)
    stock, stock_link = _relay_peer(relay, "agent", b"SSH-2.0-OpenSSH_9.2p1")
    user, user_link = _relay_peer(relay, "user", ours)  # labrelay connect
    assert [c.reannounceHostKeys() for c in (agent, stock, user)] == [True, False, False]
    assert stock_link.packets == [] and user_link.packets == []
    ((kind, payload),) = agent_link.packets
    name, rest = common.getNS(payload)
    assert (kind, name, rest[:1]) == (MSG_GLOBAL_REQUEST, HOSTKEYS_AGAIN, b"\x00")
    assert unpack_blobs(rest[1:]) == relay.prover.blobs
    agent.serviceStopped()
    assert agent.reannounceHostKeys() is False  # nothing sent on a stopped connection


def test_the_agent_learns_a_key_told_again_after_its_login(tmp_path: Path) -> None:
    """Told only the current key at login, the agent learns the next one from the
    relay's later ``hostkeys-again@labrelay``; one proof out at a time."""
    current, nxt = new_key().key, new_key().key
    conn, fake, kh = _agent_link(tmp_path, current)
    conn.gotGlobalRequest(HOSTKEYS, HostKeyProver([current]).announcement())
    assert fake.of(MSG_GLOBAL_REQUEST) == []  # nothing to learn at login
    prover = HostKeyProver([current, nxt])
    assert conn.gotGlobalRequest(HOSTKEYS_AGAIN, prover.announcement()) == 1
    conn.gotGlobalRequest(HOSTKEYS_AGAIN, prover.announcement())  # while the proof is out
    (asked,) = fake.of(MSG_GLOBAL_REQUEST)
    name, rest = common.getNS(asked)
    assert name == HOSTKEYS_PROVE and unpack_blobs(rest[1:]) == [nxt.public().blob()]
    conn.ssh_REQUEST_SUCCESS(prover.prove(rest[1:], SID, b"ssh-ed25519", ()))
    assert len(kh.read_text().splitlines()) == 2
    assert conn.link.verifier.verify(nxt.public()).startswith("known_hosts")
    # Told again once it knows it: nothing asked.
    fake.packets.clear()
    conn.gotGlobalRequest(HOSTKEYS_AGAIN, prover.announcement())
    assert fake.of(MSG_GLOBAL_REQUEST) == []


_CURRENT = new_key().key
# an "RSA key" of 40 000 bits (a random odd modulus: it parses), past any host key
_HUGE = (common.NS(b"ssh-rsa") + common.MP(65537)
         + common.MP(int.from_bytes(bytes(range(256)) * 20, "big") | 1 | (1 << 40_959)))
_BLOBS = [new_key().key.public().blob() for _ in range(3)] + [_CURRENT.public().blob(), _HUGE]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=2048),
    st.lists(st.one_of(st.sampled_from(_BLOBS), st.binary(max_size=64),
                       st.binary(min_size=4097, max_size=5000)), max_size=40).map(pack_blobs),
    st.tuples(st.lists(st.sampled_from(_BLOBS), max_size=20).map(pack_blobs),
              st.binary(max_size=8)).map(lambda t: t[0] + t[1]),
))
def test_any_announcement_from_a_relay_is_bounded(tmp_path: Path, payload: bytes) -> None:
    """Round 19's property (no fuzz target had it): whatever a relay announces
    (``hostkeys-00``, ``hostkeys-again``), the agent raises nothing, asks at most one
    proof of at most ``MAX_LEARNED_HOST_KEYS`` keys, each of a host key's size, and
    writes nothing unproven."""
    from relay.ssh.client import MAX_HOST_KEY_BLOB
    from relay.ssh.hostkeys import MAX_LEARNED_HOST_KEYS

    conn, fake, kh = _agent_link(tmp_path, _CURRENT)
    before = kh.read_bytes()
    for kind in (HOSTKEYS, HOSTKEYS_AGAIN, HOSTKEYS_AGAIN):
        assert conn.gotGlobalRequest(kind, payload) == 1
    asked = fake.of(MSG_GLOBAL_REQUEST)
    assert len(asked) <= 1
    for packet in asked:
        _name, rest = common.getNS(packet)
        blobs = unpack_blobs(rest[1:], limit=100)
        assert len(blobs) <= MAX_LEARNED_HOST_KEYS
        assert all(len(b) <= MAX_HOST_KEY_BLOB for b in blobs)
    if asked:
        conn.ssh_REQUEST_FAILURE(b"")
    assert kh.read_bytes() == before
