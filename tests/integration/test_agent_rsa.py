"""An RSA key held by a real ``ssh-agent`` signs with SHA-2 (``rsa-sha2-512``/``-256``):
Conch's own agent client asks with flags 0, which makes the agent sign with SHA-1
``ssh-rsa``, which the relay (and OpenSSH 8.8+) refuses.  Real ssh-agent, ssh-add,
ssh-keygen; the signature is checked with the public key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import child_env
from harness import find_program
from relay_fixtures import running_ssh_agent

pytestmark = pytest.mark.integration

SIGN = r"""
import json, sys
from twisted.conch.ssh import common
from twisted.internet import defer, task
from relay.user.keys import agent_keys

async def main(reactor):
    found, client = await agent_keys(reactor, sys.argv[1], lambda line: None)
    out = []
    for key in found:
        for algorithm in (b"rsa-sha2-512", b"rsa-sha2-256"):
            signature = await key.sign(b"session id and request", algorithm)
            out.append({"type": key.public().type(), "asked": algorithm.decode(),
                        "got": common.getNS(signature)[0].decode(),
                        "valid": key.public().verify(signature, b"session id and request")})
    client.transport.loseConnection()
    print(json.dumps(out))

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


@pytest.fixture
def rsa_agent(tmp_path: Path) -> Iterator[Path]:
    """A running ssh-agent holding one RSA key; yields its socket."""
    agent_bin, add_bin, keygen = (find_program(p) for p in ("ssh-agent", "ssh-add",
                                                             "ssh-keygen"))
    assert agent_bin and add_bin and keygen, "OpenSSH's ssh-agent, ssh-add, ssh-keygen needed"
    key = tmp_path / "id_rsa"
    subprocess.run([keygen, "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(key)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    sock = tmp_path / "agent.sock"
    with running_ssh_agent(sock):
        subprocess.run([add_bin, str(key)], check=True, capture_output=True, timeout=30,
                       stdin=subprocess.DEVNULL, env={**os.environ, "SSH_AUTH_SOCK": str(sock)})
        yield sock


def test_an_agents_rsa_key_signs_with_the_sha2_algorithm_asked(rsa_agent: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SIGN, str(rsa_agent)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, **child_env()})
    assert out.returncode == 0, out.stderr
    signed = json.loads(out.stdout)
    assert [(s["type"], s["asked"], s["got"], s["valid"]) for s in signed] == [
        ("RSA", "rsa-sha2-512", "rsa-sha2-512", True),
        ("RSA", "rsa-sha2-256", "rsa-sha2-256", True)]
