"""twistd integration: ``twistd -n labrelay --config node.toml``.

Builds exactly the service tree ``labrelay agent --config`` runs; twistd adds
daemonising, ``--pidfile`` and ``--logfile``.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from .config import ConfigError, load_config


class Options(usage.Options):
    synopsis = "--config FILE [--log-format text|json]"
    longdesc = (
        "Run the labrelay links and forwards described by a node config file "
        "(see docs/config.md). Same service as `labrelay agent --config FILE`."
    )
    optParameters = [
        ["config", "c", None, "node configuration file (TOML)"],
        ["log-format", None, None,
         "json: also write labrelay's events as JSON lines to stdout"],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        if self["log-format"] not in (None, "text", "json"):
            raise usage.UsageError("--log-format must be text or json")


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from .service import make_node_service

    try:
        config = load_config(options["config"])
        if options["log-format"] == "json":
            from twisted.logger import globalLogPublisher

            from .logfmt import json_observer

            globalLogPublisher.addObserver(json_observer(sys.stdout))

        def fatal(why: str) -> None:
            reactor.stop()

        return make_node_service(config, reactor, on_fatal=fatal)
    except ConfigError as e:
        raise SystemExit(f"labrelay: {e}") from None
