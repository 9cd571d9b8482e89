"""The sniffer's sans-IO half (``sshsniff.Direction``, ``negotiate``): the interop
matrix trusts it to say what two peers agreed on, so it is checked here on crafted
bytes (the matrix also cross-checks it against four implementations' own reports)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from sshsniff import Direction, Kexinit, describe_refusal, negotiate


def name_list(names: list[str]) -> bytes:
    raw = ",".join(names).encode()
    return struct.pack(">I", len(raw)) + raw


def kexinit_payload(lists: dict[str, list[str]], follows: bool = False) -> bytes:
    order = ["kex", "host_key", "cipher_cs", "cipher_sc", "mac_cs", "mac_sc",
             "compression_cs", "compression_sc"]  # fmt: skip
    body = b"".join(name_list(lists.get(k, [])) for k in order)
    body += name_list([]) + name_list([])  # languages
    return bytes([20]) + b"\x00" * 16 + body + bytes([follows]) + b"\x00" * 4


def packet(payload: bytes) -> bytes:
    padding = 8 - (len(payload) + 5) % 8 + 4
    return struct.pack(">IB", len(payload) + padding + 1, padding) + payload + b"\x00" * padding


CLIENT = {
    "kex": ["mlkem768x25519-sha256", "curve25519-sha256", "ext-info-c",
            "kex-strict-c-v00@openssh.com"],
    "host_key": ["ssh-ed25519", "rsa-sha2-256"],
    "cipher_cs": ["chacha20-poly1305@openssh.com", "aes128-ctr"],
    "cipher_sc": ["aes128-ctr", "aes256-gcm@openssh.com"],
    "mac_cs": ["hmac-sha2-256"],
    "mac_sc": ["hmac-sha2-512", "hmac-sha2-256"],
    "compression_cs": ["none", "zlib@openssh.com"],
    "compression_sc": ["none"],
}  # fmt: skip
SERVER = {
    "kex": ["curve25519-sha256", "ext-info-c", "kex-strict-s-v00@openssh.com"],
    "host_key": ["rsa-sha2-256", "ssh-ed25519"],
    "cipher_cs": ["aes128-ctr", "chacha20-poly1305@openssh.com"],
    "cipher_sc": ["aes256-gcm@openssh.com", "aes128-ctr"],
    "mac_cs": ["hmac-sha2-256"],
    "mac_sc": ["hmac-sha2-256", "hmac-sha2-512"],
    "compression_cs": ["zlib@openssh.com", "none"],
    "compression_sc": ["none"],
}  # fmt: skip


def stream(lists: dict[str, list[str]], banner: bytes, tail: bytes = b"") -> bytes:
    return banner + packet(kexinit_payload(lists)) + packet(bytes([21])) + tail


def test_negotiation_is_the_clients_first_choice_the_server_has() -> None:
    c = Kexinit.parse(kexinit_payload(CLIENT))
    s = Kexinit.parse(kexinit_payload(SERVER))
    assert negotiate(c, s) == {
        "kex": "curve25519-sha256",  # ext-info-c is a signal, never an agreement
        "host_key": "ssh-ed25519",
        "cipher_cs": "chacha20-poly1305@openssh.com",
        "mac_cs": "<implicit>",  # AEAD
        "compression_cs": "none",
        "cipher_sc": "aes128-ctr",
        "mac_sc": "hmac-sha2-512",
        "compression_sc": "none",
        "strict_kex": True,
    }
    assert describe_refusal(c, s) == []


def test_nothing_in_common_is_named_with_both_offers() -> None:
    c = Kexinit.parse(kexinit_payload({**CLIENT, "cipher_sc": ["aes128-ctr"]}))
    s = Kexinit.parse(kexinit_payload({**SERVER, "cipher_sc": ["aes256-gcm@openssh.com"],
                                       "kex": ["curve25519-sha256"]}))  # fmt: skip
    agreed = negotiate(c, s)
    assert agreed["cipher_sc"] is None
    assert agreed["strict_kex"] is False  # the server did not announce it
    assert describe_refusal(c, s) == [
        "no common cipher_sc: client offers aes128-ctr; server offers aes256-gcm@openssh.com",
    ]


@given(st.data())
def test_any_split_of_the_bytes_reads_the_same(data: st.DataObject) -> None:
    """TCP delivers any split: banner lines before the identification, the KEXINIT,
    NEWKEYS, then ciphertext that must not be parsed."""
    raw = stream(CLIENT, b"hello\r\nSSH-2.0-Test_1.0 c\r\n", tail=b"\xff" * 64)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    d = Direction()
    for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        d.feed(raw[a:b])
    assert d.banner == "SSH-2.0-Test_1.0 c"
    assert d.kexinit == Kexinit.parse(kexinit_payload(CLIENT))
    assert d.newkeys and d.error is None and d.message_types == [20, 21]
    assert d.nbytes == len(raw)


def test_disconnect_before_encryption_is_kept() -> None:
    text = b"no matching cipher found"
    disconnect = bytes([1]) + struct.pack(">II", 3, len(text)) + text + struct.pack(">I", 0)
    d = Direction()
    d.feed(b"SSH-2.0-srv\r\n" + packet(kexinit_payload(SERVER)) + packet(disconnect))
    assert d.disconnect == (3, "no matching cipher found")
    assert d.done and not d.newkeys


def test_garbage_is_an_error_not_an_exception() -> None:
    d = Direction()
    d.feed(b"SSH-2.0-x\r\n" + b"\xff" * 16)
    assert d.error is not None and d.done
    d.feed(b"more")  # ignored after the error
    assert d.nbytes == len(b"SSH-2.0-x\r\n") + 16 + 4
