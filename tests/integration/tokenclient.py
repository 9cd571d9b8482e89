"""A user's SSH session at a labrelay relay that asks for fast-path tokens and prints
them, for the token tests: ``python tokenclient.py -p PORT -i KEY -o
UserKnownHostsFile=F alice@127.0.0.1 SERVICE[:PORT] [COUNT]``.

Prints one JSON line per token (``{"status", "message", "data_port", "token"}``, the
token in hex) and keeps the SSH session open until stdin closes, so the tokens stay
bound to a live session; closing stdin ends it.  With ``--go`` it logs in, prints
``{"ready": true}`` and asks only once a line arrives on stdin: a test can have several
sessions ask within a moment of each other, whatever their start-up took.
"""

from __future__ import annotations

import argparse
import json
import sys

from twisted.internet import defer, reactor, stdio
from twisted.internet.protocol import Protocol

from relay.config.schema import NodeConfig
from relay.core import fastwire as fw
from relay.ops.service import load_identities
from relay.user.connect import CLI, Connector, add_connect_arguments, options_from_args


class _Stdin(Protocol):
    def __init__(self, go: defer.Deferred[None], closed: defer.Deferred[None]) -> None:
        self.go = go
        self.closed = closed

    def dataReceived(self, data: bytes) -> None:
        if not self.go.called:
            self.go.callback(None)

    def connectionLost(self, reason: object = None) -> None:
        if not self.go.called:
            self.go.callback(None)
        self.closed.callback(None)


async def main(ns: argparse.Namespace) -> None:
    options = options_from_args(ns)
    keys = load_identities(NodeConfig(source=CLI, links=(options.link,)), options.link, 0)
    conn = await Connector(options, reactor, keys).open()
    go: defer.Deferred[None] = defer.Deferred()
    closed: defer.Deferred[None] = defer.Deferred()
    stdio.StandardIO(_Stdin(go, closed))
    if ns.go:
        print(json.dumps({"ready": True}), flush=True)
        await go
    for _ in range(ns.count):
        reply = await conn.sendGlobalRequest(
            fw.TOKEN_REQUEST, fw.pack_token_request(options.service, options.port), wantReply=1)
        status, message, data_port, token, lifetime = fw.unpack_token_reply(reply)
        print(json.dumps({"status": status.name, "message": message, "data_port": data_port,
                          "token": token.hex(), "lifetime": lifetime}), flush=True)
    await closed
    conn.link_transport.sendDisconnect(11, b"bye")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_connect_arguments(parser)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--go", action="store_true",
                        help='log in, print {"ready": true}, ask once a line arrives on stdin')
    args = parser.parse_args()
    code = [0]

    def done(result: object) -> None:
        if hasattr(result, "getTraceback"):
            sys.stderr.write(result.getTraceback())  # type: ignore[union-attr]
            code[0] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(main(args)).addBoth(done))
    reactor.run()
    sys.exit(code[0])
