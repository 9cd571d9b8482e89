"""The reloadable parts of a node: its links, its plain hops, its relay.

Each part turns the pure diff of its section (:mod:`relay.config.diff`) into service
starts and stops on the running :class:`~relay.ops.service.NodeService`; the
:class:`~relay.ops.reload.Reloader` calls them in order once the new config passed
every check.  What a change does not name keeps running: a link whose only change is
its forwards keeps its connection and its sessions.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger

from relay.config import diff
from relay.config.errors import ConfigError
from relay.config.schema import LinkConfig, NodeConfig, PlainForwardConfig

_log = Logger(namespace="labrelay.reload")


class Node(Protocol):
    """What the parts change on the running node (the ``NodeService``)."""

    links: list[Any]
    plain_forwards: list[Any]
    relay: Any

    def startLink(self, config: NodeConfig, link: LinkConfig) -> Any: ...

    def stopLink(self, link: Any) -> Any: ...

    def startPlain(self, forward: PlainForwardConfig) -> Any: ...

    def stopPlain(self, plain: Any) -> Any: ...


def _logged(changes: list[str]) -> list[str]:
    for change in changes:
        _log.info("reload: {change}", event="reload_change", change=change)
    return changes


class LinksPart:
    """``[[link]]``: links started, stopped or restarted; forwards added and cancelled."""

    name = "links"

    def __init__(self, node: Node) -> None:
        self.node = node

    def check(self, old: NodeConfig, new: NodeConfig) -> list[ConfigError]:
        return []  # the key files of every link are checked by node_problems

    def apply(self, old: NodeConfig, new: NodeConfig) -> list[str]:
        changes = []
        by_name = {link.name: link for link in self.node.links}
        configs = {link.name: link for link in new.links}
        for action in diff.diff_links(old.links, new.links):
            match action:
                case diff.StopLink(was):
                    self.node.stopLink(by_name.pop(was.name))
                case diff.StartLink(link):
                    by_name[link.name] = self.node.startLink(new, link)
                case diff.RestartLink(was, link, _):
                    self.node.stopLink(by_name.pop(was.name))
                    by_name[link.name] = self.node.startLink(new, link)
                case diff.LinkSettings(link, _):
                    by_name[link.name].reconfigure(link)
                case diff.RemoveForward(name, forward):
                    by_name[name].removeForward(configs[name], forward)
                case diff.AddForward(name, forward):
                    by_name[name].addForward(configs[name], forward)
            changes.append(diff.describe(action))
        self.node.links[:] = [by_name[link.name] for link in new.links]
        return _logged(changes)


class PlainForwardsPart:
    """``[[forward]]``: plain hops started and stopped (a changed one is both)."""

    name = "forwards"

    def __init__(self, node: Node) -> None:
        self.node = node

    def check(self, old: NodeConfig, new: NodeConfig) -> list[ConfigError]:
        return []

    def apply(self, old: NodeConfig, new: NodeConfig) -> list[str]:
        changes = []
        by_name = {plain.name: plain for plain in self.node.plain_forwards}
        for action in diff.diff_plain_forwards(old.forwards, new.forwards):
            match action:
                case diff.StopPlain(was):
                    self.node.stopPlain(by_name.pop(was.name))
                case diff.StartPlain(forward):
                    by_name[forward.name] = self.node.startPlain(forward)
            changes.append(diff.describe(action))
        self.node.plain_forwards[:] = [by_name[f.name] for f in new.forwards]
        return _logged(changes)


class RelayPart:
    """``[relay]``: live settings and grants (the grant files are re-read on every
    reload, as sshd re-reads its files on SIGHUP); restart-only keys are reported."""

    name = "relay"

    def __init__(self, node: Node) -> None:
        self.node = node

    def check(self, old: NodeConfig, new: NodeConfig) -> list[ConfigError]:
        return []  # the grants are checked by node_problems

    def apply(self, old: NodeConfig, new: NodeConfig) -> list[str]:
        changes = []
        core = self.node.relay.core if self.node.relay is not None else None
        settings = None
        for action in [*diff.diff_relay(old.relay, new.relay),
                       *diff.diff_admin(old.admin, new.admin)]:
            if isinstance(action, diff.NeedsRestart):
                _log.warn("reload: {keypath} changed but is not applied until a restart "
                          "({why})", event="reload_needs_restart", keypath=action.keypath,
                          why=action.why)
            else:
                settings = action
            changes.append(diff.describe(action))
        if core is not None:
            if settings is not None:
                core.reconfigure(settings.new)
            else:
                core.grants.reload()
        if (settings is not None and "next_host_key" in settings.fields
                and self.node.relay is not None):
            # Announced to the connections that log in from now on (checked with the
            # rest of the config before any part applied: relay.ops.check).
            changes.append(self.node.relay.setNextHostKey(settings.new.next_host_key))
        # The TLS certificate files are re-read too (new handshakes also notice a change
        # by themselves: relay.transport.tlsserver.CertificateSource).
        if self.node.relay is not None and self.node.relay.reloadCertificates():
            changes.append("relay: TLS certificate reloaded")
        return _logged(changes)


def default_parts(node: Node) -> list[Any]:
    """The parts every node has, in the order they apply."""
    return [RelayPart(node), LinksPart(node), PlainForwardsPart(node)]
