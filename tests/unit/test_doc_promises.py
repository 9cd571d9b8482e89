"""Promises of the docs and the help text that code can check directly: the options a
command says it takes are the ones it takes, and the operator's table of what a reload
applies names exactly the keys the reload keeps until a restart.  (The promises that
need a running relay are in the table "Promises and their tests" of docs/config.md.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.cli.main import build_parser
from relay.config import diff
from relay.config.schema import RelayConfig
from relay.config.transport import OPTION_KEYS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._subparsers._actions  # type: ignore[union-attr]
               if a.choices and command in a.choices).choices[command]
    return " ".join(sub.format_help().split())


@pytest.mark.parametrize("command", ["agent", "connect"])
def test_help_names_every_transport_option(command: str) -> None:
    """``-o Transport=``, ``TLS*`` and ``Proxy=`` work for both commands (networks.md);
    ``labrelay connect --help`` once listed only ssh's options."""
    text = _help(command)
    for name in OPTION_KEYS:
        assert name in text, (command, name)


def test_resume_grace_help_says_the_default() -> None:
    import dataclasses

    from relay.config.schema import LinkConfig

    default = next(f.default for f in dataclasses.fields(LinkConfig) if f.name == "resume_grace")
    assert f"(default {default:g}; 0: never)" in _help("agent")


def _restart_row() -> str:
    table = (DOCS / "operations.md").read_text()
    [row] = [line for line in table.splitlines() if "**not applied**" in line]
    return row


GROUPS = {
    "the per-source limits and penalties": {"per_source_max_unauthenticated",
                                            "per_source_netblock4", "per_source_netblock6",
                                            "penalties", "penalty_exempt"},
    "`max_tokens_*`": {"max_tokens_per_session", "max_tokens_per_user"},
    "the `tls_*` keys": {"tls"},
}


def test_the_reload_table_names_exactly_the_restart_only_keys() -> None:
    """docs/operations.md's row of keys a reload does not apply, against
    ``diff.RELAY_RESTART_ONLY``: it once left out ``max_unauthenticated`` and
    ``data_hello_timeout``, which fell under "a limit or timeout: applied"."""
    row = _restart_row().split("|")[1]
    named = set(re.findall(r"`([a-z_0-9]+)`", row.split(";")[0])) - {"relay"}
    for group, keys in GROUPS.items():
        if group in row:
            named |= keys
    assert named == set(diff.RELAY_RESTART_ONLY), named ^ set(diff.RELAY_RESTART_ONLY)


def test_the_live_examples_are_applied_by_a_reload() -> None:
    table = (DOCS / "operations.md").read_text()
    [row] = [line for line in table.splitlines() if line.startswith("| a `[relay]` limit")]
    live = set(re.findall(r"`([a-z_0-9]+)`", row.split("|")[1]))
    assert "resume_grace" in live and "idle_timeout" in live
    assert not live & set(diff.RELAY_RESTART_ONLY), live & set(diff.RELAY_RESTART_ONLY)
    for key in live:
        assert hasattr(RelayConfig(), key), key


def test_reload_unreachable_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """``labrelay reload --help``: "exit 0 if applied, 1 if refused or unreachable"
    (refused: tests/integration/test_ops_reload.py)."""
    import socket

    from relay.cli.main import main

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert main(["reload", "--admin", f"127.0.0.1:{port}"]) == 1
    assert "cannot reach" in capsys.readouterr().err


# (field, its default, the doc, the words in it that state the default)
STATED_DEFAULTS = [
    ("kex_timeout", 30.0, "security.md", "`kex_timeout` (30 s)"),
    ("grants_poll_interval", 0.25, "security.md", "`grants_poll_interval` (0.25 s)"),
    ("max_unauthenticated", 64, "security.md", "(`max_unauthenticated`, 64 per port)"),
    ("per_source_max_unauthenticated", 10, "security.md",
     "**`per_source_max_unauthenticated`** (10)"),
    ("max_connections_per_user", 64, "security.md", "`max_connections_per_user` (64)"),
    ("resume_max_sessions_per_agent", 128, "security.md",
     "`resume_max_sessions_per_agent` (default 128)"),
    ("resume_max_sessions", 512, "security.md", "`resume_max_sessions` (default 512)"),
    ("resume_max_sessions_per_agent", 128, "resilience.md",
     "`resume_max_sessions_per_agent` (default 128)"),
    ("resume_max_sessions", 512, "resilience.md", "`resume_max_sessions` (default 512)"),
    ("resume_grace", 60.0, "resilience.md", "`resume_grace` (default 60 s)"),
]


@pytest.mark.parametrize(("field", "value", "doc", "words"), STATED_DEFAULTS)
def test_the_defaults_security_and_resilience_state_are_the_relays(
    field: str, value: float, doc: str, words: str,
) -> None:
    """A default stated in security.md or resilience.md is a promise an operator sizes
    by (a cap, a timeout): the relay's and the page's must not drift apart."""
    assert words in " ".join((DOCS / doc).read_text().split()), (doc, words)
    assert getattr(RelayConfig(), field) == value, field
