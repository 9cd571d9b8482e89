"""The TOML walker: one table of the file with its key path, read key by key.

:class:`Section` refuses keys it does not know (guessing the one meant, including
OpenSSH's spellings), and reads strings, numbers, tables and arrays of tables with
the type and range errors every section shares, all located at the key path
(``relay.agent[1].keys[0]``).  What a section means is in :mod:`relay.config.loader`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from relay.config.errors import ConfigError, located

# OpenSSH spellings people will try, and what they are called here.
ALIASES = {
    "hostname": "host",
    "identityfile": "identity",
    "userknownhostsfile": "known_hosts",
    "globalknownhostsfile": "global_known_hosts",
    "stricthostkeychecking": "strict_host_key_checking",
    "serveraliveinterval": "keepalive_interval",
    "serveralivecountmax": "keepalive_count",
    "connecttimeout": "connect_timeout",
    "remoteforward": "remote",
    "localforward": "local",
    "links": "link",
    "listenaddress": "listen",
    "logingracetime": "login_grace",
    "maxauthtries": "max_auth_tries",
    "maxstartups": "max_unauthenticated",
    "persourcemaxstartups": "per_source_max_unauthenticated",
    "persourcenetblocksize": "per_source_netblock4",
    "persourcepenalties": "penalties",
    "persourcepenaltyexemptlist": "penalty_exempt",
    "max-sources4": "max_sources",
    "max-sources6": "max_sources",
    "maxsessions": "max_sessions",
    "clientaliveinterval": "keepalive_interval",
    "clientalivecountmax": "keepalive_count",
    "service": "services",
    "public_port": "public_ports",
}


def describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {value}"


def fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


class Section:
    """One TOML table with its key path; refuses keys it does not know."""

    def __init__(
        self, source: str, data: dict[str, Any], path: str, examples: Mapping[str, str]
    ) -> None:
        self.source = source
        self.data = data
        self.path = path
        self.examples = examples
        for key in data:
            if key not in examples:
                raise self._unknown(key)

    def _unknown(self, key: str) -> ConfigError:
        folded = key.lower().replace("-", "_")
        guess = ALIASES.get(key.lower())
        if guess is None and folded in self.examples:
            guess = folded
        if guess is None:
            close = difflib.get_close_matches(folded, list(self.examples), n=1, cutoff=0.6)
            guess = close[0] if close else None
        if guess is not None and guess in self.examples:
            hint = f"did you mean '{guess}'? e.g. {self.examples[guess]}"
        else:
            hint = "valid keys here: " + ", ".join(self.examples)
        return ConfigError(self.source, self.keypath(key), f"unknown key '{key}'", hint)

    def keypath(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str, hint: str | None = None) -> ConfigError:
        if hint is None:
            hint = f"e.g. {self.examples[key]}"
        return ConfigError(self.source, self.keypath(key), problem, hint)

    def at(self, key: str) -> AbstractContextManager[None]:
        return located(self.source, self.keypath(key))

    def boolean(self, key: str, default: bool) -> bool:
        """``key`` as true or false (TOML booleans only: not 0/1, not "yes")."""
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {describe(value)}")
        return value

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, f"missing required key '{key}'")
            return None
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {describe(value)}")
        if not value:
            raise self.error(key, "must not be empty")
        return value

    def strings(self, key: str) -> list[str]:
        """A string or an array of strings."""
        value = self.data.get(key)
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, str) or not item:
                what = "an empty string" if item == "" else describe(item)
                raise self.error(key, f"expected a string or an array of strings, got {what}")
        return items

    def integers(self, key: str, low: int, high: int) -> list[int]:
        """An integer or an array of integers, each between ``low`` and ``high``."""
        value = self.data.get(key)
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        for j, item in enumerate(items):
            where = f"{self.keypath(key)}[{j}]" if isinstance(value, list) else self.keypath(key)
            if isinstance(item, bool) or not isinstance(item, int):
                raise ConfigError(
                    self.source, where,
                    f"expected an integer or an array of integers, got {describe(item)}",
                    f"e.g. {self.examples[key]}",
                )
            if not low <= item <= high:
                raise ConfigError(
                    self.source, where, f"must be between {low} and {high}, got {item}",
                    f"e.g. {self.examples[key]}",
                )
        return items

    def integer(self, key: str, default: int, low: int, high: int | None = None) -> int:
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {describe(value)}")
        if value < low or (high is not None and value > high):
            limits = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.error(key, f"{key} must be {limits}, got {value}")
        return value

    def number(
        self,
        key: str,
        default: float,
        *,
        low: float,
        above: bool = False,
        high: float | None = None,
    ) -> float:
        """A finite int or float >= ``low`` (> ``low`` if ``above``) and <= ``high``."""
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {describe(value)}")
        if not math.isfinite(value):
            raise self.error(key, f"expected a finite number, got {value}")
        if value < low or (above and value == low):
            bound = f"greater than {fmt(low)}" if above else f"at least {fmt(low)}"
            raise self.error(key, f"{key} must be {bound}, got {value}")
        if high is not None and value > high:
            raise self.error(key, f"{key} must be at most {fmt(high)}, got {value}")
        return float(value)

    def table(self, key: str, examples: Mapping[str, str]) -> Section | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {describe(value)}")
        return Section(self.source, value, self.keypath(key), examples)

    def tables(self, key: str, examples: Mapping[str, str]) -> list[Section]:
        value = self.data.get(key)
        if value is None:
            return []
        full = self.keypath(key) if not self.path else f"{self.path.split('[')[0]}.{key}"
        hint = f"write one [[{full}]] table per entry, e.g. {self.examples[key]}"
        if not isinstance(value, list):
            raise self.error(
                key,
                f"expected an array of tables, got {describe(value)}",
                hint,
            )
        sections = []
        for i, item in enumerate(value):
            path = f"{self.keypath(key)}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(
                    self.source,
                    path,
                    f"expected a table, got {describe(item)}",
                    hint,
                )
            sections.append(Section(self.source, item, path, examples))
        return sections

