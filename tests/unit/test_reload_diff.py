"""The reload's sans-IO diff (relay.config.diff) and the Reloader's all-or-nothing rule
(relay.ops.reload) with plain parts: no reactor, no sockets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from relay.config import diff
from relay.config.errors import ConfigError, ConfigErrors
from relay.config.loader import parse_config
from relay.config.schema import NodeConfig
from relay.ops.reload import Reloader

BASE = """\
[[link]]
name = "cloud"
host = "relay.example.org"
identity = "/k"
known_hosts = "/kh"

[[link.remote]]
listen = "gpu-cluster:22"
connect = "10.0.0.5:22"
name = "gpu"

[[link.local]]
listen = "127.0.0.1:8888"
connect = "jupyter:8888"
name = "jupyter"

[[link]]
name = "backup"
host = "backup.example.org"
identity = "/k"
known_hosts = "/kh"

[[forward]]
listen = "127.0.0.1:2201"
connect = "10.0.0.5:22"
name = "hop"

[relay]
listen = "0.0.0.0:2222"
max_sessions_per_user = 8

[[relay.agent]]
name = "lab_pc"
keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBUYQ1BAWDNbB+RDfTw+aDhQTjOiUNO9XmXSvMyzu9nZ lab"]
services = ["gpu-cluster:22"]
"""


def config(text: str = BASE) -> NodeConfig:
    return parse_config(text, "/etc/labrelay/node.toml")


def test_same_config_changes_nothing() -> None:
    assert diff.plan(config(), config()) == []


def test_reordered_entries_change_nothing() -> None:
    old = config()
    new = dataclasses.replace(old, links=tuple(reversed(old.links)))
    assert diff.diff_links(old.links, new.links) == []


def test_a_forward_added_and_one_removed_keep_the_link() -> None:
    old = config()
    new = config(BASE.replace('name = "jupyter"', 'name = "jupyter"\n\n[[link.remote]]\n'
                              'listen = "web:8080"\nconnect = "10.0.0.6:80"\nname = "web"')
                 .replace('listen = "gpu-cluster:22"\nconnect = "10.0.0.5:22"\nname = "gpu"',
                          'listen = "gpu-cluster:22"\nconnect = "10.0.0.7:22"\nname = "gpu"'))
    actions = diff.diff_links(old.links, new.links)
    assert [type(a).__name__ for a in actions] == ["RemoveForward", "AddForward", "AddForward"]
    removed, *added = actions
    assert isinstance(removed, diff.RemoveForward) and removed.forward.name == "gpu"
    assert {a.forward.name for a in added} == {"gpu", "web"}  # type: ignore[attr-defined]
    assert all(a.link == "cloud" for a in actions)  # type: ignore[attr-defined]


def test_a_link_whose_connection_changed_restarts_and_others_do_not() -> None:
    old = config()
    new = config(BASE.replace('host = "backup.example.org"', 'host = "backup2.example.org"'))
    [action] = diff.diff_links(old.links, new.links)
    assert isinstance(action, diff.RestartLink) and action.fields == ("host",)
    assert diff.describe(action) == "link backup: restarted (host changed)"


def test_links_removed_first_then_started() -> None:
    old = config()
    text = BASE.replace('name = "backup"', 'name = "other"')
    actions = diff.diff_links(old.links, config(text).links)
    assert [type(a) for a in actions] == [diff.StopLink, diff.StartLink]


def test_plain_forward_changed_is_stopped_then_started() -> None:
    old = config()
    new = config(BASE.replace('listen = "127.0.0.1:2201"', 'listen = "127.0.0.1:2202"'))
    actions = diff.diff_plain_forwards(old.forwards, new.forwards)
    assert [type(a) for a in actions] == [diff.StopPlain, diff.StartPlain]


def test_relay_live_settings_and_restart_only_keys() -> None:
    old = config()
    new = config(BASE.replace('max_sessions_per_user = 8', 'max_sessions_per_user = 2\n'
                              'idle_timeout = 60')
                 .replace('listen = "0.0.0.0:2222"', 'listen = "0.0.0.0:2223"'))
    actions = diff.diff_relay(old.relay, new.relay)
    restart = [a for a in actions if isinstance(a, diff.NeedsRestart)]
    [settings] = [a for a in actions if isinstance(a, diff.RelaySettings)]
    assert [a.keypath for a in restart] == ["relay.listen"]
    assert settings.fields == ("max_sessions_per_user", "idle_timeout")
    assert not settings.grants
    assert settings.new.listen == old.relay.listen  # type: ignore[union-attr]
    assert settings.new.max_sessions_per_user == 2


def test_relay_grant_change_asks_for_the_grants() -> None:
    old = config()
    new = config(BASE.replace('services = ["gpu-cluster:22"]',
                              'services = ["gpu-cluster:22", "web:8080"]'))
    [settings] = diff.diff_relay(old.relay, new.relay)
    assert isinstance(settings, diff.RelaySettings) and settings.grants
    assert settings.fields == ("agents",)


def test_adding_the_relay_or_moving_admin_needs_a_restart() -> None:
    old = config()
    assert [a.keypath for a in diff.diff_relay(None, old.relay)] == ["relay"]  # type: ignore[union-attr]
    assert diff.diff_admin(None, None) == []
    new = config(BASE + '\n[admin]\nlisten = "127.0.0.1:7023"\n')
    [action] = diff.diff_admin(old.admin, new.admin)
    assert action.keypath == "admin"


def test_loader_reports_a_problem_in_every_entry() -> None:
    text = BASE.replace('host = "relay.example.org"', 'host = 5').replace(
        'connect = "10.0.0.5:22"\nname = "hop"', 'connect = "nowhere"\nname = "hop"').replace(
        "max_sessions_per_user = 8", "max_sessions_per_user = 0")
    with pytest.raises(ConfigErrors) as caught:
        config(text)
    paths = [e.keypath for e in caught.value.errors]
    assert paths == ["link[0].host", "relay.max_sessions_per_user", "forward[0].connect"]
    assert str(caught.value).startswith("3 problems:\n  /etc/labrelay/node.toml: link[0].host")


def test_loader_one_problem_is_one_plain_error() -> None:
    with pytest.raises(ConfigError) as caught:
        config(BASE.replace('host = "relay.example.org"', 'host = 5'))
    assert not isinstance(caught.value, ConfigErrors)


# --- the Reloader: all parts check before any applies --------------------------------


class Part:
    def __init__(self, name: str, problems: list[ConfigError] | None = None) -> None:
        self.name = name
        self.problems = problems or []
        self.applied: list[tuple[NodeConfig, NodeConfig]] = []

    def check(self, old: NodeConfig, new: NodeConfig) -> list[ConfigError]:
        return list(self.problems)

    def apply(self, old: NodeConfig, new: NodeConfig) -> list[str]:
        self.applied.append((old, new))
        return [f"{self.name}: {len(diff.plan(old, new))} change(s)"]


class Notes:
    def __init__(self) -> None:
        self.said: list[str] = []

    def reloading(self) -> None:
        self.said.append("RELOADING")

    def ready(self, status: str) -> None:
        self.said.append(f"READY {status}")


def test_reloader_applies_every_part_with_old_and_new() -> None:
    old = config()
    new = config(BASE.replace("max_sessions_per_user = 8", "max_sessions_per_user = 3"))
    parts, notes, clock = [Part("a"), Part("b")], Notes(), Clock()
    clock.advance(100)
    reloader = Reloader(old, lambda: new, parts, clock, notifier=notes)  # type: ignore[arg-type]
    result = reloader.reload()
    assert result.ok and result.changes == ["a: 1 change(s)", "b: 1 change(s)"]
    assert [p.applied for p in parts] == [[(old, new)], [(old, new)]]
    assert reloader.config is new and reloader.last_success == 100
    assert notes.said == ["RELOADING", "READY reloaded"]


def test_reloader_a_problem_anywhere_changes_nothing_and_lists_all() -> None:
    old = config()
    new = config(BASE.replace("max_sessions_per_user = 8", "max_sessions_per_user = 3"))
    bad = ConfigError("cert.pem", "tls.cert", "cannot read it")
    parts = [Part("a"), Part("tls", [bad])]
    node = ConfigError("node.toml", "link[0].identity", "no such file")
    notes = Notes()
    reloader = Reloader(old, lambda: new, parts, Clock(),  # type: ignore[arg-type]
                        check=lambda c: [node], notifier=notes)
    result = reloader.reload()
    assert not result.ok and result.errors == [str(node), str(bad)]
    assert [p.applied for p in parts] == [[], []] and reloader.config is old
    assert reloader.counts == {"success": 0, "failure": 1}
    assert notes.said[-1].startswith("READY reload failed")


def test_reloader_a_file_that_does_not_parse_changes_nothing(tmp_path: Path) -> None:
    old = config()

    def load() -> NodeConfig:
        raise ConfigErrors([ConfigError("f", "a", "x"), ConfigError("f", "b", "y")])

    part = Part("a")
    result = Reloader(old, load, [part], Clock()).reload()  # type: ignore[list-item]
    assert not result.ok and result.errors == ["f: a: x", "f: b: y"] and part.applied == []


# --- the parts turn the diff into starts and stops on the node ------------------------


class FakeLink:
    def __init__(self, config: object) -> None:
        self.config = config
        self.name = config.name  # type: ignore[attr-defined]
        self.calls: list[tuple[str, str]] = []

    def addForward(self, config: object, forward: object) -> None:
        self.config = config
        self.calls.append(("add", forward.name))  # type: ignore[attr-defined]

    def removeForward(self, config: object, forward: object) -> None:
        self.config = config
        self.calls.append(("remove", forward.name))  # type: ignore[attr-defined]

    def reconfigure(self, config: object) -> None:
        self.config = config
        self.calls.append(("reconfigure", ""))


class FakeNode:
    def __init__(self, config: NodeConfig) -> None:
        self.links = [FakeLink(link) for link in config.links]
        self.plain_forwards: list[object] = []
        self.relay = None
        self.log: list[str] = []

    def startLink(self, config: NodeConfig, link: object) -> FakeLink:
        self.log.append(f"start {link.name}")  # type: ignore[attr-defined]
        return FakeLink(link)

    def stopLink(self, link: FakeLink) -> None:
        self.log.append(f"stop {link.name}")

    def startPlain(self, forward: object) -> object:
        self.log.append(f"start plain {forward.name}")  # type: ignore[attr-defined]
        return forward

    def stopPlain(self, plain: object) -> None:
        self.log.append(f"stop plain {plain.name}")  # type: ignore[attr-defined]


def test_links_part_keeps_unchanged_links_and_their_objects() -> None:
    from relay.ops.parts import LinksPart, PlainForwardsPart

    old = config()
    node = FakeNode(old)
    cloud, backup = node.links
    new = config(BASE.replace('host = "backup.example.org"', 'host = "b2.example.org"')
                 .replace('name = "jupyter"', 'name = "jupyter2"')
                 .replace('name = "hop"', 'name = "hop2"'))
    changes = LinksPart(node).apply(old, new)  # type: ignore[arg-type]
    assert node.log == ["stop backup", "start backup"]
    assert cloud.calls == [("remove", "jupyter"), ("add", "jupyter2")]
    assert node.links[0] is cloud and node.links[1] is not backup
    assert changes == ["link cloud: forward jupyter removed", "link backup: restarted (host "
                       "changed)", "link cloud: forward jupyter2 added"]
    node.plain_forwards[:] = list(old.forwards)
    assert PlainForwardsPart(node).apply(old, new) == [  # type: ignore[arg-type]
        "forward hop: stopped", "forward hop2: started"]
    assert [f.name for f in node.plain_forwards] == ["hop2"]  # type: ignore[attr-defined]


def test_the_session_caps_of_a_link_are_applied_without_restarting_it() -> None:
    """``max_sessions``/``max_connecting`` (round 19) are live: the running link takes
    them, its sessions and its connection stay; with any other link key they go with
    the restart."""
    from relay.ops.parts import LinksPart

    old = config()
    new = config(BASE.replace('known_hosts = "/kh"\n\n[[link.remote]]',
                              'known_hosts = "/kh"\nmax_sessions = 50\nmax_connecting = 5\n'
                              'max_sessions_per_target = 20\n\n[[link.remote]]'))
    assert diff.diff_links(old.links, new.links) == [diff.LinkSettings(
        new.links[0], ("max_sessions", "max_connecting", "max_sessions_per_target"))]
    node = FakeNode(old)
    cloud = node.links[0]
    changes = LinksPart(node).apply(old, new)  # type: ignore[arg-type]
    assert node.log == [] and node.links[0] is cloud
    assert cloud.calls == [("reconfigure", "")]
    assert cloud.config.max_sessions == 50  # type: ignore[attr-defined]
    assert cloud.config.max_sessions_per_target == 20  # type: ignore[attr-defined]
    assert changes == ["link cloud: max_sessions, max_connecting, max_sessions_per_target "
                       "changed"]
    both = config(BASE.replace('host = "relay.example.org"',
                               'host = "r2.example.org"\nmax_sessions = 50'))
    (restart,) = diff.diff_links(old.links, both.links)
    assert isinstance(restart, diff.RestartLink) and restart.fields == ("host",)
    assert restart.new.max_sessions == 50
