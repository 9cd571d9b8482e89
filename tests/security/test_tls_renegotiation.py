"""Round 20's probe of the TLS port with stock ``openssl s_client`` (a client labrelay
did not write): a TLS 1.2 client asking to **renegotiate** after its handshake, in a
loop (THC-SSL-DOS: each renegotiation is a full handshake, a signature, for the
server, on one connection that admission counts once).  The relay's context sets
``OP_NO_RENEGOTIATION`` (relay.transport.tlsserver), and OpenSSL 3 refuses a
client's renegotiation by default anyway: the first request is refused and the
connection ends, one handshake counted; alice's session works.  Held.  With
``SSL_OP_ALLOW_CLIENT_RENEGOTIATION`` set and ``OP_NO_RENEGOTIATION`` taken out by
hand, the renegotiation completed and this test failed (checked); taking out only
``OP_NO_RENEGOTIATION`` does not fail it on OpenSSL 3 (its default holds).
"""

from __future__ import annotations

import subprocess
import time

import pytest
from harness import LOOPBACK
from test_tls_hostile import Site, site  # noqa: F401
from tlscerts import RELAY_NAME

pytestmark = [pytest.mark.integration, pytest.mark.security]

RENEGOTIATIONS = 50


def test_renegotiation_after_the_handshake_is_refused(site: Site) -> None:  # noqa: F811
    before = site.tls()
    began = time.monotonic()
    proc = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"{LOOPBACK}:{site.tls_port}", "-tls1_2",
         "-servername", RELAY_NAME, "-CAfile", str(site.ca.pem_path),
         "-alpn", "labrelay-ssh/1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(b"R\n" * RENEGOTIATIONS, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    took = time.monotonic() - began
    text = out.decode("latin-1")
    print(f"\ns_client asking {RENEGOTIATIONS} renegotiations: exit {proc.returncode} in "
          f"{took:.2f}s, {text.count('RENEGOTIATING')} RENEGOTIATING lines; tail: "
          f"{text[-300:]!r}")
    assert "SSH-2.0-" in text  # the handshake itself was fine, SSH answered
    after = site.tls()
    print(f"TLS port before {before}, after {after}")
    assert after["handshakes"] - before["handshakes"] == 1
    assert "no renegotiation" in text, text[-600:]
    assert text.count("RENEGOTIATING") == 1  # the first ended the connection
    site.alice()
