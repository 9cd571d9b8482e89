"""How bytes reach the other host: plain TCP, TLS, an HTTP CONNECT tunnel, or the first
of them that works (docs/networks.md).

Below ``ssh/`` in the layers: the SSH client (``ssh.client.open_connection``, the
agent's link and ``labrelay connect`` alike) dials through :mod:`relay.transport.dial`,
and the relay's TLS port (``server/``) takes its certificates from
:mod:`relay.transport.tlsserver`.  What can be decided without a socket (the CONNECT
request and answer, ``no_proxy``) is in :mod:`relay.core.httpconnect`.
"""
