"""Reload: re-read the node config and apply only what changed (SIGHUP, ``labrelay reload``).

The shell around :mod:`relay.config.diff`.  A :class:`Reloader` holds the config in
force and a list of *reloadable parts*; a reload

1. reads the config again (every problem of the file at once, :func:`load` raising
   :class:`~relay.config.errors.ConfigErrors`);
2. checks it as start-up would (:func:`relay.ops.check.node_problems`: key files,
   grant files, the admin token) and asks every part to check its own section;
3. if anything is wrong, changes nothing and logs every problem (``reload_failed``);
4. else hands every part the old and the new config to apply (``reload_done``, with
   one line per change).

A part is anything with a ``name`` and ``check(old, new)``/``apply(old, new)``
(:class:`Reloadable`): the node's links, its plain hops, its relay (settings and
grants) are parts (:mod:`relay.ops.parts`); a new reloadable setting (TLS
certificates, per-user rate limits ...) is one more part appended to
:attr:`Reloader.parts`, with nothing else to change here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.logger import Logger

from relay.config.errors import ConfigError, ConfigErrors, OperatorText
from relay.config.schema import NodeConfig

_log = Logger(namespace="labrelay.reload")


class Reloadable(Protocol):
    """One part of a running node that a reload may change."""

    @property
    def name(self) -> str: ...

    def check(self, old: NodeConfig, new: NodeConfig) -> list[ConfigError]:
        """What in ``new`` this part could not apply (nothing is changed yet)."""
        ...

    def apply(self, old: NodeConfig, new: NodeConfig) -> list[str]:
        """Make the running part match ``new``; one line per change made (or left for
        a restart).  Called only once every part's check passed."""
        ...


@dataclass
class ReloadResult:
    """What one reload did: ``ok`` and the changes, or the problems (nothing changed)."""

    ok: bool
    at: float
    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "at": self.at, "changes": self.changes, "errors": self.errors}


class Notifier(Protocol):
    """What a reload tells the service manager (:class:`relay.ops.notify.SystemdNotifier`)."""

    def reloading(self) -> None: ...

    def ready(self, status: str) -> None: ...


def _flat(error: ConfigError) -> list[ConfigError]:
    return list(error.errors) if isinstance(error, ConfigErrors) else [error]


class Reloader:
    """Reloads one node: ``load()`` reads its config again, ``parts`` apply it."""

    def __init__(self, config: NodeConfig, load: Callable[[], NodeConfig],
                 parts: list[Reloadable], clock: Any,
                 check: Callable[[NodeConfig], list[ConfigError]] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.parts = parts
        self._load = load
        self._clock = clock
        self._check = check
        self.notifier = notifier
        self.last: ReloadResult | None = None
        self.counts = {"success": 0, "failure": 0}
        self.last_success: float | None = None

    def reload(self) -> ReloadResult:
        """Reload now; never raises for a bad config (the result says what was wrong)."""
        now = self._clock.seconds()
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            result = self._reload(now)
        finally:
            if self.notifier is not None:
                self.notifier.ready("reloaded" if self.last is None or self.last.ok
                                    else "reload failed; running the previous config")
        return result

    def _reload(self, now: float) -> ReloadResult:
        old = self.config
        try:
            new = self._load()
        except ConfigError as e:
            return self._failed(now, _flat(e))
        problems: list[ConfigError] = []
        if self._check is not None:
            problems += self._check(new)
        for part in self.parts:
            try:
                problems += part.check(old, new)
            except ConfigError as e:
                problems += _flat(e)
        if problems:
            return self._failed(now, problems)
        changes: list[str] = []
        for part in self.parts:
            try:
                changes += part.apply(old, new)
            except Exception:
                # A part that fails half-way must not stop the others: the config is
                # sound (it was checked), so what failed is logged and visible.
                _log.failure("reload: applying {part} failed", event="reload_part_failed",
                             part=part.name)
                changes.append(f"{part.name}: failed to apply (see the log)")
        self.config = new
        self.counts["success"] += 1
        self.last_success = now
        self.last = ReloadResult(True, now, changes)
        _log.info("config reloaded from {source}: {summary}", event="reload_done",
                  source=new.source, changes=changes,
                  summary="; ".join(changes) if changes else "nothing changed")
        return self.last

    def _failed(self, now: float, problems: list[ConfigError]) -> ReloadResult:
        errors: list[str] = [OperatorText(p) for p in problems]  # shown whole in the log
        self.counts["failure"] += 1
        self.last = ReloadResult(False, now, errors=errors)
        _log.error("reload refused, nothing changed: {n} problem(s): {problems}",
                   event="reload_failed", n=len(errors), errors=errors,
                   problems=OperatorText(" | ".join(errors)))
        return self.last

    def status(self) -> dict[str, Any]:
        return {
            "source": self.config.source,
            "reloads": dict(self.counts),
            "last_success": self.last_success,
            "last": self.last.as_dict() if self.last is not None else None,
        }
