"""The user's keys, found where ssh finds them.

``labrelay connect`` authenticates to the relay with the keys the user's own ssh
would offer, in ssh's order: the keys of the ssh-agent at ``SSH_AUTH_SOCK`` (or the
``IdentityAgent`` of ``~/.ssh/config``; ``none`` turns it off), then the identity
files (``-i``, ``IdentityFile``, else ssh's defaults ``~/.ssh/id_ed25519``,
``id_ecdsa``, ``id_rsa``) the agent does not already hold.  With
``IdentitiesOnly yes`` only the agent's keys that match an identity file are used.

A passphrase-protected file is not unlocked up front: its public half (from
``KEY.pub``, or the clear part of an OpenSSH key file) is offered, and the
passphrase is asked (:mod:`relay.user.askpass`: the terminal, or ``SSH_ASKPASS``)
only when the relay accepts that key, three tries, as ssh does.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.conch.ssh import common, keys
from twisted.conch.ssh.agent import AGENT_SIGN_RESPONSE, AGENTC_SIGN_REQUEST, SSHAgentClient
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory

from relay.ssh.client import Identity
from relay.ssh.identity import IdentityError, parse_key, read_key_file

DEFAULT_FILES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
# ssh's default IdentityFile names of key types labrelay cannot use.
_UNUSABLE_DEFAULTS = frozenset({"id_ecdsa_sk", "id_ed25519_sk", "id_xmss", "id_dsa"})
PASSPHRASE_TRIES = 3  # ssh's NumberOfPasswordPrompts
AGENT_TIMEOUT = 5.0
_OPENSSH_BEGIN = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_MAGIC = b"openssh-key-v1\0"

Say = Callable[[str], None]
Ask = Callable[[str], "str | None"]


class AgentRefused(Exception):
    """The ssh-agent did not sign; the next identity is tried."""


class NoIdentity(Exception):
    """No key to offer; ``str()`` tells the user what to do."""


AGENT_RSA_FLAGS = {b"rsa-sha2-256": 2, b"rsa-sha2-512": 4}
"""The ssh-agent sign request's flag for each SHA-2 RSA signature algorithm."""


def _signature(response: bytes) -> bytes:
    """The signature in an ssh-agent's answer to a sign request."""
    if response[:1] != bytes([AGENT_SIGN_RESPONSE]):
        raise AgentRefused("the ssh-agent refused to sign (is the key still in it? "
                           "ssh-add -l)")
    return bytes(common.getNS(response[1:])[0])


@dataclass
class AgentKey:
    """A key held by an ssh-agent: it signs there."""

    key: keys.Key
    comment: str
    agent: SSHAgentClient

    def public(self) -> keys.Key:
        return self.key

    def sign(self, data: bytes, signature: bytes | None = None) -> defer.Deferred[bytes]:
        """Ask the agent to sign.  Conch's ``signData`` sends flags 0, which makes an
        RSA key sign with SHA-1 (``ssh-rsa``, refused by the relay and OpenSSH 8.8+);
        the request here carries ``SSH_AGENT_RSA_SHA2_512``/``_256`` (draft-miller-
        ssh-agent §4.5.1) when ``signature`` names one."""
        flags = AGENT_RSA_FLAGS.get(signature or b"", 0)
        request = common.NS(self.key.blob()) + common.NS(data) + struct.pack("!L", flags)
        return self.agent.sendRequest(  # type: ignore[no-any-return]
            AGENTC_SIGN_REQUEST, request).addCallback(_signature)


@dataclass
class LockedKey:
    """A passphrase-protected key file: its passphrase is asked when first needed."""

    path: Path
    key: keys.Key
    data: bytes
    ask: Ask
    say: Say
    _unlocked: keys.Key | None = field(default=None, repr=False)

    def public(self) -> keys.Key:
        return self.key

    def unlock(self) -> keys.Key:
        """The private key (asked once), or :class:`IdentityError`."""
        if self._unlocked is None:
            self._unlocked = unlock(self.path, self.data, self.ask, self.say)
        return self._unlocked

    def sign(self, data: bytes, signature: bytes | None = None) -> defer.Deferred[bytes]:
        try:
            return defer.succeed(self.unlock().sign(data, signatureType=signature))
        except IdentityError as e:
            self.say(str(e))
            return defer.fail(e)


def unlock(path: Path, data: bytes, ask: Ask, say: Say) -> keys.Key:
    """Ask for the passphrase of ``path`` up to ``PASSPHRASE_TRIES`` times; an empty
    answer or none at all gives up (as ssh does), an :class:`IdentityError`."""
    for attempt in range(PASSPHRASE_TRIES):
        answer = ask(f"Enter passphrase for key '{path}': ")
        if not answer:
            break
        try:
            return parse_key(path, data, answer.encode())
        except keys.EncryptedKeyError:
            say(f"wrong passphrase for {path}"
                + (", try again" if attempt + 1 < PASSPHRASE_TRIES else ""))
    raise IdentityError(path, "is protected by a passphrase and was not unlocked",
                        "type it on the terminal, set SSH_ASKPASS, or add the key to "
                        "your ssh-agent with ssh-add")


def public_half(path: Path, data: bytes) -> keys.Key | None:
    """The public key of a (locked) private key file: ``path.pub``, or the clear
    public part of the OpenSSH format; None if neither is there."""
    pub = Path(str(path) + ".pub")
    try:
        return keys.Key.fromString(pub.read_bytes())
    except Exception:  # no .pub, or not a key: try the file itself
        pass
    text = data.strip()
    if not text.startswith(_OPENSSH_BEGIN):
        return None
    try:
        body = base64.b64decode(b"".join(text.splitlines()[1:-1]))
        if not body.startswith(_OPENSSH_MAGIC):
            return None
        _cipher, _kdf, _kdfopts, rest = common.getNS(body[len(_OPENSSH_MAGIC):], 3)
        blob, _ = common.getNS(rest[4:])
        return keys.Key.fromString(blob)
    except Exception:
        return None


def expand(path: str, tokens: dict[str, str] | None = None) -> Path:
    """An ``IdentityFile`` as ssh expands it: ``~`` and the ``%d %u %h %r %%`` tokens."""
    text = path
    if tokens:
        out, i = [], 0
        while i < len(text):
            if text[i] == "%" and i + 1 < len(text):
                out.append(tokens.get(text[i + 1], text[i:i + 2]))
                i += 2
            else:
                out.append(text[i])
                i += 1
        text = "".join(out)
    return Path(text).expanduser()


def load_files(paths: Iterable[Path], explicit: Sequence[Path], ask: Ask,
               say: Say) -> list[tuple[Path, keys.Key | LockedKey]]:
    """Each identity file that exists, loaded (a locked one as :class:`LockedKey`).
    A missing file is skipped (ssh's defaults rarely all exist), with a warning if the
    user named it; a file that cannot be used (too open, not a key, not unlocked) is
    skipped with a word on why, as ssh does."""
    named = {p.expanduser() for p in explicit}
    out: list[tuple[Path, keys.Key | LockedKey]] = []
    for path in dict.fromkeys(p.expanduser() for p in paths):
        if not path.exists():
            if path in named:
                say(f"identity file {path} not accessible: no such file")
            continue
        try:
            data = read_key_file(path)
            try:
                out.append((path, parse_key(path, data)))
            except keys.EncryptedKeyError:
                public = public_half(path, data)
                if public is None:  # an old PEM key without its .pub: ssh asks now too
                    out.append((path, unlock(path, data, ask, say)))
                else:
                    out.append((path, LockedKey(path, public, data, ask, say)))
        except IdentityError as e:  # too open, not a key, not unlocked: ssh skips it too
            say(f"{e}; skipping it")
    return out


async def agent_keys(reactor: Any, socket_path: str, say: Say,
                     verbose: bool = False) -> tuple[list[AgentKey], SSHAgentClient | None]:
    """The keys of the ssh-agent listening at ``socket_path`` (none if it does not
    answer: ssh goes on without it too, saying so only when verbose)."""
    try:
        endpoint = UNIXClientEndpoint(reactor, socket_path, timeout=AGENT_TIMEOUT)
        client: SSHAgentClient = await endpoint.connect(Factory.forProtocol(SSHAgentClient))
        listed = await client.requestIdentities()
    except Exception as e:
        if verbose:
            say(f"ssh-agent at {socket_path} unavailable ({e}); using key files only")
        return [], None
    found = []
    for blob, comment in listed:
        try:
            found.append(AgentKey(keys.Key.fromString(blob), comment.decode(errors="replace"),
                                  client))
        except Exception:  # a key type Conch does not know (sk-*, certificates)
            continue
    return found, client


def agent_socket(identity_agent: str | None, env: dict[str, str] | None = None) -> str | None:
    """The agent to ask: ``IdentityAgent`` (``none`` = no agent; ``SSH_AUTH_SOCK`` or
    unset = that variable; else a path, ``~`` and ``${VAR}`` expanded)."""
    env = dict(os.environ) if env is None else env
    value = (identity_agent or "").strip()
    if value.lower() == "none":
        return None
    if not value or value == "SSH_AUTH_SOCK":
        return env.get("SSH_AUTH_SOCK") or None
    if value.startswith("$"):
        return env.get(value.strip("${}")) or None
    return os.path.expanduser(value)


def order(agent: Sequence[AgentKey], files: Sequence[tuple[Path, keys.Key | LockedKey]],
          identities_only: bool) -> list[Identity]:
    """ssh's order: the agent's keys (only those of the files with IdentitiesOnly),
    then the files' keys the agent does not hold."""
    def fingerprint(k: keys.Key | LockedKey | AgentKey) -> bytes:
        return k.public().blob()

    file_blobs = {fingerprint(k) for _, k in files}
    chosen: list[Identity] = [a for a in agent
                              if not identities_only or a.key.blob() in file_blobs]
    held = {fingerprint(a) for a in agent if not identities_only or a.key.blob() in file_blobs}
    for _, k in files:
        if fingerprint(k) not in held:
            chosen.append(k)
            held.add(fingerprint(k))
    return chosen


def no_identity_message(files: Sequence[Path], agent: str | None) -> str:
    """Why there is no key.  A file that exists but was skipped (too open, not a key,
    not unlocked: :func:`load_files` said why just before) is named as such: "none
    of KEY exists" sent a user whose key was merely 0644 looking for a missing file."""
    where = f"ssh-agent ({agent}) holds no key and " if agent else "no ssh-agent (SSH_AUTH_SOCK " \
        "is not set) and "
    paths = list(dict.fromkeys(p.expanduser() for p in files))  # -i FILE is there twice
    unusable = [p for p in paths if p.exists()]
    if unusable:
        names = ", ".join(str(p) for p in unusable)
        return (f"no key to offer: {where}{names} could not be used (see above); fix "
                "that, add a key to your agent with `ssh-add`, or give -i KEYFILE")
    # ssh -G lists its defaults of every type; those labrelay cannot use (security
    # keys, XMSS, DSA) would send a user to create a key that cannot help.
    usable = [p for p in paths if p.name not in _UNUSABLE_DEFAULTS]
    names = ", ".join(str(p) for p in usable) or ", ".join(DEFAULT_FILES)
    return (f"no key to offer: {where}none of {names} exists; create one with "
            "`ssh-keygen -t ed25519`, add it to your agent with `ssh-add`, or give -i KEYFILE")


@dataclass(frozen=True)
class KeySource:
    """Where ``labrelay connect`` finds its keys (see the module docstring)."""

    files: tuple[Path, ...]
    explicit: tuple[Path, ...]
    identities_only: bool
    agent: str | None
    ask: Ask

    async def load(self, reactor: Any, say: Say,
                   verbose: bool = False) -> tuple[list[Identity], SSHAgentClient | None]:
        """The identities in ssh's order and the agent connection to close when done;
        :class:`NoIdentity` or :class:`IdentityError` (a key file that cannot be used)."""
        held, client = ([], None) if self.agent is None else \
            await agent_keys(reactor, self.agent, say, verbose)
        files = load_files(self.files, self.explicit, self.ask, say)
        chosen = order(held, files, self.identities_only)
        if not chosen:
            if client is not None and client.transport is not None:
                client.transport.loseConnection()
            raise NoIdentity(no_identity_message(self.files, self.agent))
        if verbose:
            say(f"offering {len(chosen)} key(s): {len(held)} from ssh-agent, "
                f"{len(chosen) - min(len(held), len(chosen))} from files")
        return chosen, client
