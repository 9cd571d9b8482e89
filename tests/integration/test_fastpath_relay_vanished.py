"""A fast-path user whose relay vanishes without a word (its host off the network, a
firewall that starts dropping: no FIN, no RST) is told, instead of waiting on ssh's
own ``ServerAliveInterval`` or TCP's two hours.

Once spliced, ``labrelay connect`` holds a bare TCP connection to the relay's data
port, and an idle interactive session sends nothing on it.  Until round 14 only the
relay's end of it carried TCP keepalive probes (tests/integration/
test_fastpath_vanished.py); ``labrelay connect`` now arms the same ones (after 30 s
idle, every 10 s, three unanswered) on its end.  The test reads them on connect's own
socket (``pidfd_getfd``), shortens them there, and drops the connection's packets both
ways: the session ends and ssh exits, in about 3 s.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
import test_fastpath
from harness import find_program
from test_fastpath import Site
from test_fastpath_vanished import _borrow, _dropped, _idle_spliced_session, _socket_of

pytestmark = pytest.mark.integration
keys, site = test_fastpath.keys, test_fastpath.site  # the fast-path site: relay, agent, sshd


def test_an_idle_spliced_session_whose_relay_vanished_ends(site: Site) -> None:
    with _idle_spliced_session(site, stderr=subprocess.DEVNULL) as session:
        user, connect_pid, port = session.user, session.connect_pid, session.port
        borrowed = _borrow(connect_pid, _socket_of(connect_pid, port, site.data_port))
        with borrowed:
            assert borrowed.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1, (
                "labrelay connect armed no keepalive on its data connection")
            assert borrowed.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
            assert borrowed.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
            assert borrowed.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            for name, value in (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 2)):
                borrowed.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        if os.geteuid() != 0 or find_program("iptables") is None:
            pytest.skip("the probes are armed; ending the session needs root and iptables")
        with _dropped(port):  # the relay is gone: nothing more arrives, nothing gets there
            # ssh's own ServerAliveInterval is off (the test's ssh_config): only the
            # probes can end it.  ~3 s with the shortened ones.
            rc = user.wait(20)
        # ssh saw its ProxyCommand's end close ("client_loop: send disconnect: Broken
        # pipe") and exits 255; it hangs up connect as it goes, before connect can say
        # "ended abnormally ... (the relay side)".
        assert rc == 255, rc
