"""Write the seed corpus of every fuzz target (``corpus/<target>/``) from real messages.

    python tests/fuzz/make_corpus.py

The seeds are what the parsers see from honest peers (a user's and an agent's hello,
a dispatch, the fast path's requests and replies, a client's version line and
KEXINIT, a forwarded session's channel messages, grant lines from the docs) plus the
edge cases that once broke them (``regress-*`` files, added by hand next to the
test that pins them; this script never deletes a file).  Deterministic: keys and
tokens are fixed, so re-running it rewrites the same bytes.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import formattargets  # noqa: E402
import fuzztargets as ft  # noqa: E402
import fuzzworld as world  # noqa: E402
import resumetargets  # noqa: E402
from twisted.conch.ssh import common  # noqa: E402

from relay.core import fastwire as fw  # noqa: E402
from relay.ssh import wire  # noqa: E402

TOKEN = bytes(range(fw.TOKEN_LEN))
TOKEN_ID, SECRET = fw.split_ticket(TOKEN)
NONCE = bytes(range(200, 200 + fw.NONCE_LEN))


def rec(sel: int, payload: bytes) -> bytes:
    """One record of ``fuzztargets._records``."""
    return bytes((sel,)) + struct.pack(">H", len(payload)) + payload


def namelists(*lists: bytes) -> bytes:
    return b"".join(common.NS(x) for x in lists)


KEXINIT = (
    b"\x14" + bytes(range(16)) + namelists(
        b"curve25519-sha256,curve25519-sha256@libssh.org,ext-info-c,kex-strict-c-v00@openssh.com",
        b"ssh-ed25519,rsa-sha2-512,rsa-sha2-256",
        b"chacha20-poly1305@openssh.com,aes128-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com",
        b"chacha20-poly1305@openssh.com,aes128-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com",
        b"hmac-sha2-256-etm@openssh.com,hmac-sha2-256",
        b"hmac-sha2-256-etm@openssh.com,hmac-sha2-256",
        b"none,zlib@openssh.com", b"none,zlib@openssh.com", b"", b"",
    ) + b"\x00\x00\x00\x00\x00"
)
ECDH_INIT = b"\x1e" + common.NS(bytes(range(1, 33)))


def hello() -> dict[str, bytes]:
    user = fw.user_hello(TOKEN, NONCE, "gpu-cluster", 22)
    return {
        "challenge": fw.challenge(NONCE),
        "challenge-and-more": fw.challenge(NONCE) + b"LRD2",
        "agent": fw.agent_hello(TOKEN, NONCE),
        "user": user,
        "user-long-name": fw.user_hello(TOKEN, NONCE, "a" * 255, 65535),
        "user-and-stream": user + b"SSH-2.0-OpenSSH_9.6\r\n",
        "partial": user[:20],
        "bad-role": fw.MAGIC + b"X" + TOKEN,
        "v1-hello": b"LRD1A" + TOKEN,  # a version 1 peer: refused at its first byte
        "not-labrelay": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    }


def _go(name: str, port: int) -> bytes:
    return fw.pack_go(name, port, fw.go_mac(SECRET, TOKEN_ID, NONCE, name, port))


def dispatch() -> dict[str, bytes]:
    return {
        "go": _go("gpu-cluster", 22),
        "go-and-stream": _go("jupyter", 8888) + b"stream bytes",
        "go-partial": _go("gpu-cluster", 22)[:9],
        "go-without-mac": _go("gpu-cluster", 22)[:-fw.MAC_LEN],
        "ok": fw.AGENT_OK,
        "ok-and-stream": fw.AGENT_OK + b"SSH-2.0-OpenSSH_9.6\r\n",
        "agent-error": fw.pack_error(fw.AGENT_ERROR, "connection refused"),
        "user-ok": fw.USER_OK + b"stream",
        "user-error": fw.pack_error(fw.USER_ERROR, "no such service"),
        "error-partial": fw.pack_error(fw.USER_ERROR, "x" * 40)[:10],
    }


def fastwire_ssh() -> dict[str, bytes]:
    return {
        "token-request": b"\x00" + fw.pack_token_request("gpu-cluster", 22),
        "token-reply": b"\x01" + fw.pack_token_reply(fw.Status.OK, "", 40000, TOKEN, 10.0),
        "token-refused": b"\x01" + fw.pack_token_reply(fw.Status.REFUSED, "not granted"),
        "pool-request": b"\x02" + fw.pack_pool_request(4, [("gpu-cluster", 22),
                                                            ("jupyter", 8888)]),
        "pool-reply": b"\x03" + fw.pack_pool_reply(fw.Status.OK, "", 40000, [TOKEN] * 3, 60.0,
                                                   [("gpu-cluster", 22)]),
        "pool-reply-unavailable": b"\x03" + fw.pack_pool_reply(fw.Status.UNAVAILABLE,
                                                               "no e2e service"),
        "pool-many": b"\x02" + struct.pack(">LL", 1, 5000),
        "truncated": b"\x00\x00\x00\x00\xff",
    }


def ssh_wire() -> dict[str, bytes]:
    return {
        "forward": wire.pack_forward("gpu-cluster", 22),
        "forward-public": wire.pack_forward("0.0.0.0", 2201),
        "endpoints": wire.pack_endpoints("gpu-cluster", 22, "203.0.113.7", 50000),
        "utf8": wire.pack_forward("gpu-clüster", 22),
        "overlong": b"\xff\xff\xff\xffgpu",
    }


def global_request() -> dict[str, bytes]:
    register = rec(0x80, wire.pack_forward("gpu-cluster", 22))
    pool = rec(0x83, fw.pack_pool_request(4, [("gpu-cluster", 22)]))
    token = rec(0x02, fw.pack_token_request("gpu-cluster", 22))
    return {
        "register": register,
        "register-twice": register + register,
        "register-public": rec(0x80, wire.pack_forward("", world.PUBLIC_PORT)),
        "register-cancel": register + rec(0x81, wire.pack_forward("gpu-cluster", 22)),
        "fast-path": pool + token,
        "user-registers": rec(0x00, wire.pack_forward("gpu-cluster", 22)),
        "keepalive": rec(0x04, b""),
        "unknown-type": rec(0x20, b"no-more-sessions@openssh.com" + b"\x00" * 8),
        "agent-token": rec(0x82, fw.pack_token_request("gpu-cluster", 22)),
    }


def banner() -> dict[str, bytes]:
    v = world.CLIENT_VERSION
    return {
        "openssh": b"\x00" + v,
        "openssh-cut": b"\x07" + v,
        "paramiko": b"\x00SSH-2.0-paramiko_3.4.0\r\n",
        "lf-only": b"\x03SSH-2.0-x\n",
        "old-version": b"\x00SSH-1.5-old\r\n",
        "compat-199": b"\x00SSH-1.99-compat\r\n",
        "lines-first": b"\x05hello\r\nworld\r\nSSH-2.0-x\r\n",
        "version-and-kexinit": b"\x00" + v + world.frame_plain(KEXINIT),
        "no-version": b"\x01" + b"x" * 200,
        "http": b"\x00GET / HTTP/1.0\r\n\r\n",
    }


def packets() -> dict[str, bytes]:
    framed = rec(KEXINIT[0], KEXINIT[1:]) + rec(ECDH_INIT[0], ECDH_INIT[1:])
    return {
        "raw-kexinit": b"\x00" + world.frame_plain(KEXINIT),
        "raw-kexinit-cut": b"\x0a" + world.frame_plain(KEXINIT),
        "raw-kex": b"\x00" + world.frame_plain(KEXINIT) + world.frame_plain(ECDH_INIT),
        "framed-kex": b"\x01" + framed,
        "framed-kex-newkeys": b"\x01" + framed + rec(21, b""),
        "framed-service": b"\x01" + rec(5, common.NS(b"ssh-userauth")),
        "framed-userauth-early": b"\x01" + rec(50, common.NS(b"alice")
                                              + common.NS(b"ssh-connection")
                                              + common.NS(b"none")),
        "framed-misc": b"\x01" + rec(2, b"ignored") + rec(4, b"\x01" + common.NS(b"dbg")
                                                              + common.NS(b""))
        + rec(3, b"\x00\x00\x00\x01") + rec(1, b"\x00\x00\x00\x0b" + common.NS(b"bye")),
        "raw-bad-length": b"\x00\xff\xff\xff\xff" + b"\x00" * 16,
    }


def aead() -> dict[str, bytes]:
    def record(mode: int, msg: int, payload: bytes) -> bytes:
        n = 2 + len(payload)
        if mode == 0:
            pad = 8 - (4 + n) % 8
            pad += 8 if pad < 4 else 0
        else:
            block = 16 if mode in (1, 2) else 8
            pad = block - n % block
            pad += block if pad < 4 else 0
        return rec(0, bytes((pad, msg)) + payload + b"\x00" * pad)

    out: dict[str, bytes] = {}
    messages = [(2, b"hello"), (94, struct.pack(">LL", 0, 5) + b"abcde"), (2, b"x" * 600)]
    rekey = [(2, b"before"), (21, b""), (2, b"after")]  # NEWKEYS: strict KEX resets seqnr
    for mode, label in ((0, "none"), (1, "gcm128"), (2, "gcm256"), (3, "chacha")):
        records = b"".join(record(mode, m, p) for m, p in messages)
        for cut in (0, 5):
            out[f"{label}-sealed-cut{cut}"] = bytes((mode | 4 | cut << 4,)) + records
        out[f"{label}-sealed-strict-newkeys"] = bytes((mode | 4 | 8 | 3 << 4,)) + b"".join(
            record(mode, m, p) for m, p in rekey)
        # The same stream as raw bytes: a valid wire stream for the reader's fresh keys.
        strict = mode == 3
        raw, _plains = ft._sealed_stream(mode, strict, [r for _s, r in ft._records(records)])
        flags = mode | (8 if strict else 0)
        out[f"{label}-raw"] = bytes((flags | 3 << 4,)) + raw
        out[f"{label}-raw-flipped"] = bytes((flags,)) + raw[:-1] + bytes((raw[-1] ^ 1,))
        out[f"{label}-bad-padding"] = bytes((mode | 4,)) + rec(0, b"\xff\x02" + b"\x00" * 30)
    return out


def channel() -> dict[str, bytes]:
    def u(n: int) -> bytes:
        return struct.pack(">L", n)

    user, agent = 0x00, 0x80
    open_user = rec(user | 10, common.NS(b"direct-tcpip") + u(7) + u(2 << 20) + u(32768)
                    + wire.pack_endpoints("gpu-cluster", 22, "203.0.113.7", 50000))
    confirm_agent = rec(agent | 11, u(0) + u(9) + u(2 << 20) + u(32768))
    session = open_user + confirm_agent
    data = rec(user | 14, u(0) + common.NS(b"SSH-2.0-client\r\n")) + rec(
        agent | 14, u(0) + common.NS(b"SSH-2.0-server\r\n"))
    return {
        "open-confirm": session,
        "session": session + data,
        "session-close": session + data + rec(user | 16, u(0)) + rec(user | 17, u(0))
        + rec(agent | 17, u(0)),
        "window": session + rec(agent | 13, u(0) + u(0xFFFFFFF0)),
        "open-failure": open_user + rec(agent | 12, u(0) + u(2) + common.NS(b"no")
                                        + common.NS(b"")),
        "unknown-channel": rec(user | 14, u(99) + common.NS(b"x")),
        "session-request": open_user + rec(user | 18, u(0) + common.NS(b"exec") + b"\x01"
                                           + common.NS(b"id")),
        "other-types": rec(user | 10, common.NS(b"session") + u(1) + u(1 << 20) + u(32768)),
        "global": rec(user | 0, common.NS(b"keepalive@openssh.com") + b"\x01")
        + rec(agent | 1, b"") + rec(agent | 2, b""),
        "overrun": session + rec(user | 14, u(0) + u(1 << 30) + b"x"),
        "extended": session + rec(user | 15, u(0) + u(1) + common.NS(b"err")),
    }


def userauth() -> dict[str, bytes]:
    alice = ft.signed_userauth("user")
    agent = ft.signed_userauth("agent", b"lab_pc")
    probe = alice[: alice.index(b"publickey") + 9] + b"\x00" + alice[
        alice.index(b"publickey") + 10 :].rsplit(common.NS(b""), 1)[0]
    register = rec(0x80, common.NS(b"tcpip-forward") + b"\x01"
                   + wire.pack_forward("gpu-cluster", 22))
    return {
        "alice": rec(0, alice),
        "alice-then-open": rec(0, alice) + rec(0x80 | 10, common.NS(b"direct-tcpip")
                                               + struct.pack(">3L", 1, 1 << 20, 32768)
                                               + wire.pack_endpoints("gpu-cluster", 22, "h", 1)),
        "agent-registers": rec(0, agent) + register,
        "none-method": rec(0, common.NS(b"alice") + common.NS(b"ssh-connection")
                           + common.NS(b"none")),
        "password": rec(0, common.NS(b"alice") + common.NS(b"ssh-connection")
                        + common.NS(b"password") + b"\x00" + common.NS(b"hunter2")),
        "bad-signature": rec(0, alice[:-8] + b"\x00" * 8),
        "unknown-key": rec(0, ft.signed_userauth("user").replace(b"alice", b"mallo")),
        "probe": rec(0, probe),
        "wrong-service": rec(0, common.NS(b"alice") + common.NS(b"ssh-userauth")
                             + common.NS(b"none")),
    }


def grants() -> dict[str, bytes]:
    keys = [world.key_line(seed, "").strip() for seed in (10, 11, 12)]
    agents = (
        f'restrict,permitlisten="gpu-cluster:22",permitlisten="2201",no-pty {keys[0]} lab_pc\n'
        f'permitlisten="Jupyter:*",permitlisten="0.0.0.0:2202" {keys[1]} lab_pc\n'
        f'permitlisten="*:2203",permitlisten="[::]:2204",port-forwarding {keys[2]} lab_pc\n'
    )
    users = (
        f'permitopen="gpu-cluster:22",permitopen="jupyter:*",max-sessions="10" {keys[0]} alice\n'
        f'no-agent-forwarding,permitopen="gpu-cluster:22",max-sessions="10" {keys[1]} alice\n'
        f'permitopen="*" {keys[2]} admin\n'
        "# a comment\n\n"
    )
    return {
        "agents": b"\x00" + agents.encode(),
        "users": b"\x01" + users.encode(),
        "escaped-quote": b"\x01" + f'permitopen="a\\"b:22" {keys[0]} x\n'.encode(),
        "unsupported": b"\x00" + f'from="10.0.0.0/8" {keys[0]} lab_pc\n'.encode(),
        "bare-key": b"\x01" + f"{keys[0]} bob\n".encode(),
        "no-comment": b"\x00" + f"{keys[0]}\n".encode(),
        "bad-base64": b"\x00ssh-ed25519 AAAA!!!! lab_pc\n",
    }


def options() -> dict[str, bytes]:
    return {name: text.encode() for name, text in {
        "interval": "ServerAliveInterval=15",
        "interval-space": "ServerAliveInterval 1m30s",
        "count": "ServerAliveCountMax=3",
        "port": "Port=2222",
        "strict": "StrictHostKeyChecking=accept-new",
        "strict-no": "StrictHostKeyChecking=no",
        "timeout": "ConnectTimeout=10s",
        "user": 'User="lab"',
        "identity": "IdentityFile=~/.ssh/id_ed25519",
        "known-hosts": "UserKnownHostsFile=/tmp/kh",
        "exit": "ExitOnForwardFailure=yes",
        "unknown": "HostKeyAlias=x",
    }.items()}


def known_hosts() -> dict[str, bytes]:
    import base64
    import hashlib
    import hmac

    key = world.HOST_KEY.public().toString("OPENSSH").decode()
    other = world.fixed_key(9).public().toString("OPENSSH").decode()
    salt = bytes(range(20))
    digest = hmac.new(salt, b"cloud.example.org", hashlib.sha1).digest()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    fingerprint = "SHA256:" + base64.b64encode(
        hashlib.sha256(world.HOST_KEY.public().blob()).digest()).decode().rstrip("=")
    return {name: text.encode() for name, text in {
        "plain": f"\x00cloud.example.org {key}\n",
        "port": f"\x01[cloud.example.org]:2222 {key}\n",
        "hashed": f"\x00{hashed} {key}\n",
        "patterns": f"\x00*.example.org,!evil.example.org {key}\n# comment\n",
        "changed": f"\x00cloud.example.org {other}\n",
        "revoked": f"\x00@revoked * {key}\ncloud.example.org {key}\n",
        "cert-authority": f"\x00@cert-authority *.example.org {key}\n",
        "fingerprint": f"\x00{fingerprint}\n",
        "broken": "\x00cloud.example.org ssh-ed25519 AAAA\xe9\n|1|x|y ssh-ed25519 AAAA\n",
    }.items()}


SEEDS = {
    "fastwire_hello": hello,
    "fastwire_dispatch": dispatch,
    "fastwire_ssh": fastwire_ssh,
    "ssh_wire": ssh_wire,
    "global_request": global_request,
    "transport_banner": banner,
    "transport_packets": packets,
    "aead_framing": aead,
    "userauth": userauth,
    "connection": channel,
    "grant_file": grants,
    "agent_option": options,
    "known_hosts": known_hosts,
    **formattargets.SEEDS,
    **resumetargets.SEEDS,
}


def main() -> None:
    assert set(SEEDS) == set(ft.TARGETS), set(SEEDS) ^ set(ft.TARGETS)
    for target, make in SEEDS.items():
        directory = HERE / "corpus" / target
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in make().items():
            (directory / f"seed-{name}").write_bytes(data)


if __name__ == "__main__":
    main()
