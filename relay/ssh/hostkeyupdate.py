"""OpenSSH's host key update (``UpdateHostKeys``): the relay tells a client every key
it holds, and proves on request that it holds their private halves.

OpenSSH's PROTOCOL §2.5 (draft-miller-sshm-hostkey-update); sshd's ``notify_hostkeys``
and ``server_input_hostkeys_prove``.  After user authentication the server sends the
global request ``hostkeys-00@openssh.com`` (no reply wanted) with each host key blob.
A client that finds a key its ``known_hosts`` lacks asks
``hostkeys-prove-00@openssh.com`` (reply wanted) with those blobs; the server answers
``REQUEST_SUCCESS`` with one signature per blob, in request order, over
``string("hostkeys-prove-00@openssh.com") || string(session id) || string(blob)``, and
the client records the proven keys and drops those of the host no longer announced.

This is what lets an operator rotate the relay's key without breaking every
``known_hosts`` (docs/operations.md, rotating the host key): the next key is
announced (``[relay] next_host_key``) while the current one still does the key
exchange; clients learn it by themselves; then the keys are swapped.

The answer is decided here, away from the connection: :class:`HostKeyProver` takes
the request's bytes and the session's facts and returns the reply or a refusal.  It
is stricter than sshd where sshd's leniency costs the relay work: at most
``MAX_PROVE_KEYS`` blobs, each one of the relay's keys and none twice (so a request
costs at most one signature per key held), nothing after the last blob.  Anything
else is refused with ``REQUEST_FAILURE``, as sshd refuses an unknown or unparsable
key; the connection goes on.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from twisted.conch.ssh import common, keys

HOSTKEYS = b"hostkeys-00@openssh.com"
HOSTKEYS_PROVE = b"hostkeys-prove-00@openssh.com"
HOSTKEYS_AGAIN = b"hostkeys-again@labrelay"
"""Relay -> labrelay agent, no reply wanted: the payload of ``hostkeys-00@openssh.com``
again, after a reload changed the relay's keys (``next_host_key``).  OpenSSH's client
ends a connection told ``hostkeys-00`` twice, so the relay announces that once, at
login, as sshd does; an agent whose link was up before the reload would learn the next
key only when it reconnects.  This one goes only to agents whose version line is
labrelay's, under a name of its own: a peer that does not know it (an older agent, a
stock ``ssh -R`` taken for one) ignores it, as an unknown request with no reply wanted.
The agent answers it as the first announcement: proves and records the keys it lacks."""

MAX_PROVE_KEYS = 16
"""Blobs a prove request may list.  The relay holds two keys at most (the current and
the next); OpenSSH's client asks only for announced keys it lacks."""

MAX_TOLD_HOST_KEYS = 16
"""Announced keys an agent's link logs (``link_hostkey_announced``) in its life.  An
honest relay announces one next key per rotation; a relay that announced fresh keys at
every reconnect made one line and one remembered blob each, without end."""

_RSA = b"ssh-rsa"
_RSA_SHA2 = (b"rsa-sha2-512", b"rsa-sha2-256")


class ProveRefused(ValueError):
    """A ``hostkeys-prove-00@openssh.com`` request that gets ``REQUEST_FAILURE``;
    ``str()`` says why, in the relay's words (no peer bytes)."""


def pack_blobs(blobs: Iterable[bytes]) -> bytes:
    """The payload of both requests: each key blob as an SSH ``string``."""
    return b"".join(common.NS(blob) for blob in blobs)


def unpack_blobs(data: bytes, limit: int = MAX_PROVE_KEYS) -> list[bytes]:
    """The blobs of a request's payload, which must be whole ``string``s and nothing
    else; :class:`ProveRefused` for a cut string, bytes left over or more than
    ``limit`` of them."""
    blobs: list[bytes] = []
    pos = 0
    while pos < len(data):
        if len(blobs) == limit:
            raise ProveRefused(f"more than {limit} keys")
        if len(data) - pos < 4:
            raise ProveRefused("a key's length is cut short")
        (length,) = struct.unpack_from(">L", data, pos)
        pos += 4
        if length > len(data) - pos:
            raise ProveRefused("a key is longer than the request")
        blobs.append(data[pos:pos + length])
        pos += length
    return blobs


def prove_signed_data(session_id: bytes, blob: bytes) -> bytes:
    """What each signature covers (PROTOCOL §2.5): binds the key to this session."""
    return common.NS(HOSTKEYS_PROVE) + common.NS(session_id) + common.NS(blob)


def rsa_signature_type(kex_host_key_alg: bytes | None,
                       client_host_key_algs: Sequence[bytes]) -> bytes | None:
    """sshd's choice of RSA signature for a proof: the key exchange's when it was an
    RSA one, else the SHA-2 one the client's KEXINIT names (SHA-512 first).  None when
    the client named neither: sshd would sign with SHA-1 (``ssh-rsa``), which the relay
    never does (docs/security.md, modern algorithms only)."""
    if kex_host_key_alg in _RSA_SHA2:
        return kex_host_key_alg
    for alg in _RSA_SHA2:
        if alg in client_host_key_algs:
            return alg
    return None


class HostKeyProver:
    """The relay's host keys as OpenSSH's host key update sees them.

    ``keys`` are private keys, the one the key exchange uses first; all are announced,
    in that order, and any of them is proven on request.  A key given twice is held
    once (a ``next_host_key`` that is the current key announces nothing new)."""

    def __init__(self, host_keys: Iterable[keys.Key]) -> None:
        held: dict[bytes, keys.Key] = {}
        for key in host_keys:
            held.setdefault(key.public().blob(), key)
        if not held:
            raise ValueError("no host keys")
        self._keys = held

    @property
    def blobs(self) -> list[bytes]:
        """Each key's public blob, in announce order."""
        return list(self._keys)

    def announcement(self) -> bytes:
        """The payload of ``hostkeys-00@openssh.com``."""
        return pack_blobs(self._keys)

    def prove(self, data: bytes, session_id: bytes, kex_host_key_alg: bytes | None,
              client_host_key_algs: Sequence[bytes]) -> bytes:
        """The ``REQUEST_SUCCESS`` payload for a prove request's ``data``: one
        signature per blob, in order.  :class:`ProveRefused` when any blob is not one of
        the relay's keys, is listed twice, or the request is malformed; nothing is
        signed then."""
        blobs = unpack_blobs(data)
        if len(set(blobs)) != len(blobs):
            raise ProveRefused("a key is listed twice")
        chosen: list[tuple[bytes, keys.Key, bytes | None]] = []
        for blob in blobs:
            key = self._keys.get(blob)
            if key is None:
                raise ProveRefused("a key that is not one of the relay's host keys")
            sig_type: bytes | None = None
            if key.sshType() == _RSA:
                sig_type = rsa_signature_type(kex_host_key_alg, client_host_key_algs)
                if sig_type is None:
                    raise ProveRefused("an RSA key, and the client offered no rsa-sha2 "
                                       "signature")
            chosen.append((blob, key, sig_type))
        return b"".join(
            common.NS(key.sign(prove_signed_data(session_id, blob), sig_type))
            for blob, key, sig_type in chosen)
