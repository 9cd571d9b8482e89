"""What the fuzz targets found, pinned: each input as the fuzzer reduced it (also in
the corpus as ``regress-*``, replayed by test_fuzz_ci) and the behaviour now expected.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import fuzztargets as ft
import fuzzworld as world
import pytest
from twisted.conch.ssh import common
from twisted.conch.ssh.transport import DISCONNECT_PROTOCOL_ERROR

from relay.config.errors import ConfigError
from relay.config.sshoptions import _Flags, _option
from relay.core import fastwire as fw
from relay.server.grantfile import parse_grant_file

CORPUS = Path(__file__).resolve().parent / "corpus"


def regress(target: str, name: str, data: bytes) -> bytes:
    """The committed corpus file holds this input (so the fuzzer starts from it)."""
    path = CORPUS / target / f"regress-{name}"
    assert path.read_bytes() == data, f"{path} differs: run make_corpus.py"
    return data


def regress_file(target: str, name: str) -> bytes:
    """A ``regress-*`` corpus file saved as the fuzzer wrote it."""
    return (CORPUS / target / f"regress-{name}").read_bytes()


def relay_after_version() -> Any:
    """The relay's transport past the client's version line, before any key."""
    core, _clock = world.new_core()
    t = world.new_transport(core)
    t.dataReceived(world.CLIENT_VERSION)
    return t


# --- SSH transport ---------------------------------------------------------------


def test_truncated_kexinit_is_a_protocol_error_not_an_unhandled_error() -> None:
    """Conch's ssh_KEXINIT read 10 name-lists unchecked: struct.error out of
    dataReceived ("Unhandled Error", the TCP connection dropped without a reason).
    relay.ssh.guard turned it into "malformed message 20"; since the transport policy
    (relay.ssh.aead), the KEXINIT is parsed by ``policy.KexInit.parse`` before Conch
    sees it, and the disconnect says what is wrong with it."""
    data = regress("transport_packets", "truncated-kexinit", b"\x01" + bytes((20, 0, 3)) + b"abc")
    t = relay_after_version()
    t.dataReceived(world.frame_plain(b"\x14abc"))
    assert t.disconnects == [(DISCONNECT_PROTOCOL_ERROR, b"KEXINIT shorter than its cookie")]
    assert t.transport.disconnecting
    ft.transport_packets(data)


def test_kex_message_before_kexinit_is_refused() -> None:
    """A KEX_ECDH_INIT before any KEXINIT made Conch read the negotiated kexAlg, which
    does not exist yet: AttributeError out of dataReceived."""
    data = regress("transport_packets", "ecdh-before-kexinit",
                   b"\x01" + bytes((30, 0, 36)) + common.NS(bytes(32)))
    t = relay_after_version()
    t.dataReceived(world.frame_plain(b"\x1e" + common.NS(bytes(32))))
    assert t.disconnects == [(DISCONNECT_PROTOCOL_ERROR, b"malformed message 30")]
    ft.transport_packets(data)


def test_newkeys_outside_a_key_exchange_is_refused() -> None:
    t = relay_after_version()
    t.dataReceived(world.frame_plain(b"\x15"))
    assert t.disconnects == [(DISCONNECT_PROTOCOL_ERROR, b"malformed message 21")]


def test_no_packet_is_read_before_the_version_line() -> None:
    """Conch searched for "\\n" from find(b"SSH-") == -1, i.e. looked at the last byte
    only: a buffer without any version line that ends in a newline was parsed as
    packets and dispatched before the version exchange."""
    packet = world.frame_plain(b"\x14" + b"\x00" * 16 + b"\x00\x00\x00\x00" * 10 + b"\x00" * 5)
    data = regress("transport_banner", "packet-before-version", b"\x00" + packet + b"\n")
    core, _clock = world.new_core()
    t = world.new_transport(core)
    dispatched = []
    t.dispatchMessage = lambda n, p: dispatched.append(n)
    t.dataReceived(packet + b"\n")
    assert dispatched == [] and not t.gotVersion
    # Since the relay refuses a client's line that is not its version line (sshd does):
    # at once, without reading further.
    assert t.disconnects == [(DISCONNECT_PROTOCOL_ERROR, b"not an SSH version line")]
    assert t.transport.disconnecting
    ft.transport_banner(data)
    # A version line that never ends: Conch's 4 KiB limit.
    t = world.new_transport(core)
    t.dataReceived(b"SSH-2.0-" + b"x" * 4096)
    assert not t.gotVersion and t.disconnects and t.transport.disconnecting


def test_an_honest_client_still_gets_through_the_kex() -> None:
    """The guard only refuses what is out of place: a real KEXINIT and ECDH_INIT get
    the relay's KEX_ECDH_REPLY and NEWKEYS."""
    import make_corpus

    t = relay_after_version()
    sent = len(t.transport.value())
    t.dataReceived(world.frame_plain(make_corpus.KEXINIT))
    t.dataReceived(world.frame_plain(b"\x1e" + common.NS(bytes(range(1, 33)))))
    assert not t.disconnects
    assert len(t.transport.value()) > sent + 100  # the reply, signed with the host key
    t.dataReceived(world.frame_plain(b"\x15"))  # NEWKEYS after the exchange: accepted
    assert not t.disconnects and t.keyExchanges == 1
    # The state world.after_strict_kex gives the userauth target without an exchange:
    assert t.kexGuard.strict and not t.kexGuard.initial and t.sessionID is not None
    assert t.incomingPacketSequence == 0  # strict KEX: restarted at NEWKEYS
    t.dispatchMessage(5, common.NS(b"ssh-userauth"))  # now a service may start
    assert not t.disconnects and t.service is not None


# --- fast path -------------------------------------------------------------------


@pytest.mark.parametrize("port", [b"218888", b"65536", b"9" * 5000])
def test_pool_request_ports_past_65535_are_wire_errors(port: bytes) -> None:
    """``int(port)`` took any digit string: ports past 65535 were accepted (and a
    5000-digit one raised ValueError, which poolRequest's ``except WireError`` missed:
    a failure logged for every such request)."""
    body = struct.pack(">LL", 1, 1) + common.NS(b"juper:" + port)
    if port == b"218888":
        regress("fastwire_ssh", "pool-port-218888", b"\x02" + body)
    with pytest.raises(fw.WireError):
        fw.unpack_pool_request(body)


# --- grant files and -o ------------------------------------------------------------


@pytest.mark.parametrize(("kind", "option"), [
    ("agent", 'permitlisten="²"'),
    ("user", 'max-sessions="²"'),
    ("agent", 'permitlisten="1' + "0" * 5000 + '"'),
    ("agent", 'permitlisten="gpu:1' + "0" * 5000 + '"'),
])
def test_unicode_and_huge_numbers_in_grants_are_config_errors(kind: str, option: str) -> None:
    """``str.isdigit`` accepts "²", which ``int()`` refuses; ``int()`` refuses more than
    4300 digits: both were ValueError, not the ConfigError that names the line."""
    line = f"{option} {world.key_line(10, 'lab')}\n"
    if option == 'permitlisten="²"':
        regress("grant_file", "superscript-port", b"\x00" + line.encode())
    with pytest.raises(ConfigError, match="fuzz:1"):
        parse_grant_file(line, kind, "fuzz")


def test_time_option_does_not_backtrack() -> None:
    """``(?:[0-9]+[smhdw]?)+`` is ambiguous: 30 digits and a letter took minutes."""
    data = regress("agent_option", "redos", b"ServerAliveInterval=" + b"1" * 40 + b"x")
    started = time.process_time()
    with pytest.raises(ConfigError, match="expected seconds"):
        _option(_Flags(), data.decode())
    assert time.process_time() - started < 0.1


@pytest.mark.parametrize("text", [
    "ServerAliveInterval=" + "9" * 5000,
    "ConnectTimeout=99999999999999999999w",
    "ServerAliveCountMax=" + "9" * 5000,
    "IdentityFile=/tmp/a\x00b",
])
def test_agent_options_that_raised_other_errors(text: str) -> None:
    """Overflowing numbers (ValueError past 4300 digits, OverflowError in float()) and a
    NUL in a path (ValueError from pathlib): now ConfigError."""
    if "\x00" in text:
        regress("agent_option", "nul-in-path", text.encode())
    with pytest.raises(ConfigError):
        _option(_Flags(), text)


def test_times_in_range_still_parse() -> None:
    flags = _Flags()
    _option(flags, "ServerAliveInterval=1h30m5")
    _option(flags, "ConnectTimeout=0010s")
    assert flags.keepalive_interval == 5405 and flags.connect_timeout == 10


def test_services_before_the_first_key_exchange_are_refused() -> None:
    """Conch accepted ``SERVICE_REQUEST ssh-userauth`` in the clear, before any key
    exchange, and a publickey USERAUTH_REQUEST then failed an assert (no session id):
    an AssertionError out of dataReceived.  Found while building the transport target."""
    data = regress("transport_packets", "userauth-in-clear",
                   b"\x01" + bytes((5, 0, 16)) + common.NS(b"ssh-userauth"))
    t = relay_after_version()
    t.dataReceived(world.frame_plain(b"\x05" + common.NS(b"ssh-userauth")))
    assert t.disconnects == [(DISCONNECT_PROTOCOL_ERROR, b"malformed message 5")]
    assert t.service is None
    ft.transport_packets(data)


def test_non_ascii_key_data_in_a_grant_is_a_config_error() -> None:
    """``base64.b64decode(str, validate=True)`` raises ValueError, not binascii.Error,
    on non-ASCII text: a grant line with "é" in the key escaped as ValueError."""
    data = (CORPUS / "grant_file" / "regress-non-ascii-base64").read_bytes()
    line = world.key_line(10, "lab_pc")
    bad = line[:30] + "é" + line[31:]
    with pytest.raises(ConfigError, match="not base64"):
        parse_grant_file(bad + "\n", "agent", "fuzz")
    ft.grant_file(data)


def test_identity_file_of_an_unknown_users_home_is_a_config_error() -> None:
    """``Path("~nosuchuser/x").expanduser()`` raises RuntimeError."""
    data = (CORPUS / "agent_option" / "regress-tilde-unknown-user").read_bytes()
    with pytest.raises(ConfigError, match="no such user"):
        _option(_Flags(), "IdentityFile=~labrelay-no-such-user/id_ed25519")
    ft.agent_option(data)


def test_non_ascii_known_hosts_line_is_skipped(tmp_path: Path) -> None:
    """The same base64 trap in known_hosts: a line with "é" in the key made the agent's
    host-key check raise ValueError instead of skipping the line."""
    from relay.config.schema import HostKeyPolicy
    from relay.ssh.hostkeys import HostKeyVerifier

    key = world.HOST_KEY.public().toString("OPENSSH").decode()
    path = tmp_path / "known_hosts"
    path.write_text(f"cloud.example.org {key[:20]}é{key[21:]}\ncloud.example.org {key}\n")
    verifier = HostKeyVerifier(HostKeyPolicy(known_hosts=path), "cloud.example.org", 22)
    assert verifier.verify(world.HOST_KEY.public()).endswith("line 2")
    ft.known_hosts((CORPUS / "known_hosts" / "regress-non-ascii-base64").read_bytes())


def test_newkeys_after_an_ignored_kex_packet_is_refused() -> None:
    """A KEXINIT whose first_kex_packet_follows guessed wrong makes Conch ignore the
    next KEX packet; a NEWKEYS then switched the server to ciphers that have no keys,
    and the next packet raised AttributeError ("no attribute 'decryptor'")."""
    data = (CORPUS / "transport_packets" / "regress-newkeys-without-kex").read_bytes()
    import make_corpus

    t = relay_after_version()
    kexinit = make_corpus.KEXINIT[:-5] + b"\x01\x00\x00\x00\x00"  # a guessed packet follows
    t.dataReceived(world.frame_plain(kexinit))
    t.dataReceived(world.frame_plain(b"\x1e" + common.NS(bytes(range(1, 33)))))
    if not t.disconnects:  # the guess was judged wrong: the ECDH_INIT was ignored
        t.dataReceived(world.frame_plain(b"\x15") + b"\x00" * 64)
    assert t.disconnects and t.disconnects[-1][0] == DISCONNECT_PROTOCOL_ERROR
    ft.transport_packets(data)


def test_a_userauth_key_blob_that_looks_like_lsh_is_a_failed_attempt() -> None:
    """Conch's auth_publickey guessed the blob's format: "{...}" went to its LSH
    s-expression parser and an ``assert`` there (AssertionError out of dataReceived,
    before authentication).  Now: a refused attempt, the connection still usable."""
    data = regress_file("userauth", "lsh-looking-blob")
    core, _clock = world.new_core()
    t = world.new_transport(core)
    t.dataReceived(world.CLIENT_VERSION)
    world.after_strict_kex(t)
    t.dispatchMessage(5, common.NS(b"ssh-userauth"))
    assert not t.disconnects
    sent = []
    t.sendPacket = lambda n, p: sent.append(n)
    bad = (common.NS(b"alice") + common.NS(b"ssh-connection") + common.NS(b"publickey")
           + b"\x00" + common.NS(b"ssh-ed25519") + common.NS(b"{KDE6cHVibGljLWtleSg=}"))
    t.dispatchMessage(50, bad)
    assert sent == [51] and not t.disconnects  # USERAUTH_FAILURE
    t.dispatchMessage(50, ft.signed_userauth("user"))
    # USERAUTH_SUCCESS: alice gets in (then the relay announces its host keys, 80)
    assert sent[1:] == [52, 80] and t.authenticated
    ft.userauth(data)


def test_a_second_kexinit_within_a_key_exchange_is_refused() -> None:
    """Conch's ssh_KEXINIT raised RuntimeError ("Cannot send KEXINIT while key exchange
    state is '_KEY_EXCHANGE_PROGRESSING'") on a peer's second KEXINIT."""
    import make_corpus

    data = regress_file("transport_banner", "second-kexinit")
    t = relay_after_version()
    t.dataReceived(world.frame_plain(make_corpus.KEXINIT) * 2)
    assert t.disconnects == [(DISCONNECT_PROTOCOL_ERROR, b"malformed message 20")]
    ft.transport_banner(data)


def test_a_kex_message_of_another_method_is_refused() -> None:
    """Conch dispatches messages 30-49 by number whatever was negotiated: a
    KEX_DH_GEX_INIT (32) in a curve25519 exchange read a group that was never chosen
    (AttributeError 'p')."""
    import make_corpus

    data = regress_file("transport_packets", "gex-init-in-curve25519")
    t = relay_after_version()
    t.dataReceived(world.frame_plain(make_corpus.KEXINIT))
    t.dataReceived(world.frame_plain(b"\x20" + common.NS(b"\x81" * 8)))
    assert t.disconnects == [(DISCONNECT_PROTOCOL_ERROR, b"malformed message 32")]
    ft.transport_packets(data)


def test_nothing_is_parsed_or_sent_after_conchs_own_disconnect() -> None:
    """transport_banner (CI, 2026-12-05): within one read, Conch sent its own DISCONNECT
    for one packet and then went on asking for packets; a bad packet length after it
    made the relay write a second DISCONNECT to a connection already closing ("write
    after loseConnection").  Now the rest of such a read is neither parsed nor answered,
    on both paths: Conch's loop (``PeerInputGuard.getPacket``) and the relay's own
    (``_fatal``)."""
    t = relay_after_version()
    t.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"conch's own")  # as Conch does
    written = t.transport.value()
    t.dataReceived(struct.pack(">L", 0xFFFFFF00) + b"\x00" * 32)  # a bad packet length
    assert t.disconnects == [(DISCONNECT_PROTOCOL_ERROR, b"conch's own")]
    assert t.transport.value() == written
    assert t.getPacket() is None


# --- KRL -------------------------------------------------------------------------------


def test_a_krl_bitmap_is_kept_as_bits_not_expanded_serial_by_serial() -> None:
    """Writing the ``krl`` target (its invariant: nothing kept larger than the file):
    a serial bitmap was expanded bit by bit into a set of serials, each step shifting
    the whole bitmap (quadratic: 1.6 s for 32 KiB of ones, hours for the 2 MiB the
    parser allowed, and a set of 16 million ints).  Now the bitmap's bytes are kept and
    a serial is looked up in them."""
    import formattargets

    from relay.core import krl as k

    data = regress_file("krl", "bitmap-one-set-entry-per-bit")
    started = time.perf_counter()
    parsed = k.parse_krl(data)
    assert time.perf_counter() - started < 0.1
    (entry,) = parsed.certs.values()
    assert not entry.serials and [len(b.bits) for b in entry.bitmaps] == [4096]
    assert entry.match(0, b"") and entry.match(8 * 4096 - 1, b"")
    assert entry.match(8 * 4096, b"") is None
    formattargets.krl(data)
