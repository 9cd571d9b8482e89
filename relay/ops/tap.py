"""twistd integration: ``twistd -n labrelay --config node.toml``.

Builds exactly the service tree ``labrelay agent --config`` runs (a relay, links,
plain hops: whatever the file has); twistd adds daemonising, ``--pidfile`` and
``--logfile``.  SIGHUP reloads the config file, as under ``labrelay``; a bad config
exits at once with status 1, and so does a fatal error later (a port that cannot be
bound).  twistd's own log observer (the
``--logfile`` file, stdout or ``--syslog``) is wrapped by
:func:`relay.ops.logfmt.sanitizing_observer`, so peer-supplied strings are escaped and
truncated there as in ``labrelay``'s own output; an explicit ``--logger`` is left as
the operator chose it.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from relay import __version__
from relay.config.errors import ConfigError
from relay.config.loader import load_config

_log = Logger(namespace="labrelay")
"""The twistd plugin's own events (``agent_started``, ``fatal``)."""


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


def _twistd_observer(server_options: Any) -> Any:
    """The observer twistd would build from its own options (``--logfile``,
    ``--syslog``, ``--nodaemon``), by twistd's own code."""
    from twisted.scripts.twistd import _SomeApplicationRunner

    return _SomeApplicationRunner.loggerFactory(server_options)._getLogObserver()


class TwistdRoot(MultiService):
    """The service twistd runs: the node service, plus a sanitizing log observer set
    on twistd's application before twistd starts logging (twistd uses an
    ``ILogObserver`` component of the application instead of its default)."""

    def __init__(self, node: IService, server_options: Any,
                 reactor_name: str | None = None) -> None:
        super().__init__()
        self._server_options = server_options
        self._reactor_name = reactor_name
        self._node = node
        node.setServiceParent(self)

    def startService(self) -> None:
        # Here, not in makeService: twistd replays what was logged before it started
        # logging to every observer, so the JSON stream would have it twice.
        if self._reactor_name is not None:
            _log.info("labrelay {version} started under twistd (pid {pid})",
                      event="agent_started", version=__version__, pid=os.getpid(),
                      reactor=self._reactor_name)
        super().startService()

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        options = self._server_options
        if options is None or options.get("logger") or not hasattr(parent, "setComponent"):
            return
        if parent.getComponent(ILogObserver, None) is None:
            from relay.ops.logfmt import sanitizing_observer

            observer = _twistd_observer(options)
            _reopen_at_hangup(self._node, observer)
            parent.setComponent(ILogObserver, sanitizing_observer(observer))


def _reopen_at_hangup(node: IService, observer: Any) -> None:
    """Reopen twistd's ``--logfile`` at each SIGHUP, before the reload.

    twistd rotates its file itself (at 1 MB, or at SIGUSR1) but cannot follow a file
    moved under it: after logrotate's usual move-then-signal the process wrote on into
    the moved file — compressed and deleted by the next rotations, so the log was lost
    — and SIGUSR1 could not help (twistd's rotation skips a path that no longer
    exists).  ``LogFile.reopen`` opens the configured path again (a new file when it
    was moved, the same one otherwise)."""
    from twisted.python.logfile import LogFile

    log_file = getattr(observer, "_outFile", None)  # twisted.logger.FileLogObserver
    hooks = getattr(node, "on_hangup", None)
    if isinstance(log_file, LogFile) and hooks is not None:
        def reopen() -> None:
            log_file.reopen()
            _log.info("SIGHUP: log file {path} reopened", event="log_reopened",
                      path=log_file.path)

        hooks.append(reopen)


def makeService(options: Options, reactor: Any = None) -> IService:
    reactor_name = None
    hangup = None
    if reactor is None:  # twistd itself: a SIGHUP from now on reloads (relay.ops.hangup)
        from relay.ops.hangup import HangupBeforeStart

        hangup = HangupBeforeStart()
        hangup.install()
        from relay.ops.reactor import install

        # twistd installs its reactor when it runs it, after this, unless it was
        # given ``--reactor``: ours is chosen here in the first case only.
        reactor_name = install()
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from relay.ops.service import make_node_service

    try:
        config = load_config(options["config"])
        if options["log-format"] == "json":
            from twisted.logger import globalLogPublisher

            from relay.ops.logfmt import json_observer

            globalLogPublisher.addObserver(json_observer(sys.stdout))

        from relay.ops.notify import SystemdNotifier

        node = make_node_service(config, reactor, on_fatal=_Fatal(reactor),
                                 load=lambda: load_config(options["config"]),
                                 notifier=SystemdNotifier(), handle_sighup=True,
                                 pace_gc=True, hangup=hangup)
    except ConfigError as e:
        raise SystemExit(f"labrelay: {e}") from None
    return TwistdRoot(node, getattr(options, "parent", None), reactor_name)


class _Fatal:
    """What a fatal error does under twistd: log it, stop the reactor, and make twistd
    exit with status 1.  twistd itself exits 0 whenever its reactor stops (unless a
    signal stopped it), which would tell systemd (``Restart=on-failure``) and scripts
    that nothing went wrong; an exit hook that runs after twistd's own clean-up (pid
    file removed, logs flushed) sets the status instead."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._armed = False

    def __call__(self, why: str) -> None:
        _log.critical("{why}; stopping", why=why, event="fatal")
        if not self._armed:
            self._armed = True
            atexit.register(_exit_failed)
        # twistd starts the services before its reactor runs: a port that cannot be
        # bound is found then, and the reactor is stopped as soon as it runs.
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
