"""Promises of the docs and the help text that code can check directly: the options a
command says it takes are the ones it takes, and the operator's table of what a reload
applies names exactly the keys the reload keeps until a restart; the defaults the
settings tables state are the loader's; the metrics table names exactly the families
served, with their labels.  (The promises that
need a running relay are in the table "Promises and their tests" of docs/config.md.)
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from relay.cli.main import build_parser
from relay.config import diff
from relay.config.loader import parse_config
from relay.config.schema import HostPort, RelayConfig
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



# -- the defaults the settings tables state ---------------------------------------------
#
# relay.md's ``[relay]``, ``[relay.penalties]`` and ``[relay.crowding]`` tables and
# config.md's ``[admin]``, ``[[link]]`` and ``[relay]`` tables give a default for each
# key: an operator sizes by them and leaves the key out.  Each row whose default is a
# TOML value (or "none"/"unset") is checked against what the loader gives a file that
# leaves the key out.  (Round 20's audit: ten of them were checked, by hand, above.)

_NODE = parse_config('[relay]\n[admin]\n[[link]]\nhost = "h"\n', "t.toml", base_dir=Path("/"))
_TLS = parse_config('[relay]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n', "t.toml",
                    base_dir=Path("/")).relay.tls  # type: ignore[union-attr]
# keys whose schema field has another name, or lives in a nested value
_FIELD: dict[str, Callable[[Any], object]] = {
    "keepalive_interval": lambda c: c.keepalive.interval,
    "keepalive_count": lambda c: c.keepalive.count_max,
    "backoff_initial": lambda c: c.backoff.initial,
    "backoff_max": lambda c: c.backoff.maximum,
    "backoff_factor": lambda c: c.backoff.factor,
    "backoff_jitter": lambda c: c.backoff.jitter,
    "transport": lambda c: c.transport.mode,
    "tls_port": lambda c: c.transport.tls_port,
    "strict_host_key_checking": lambda c: "accept-new" if c.host_key.accept_new else "yes",
    "identity": lambda c: c.identities,
    "host_key": lambda c: c.host_key.fingerprint,
    "proxy": lambda c: c.transport.proxy,
    "tls_pin": lambda c: c.transport.pin,
    "tls_cert": lambda c: c.tls,  # none: no TLS port at all
    # the TLS port's keys, once tls_cert is set (_TLS)
    "tls_listen": lambda c: _TLS.listen,
    "tls_handshake_timeout": lambda c: _TLS.handshake_timeout,
}
_HOLDERS: dict[str, Any] = {
    "relay": _NODE.relay, "admin": _NODE.admin, "link": _NODE.links[0],
    "relay.penalties": _NODE.relay.penalties if _NODE.relay else None,
    "relay.crowding": _NODE.relay.crowding if _NODE.relay else None,
}


def _section_of(doc: str, heading: str, intro: str) -> str | None:
    """Which section a settings table documents, from the heading above it and the
    paragraph just before it (relay.md's penalties and crowding tables follow theirs)."""
    for name in ("relay.penalties", "relay.crowding"):
        if intro.startswith(f"`[{name}]`"):
            return name
    if doc == "relay.md":
        return "relay"
    for marker, section in (("`[admin]`", "admin"), ("`[[link]]`", "link"),
                            ("`[relay]`", "relay")):
        if marker in heading:
            return section
    return None  # config.md's forward tables: no defaults the loader fills


def _stated(cell: str) -> tuple[bool, object]:
    """(checkable, value) of a default cell: a backticked TOML value, maybe followed by
    words in parentheses ("`2097152` (2 MiB)"), or none/unset."""
    if cell in ("none", "unset") or cell.startswith(("none (no ", "none: ")):
        return True, None
    found = re.fullmatch(r"`([^`]+)`(?: \(.*\))?", cell)
    if found is None:
        return False, None
    try:
        return True, tomllib.loads(f"v = {found.group(1)}")["v"]
    except tomllib.TOMLDecodeError:
        return False, None


def _default_rows() -> list[tuple[str, str, object]]:
    """(doc:line, section.key, stated default) of every checkable row."""
    rows = []
    for doc, header, default_col in [("relay.md", "| key | default | meaning |", 1),
                                     ("config.md", "| key | type | default | valid | example |",
                                      2)]:
        heading = intro = previous = ""
        section: str | None = None
        for number, line in enumerate((DOCS / doc).read_text().splitlines(), 1):
            previous, blank_before = line, not previous.strip()
            if line.startswith("#"):
                heading = line
            elif line.strip() == header:
                section = _section_of(doc, heading, intro)
            elif line.startswith("|") and section is not None:
                if line.startswith("|---"):
                    continue
                cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
                key = cells[0].strip("`")
                checkable, stated = _stated(cells[default_col])
                if re.fullmatch(r"[a-z_0-9]+", key) and checkable:
                    rows.append((f"{doc}:{number}", f"{section}.{key}", stated))
            elif not line.startswith("|"):
                section = None
                if line.strip() and blank_before:
                    intro = line  # a paragraph's first line
    return rows


def _loaded(section_key: str) -> object:
    section, _, key = section_key.rpartition(".")
    holder = _HOLDERS[section]
    value = _FIELD[key](holder) if key in _FIELD else getattr(holder, key)
    if isinstance(value, (tuple, list)):
        return [str(v) for v in value] or None  # an empty list: "none" and `[]` alike
    if isinstance(value, (HostPort, Path)):
        return str(value)
    return value


DEFAULT_ROWS = _default_rows()


def test_the_settings_tables_are_read() -> None:
    """The parse above finds the tables (a reworded header must not make the check
    below vacuous): every [relay], penalties, crowding, admin and link table."""
    sections = {key.rpartition(".")[0] for _, key, _ in DEFAULT_ROWS}
    assert sections == {"relay", "relay.penalties", "relay.crowding", "admin", "link"}, sections
    assert len(DEFAULT_ROWS) >= 80, len(DEFAULT_ROWS)


@pytest.mark.parametrize(("where", "key", "stated"), DEFAULT_ROWS,
                         ids=[f"{key}@{where}" for where, key, _ in DEFAULT_ROWS])
def test_a_stated_default_is_the_loaders(where: str, key: str, stated: object) -> None:
    assert _loaded(key) == (stated or None if stated == [] else stated), (where, key)



# -- the metrics table --------------------------------------------------------------------


def _documented_families() -> list[tuple[list[str], set[str] | None, bool]]:
    """operations.md's metrics table, row by row: the readings of each family name it
    gives (``…_x`` after ``labrelay_relay_fast_paired_total`` may be
    ``labrelay_relay_fast_x`` or ``labrelay_relay_x``: every shorter prefix of the row's
    first name), the labels its label column names (None where it is prose), and whether
    the row joins families of different kinds with ``;`` (the labels then are the last
    one's)."""
    text = (DOCS / "operations.md").read_text()
    section = text[text.index("### Metrics"):text.index("## Exit status")]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names_cell, _kind, labels_cell = [c.strip() for c in
                                          line.strip().strip("|").split(" | ")][:3]
        names = re.findall(r"`([a-z_*…]+)`", names_cell)
        while "(" in labels_cell:  # values in parentheses, not labels
            labels_cell = re.sub(r"\([^()]*\)", "", labels_cell)
        labels = None
        if labels_cell.startswith("`") or not labels_cell:
            labels = set(re.findall(r"`([a-z_]+)`", re.split(r"[:;]", labels_cell)[0]))
        words = names[0].split("_")
        for name in names:
            if name.startswith("…_"):
                readings = ["_".join(words[:n]) + name[1:] for n in range(len(words) - 1, 1, -1)]
            else:
                readings = [name]
            rows.append(([r.removesuffix("_total") for r in readings], labels, ";" in names_cell))
    return rows


def _exposed(tmp_path: Path) -> dict[str, tuple[str, ...]]:
    """Every family a node with a relay (data port on), a link with a forward and a plain
    hop exposes at /metrics (the collector the admin endpoint serves; nothing started),
    with its label names."""
    import os

    from relay.ops.metrics import MetricsRegistry
    from relay.ops.service import make_node_service
    from relay.testing import new_key

    key = tmp_path / "id"
    key.write_bytes(new_key().key.toString("OPENSSH"))
    os.chmod(key, 0o600)
    (tmp_path / "known_hosts").write_text("")
    text = f"""
[relay]
listen = "127.0.0.1:0"
state_dir = "{tmp_path}/state"
data_port = 0
[[link]]
host = "relay.example.org"
identity = "{key}"
known_hosts = "{tmp_path}/known_hosts"
[[link.remote]]
listen = "2201"
connect = "gpu:22"
[[forward]]
listen = "127.0.0.1:0"
connect = "127.0.0.1:9"
"""
    config = parse_config(text, str(tmp_path / "node.toml"), base_dir=tmp_path)
    node = make_node_service(config, MemoryReactorClock(), load=lambda: config)
    registry = MetricsRegistry(node.status).registry
    return {family.name: tuple(getattr(family, "_labelnames", ()))
            for family in registry.collect()}


def test_every_family_the_metrics_table_names_is_exposed_with_its_labels(
        tmp_path: Path) -> None:
    """An operator writes alerts and dashboards from operations.md's table: each family
    it names must be served, with the labels it names (a renamed family or label breaks
    every alert on it, silently).  Round 20's audit: 30 of the 50 names were in no test."""
    exposed = _exposed(tmp_path)
    rows = _documented_families()
    assert len(rows) >= 50, len(rows)
    for readings, labels, joined in rows:
        if readings == ["process_*"]:
            assert any(name.startswith("process_") for name in exposed)
            continue
        found = [r for r in readings if r in exposed]
        assert len(found) == 1, (readings, found)
        have = set(exposed[found[0]])
        if labels is not None and found[0].startswith("labrelay_"):  # not the library's
            assert have == labels or (joined and not have), (found[0], have, labels)


def test_every_exposed_family_is_in_the_metrics_table(tmp_path: Path) -> None:
    """The other way round: a family served but not in the table is one an operator
    cannot know of (or one left behind by a rename)."""
    documented = {r for readings, _, _ in _documented_families() for r in readings}
    missing = {name for name in _exposed(tmp_path)
               if name not in documented and not name.startswith("process_")}
    assert not missing, sorted(missing)


# -- the event tables ---------------------------------------------------------------------

RELAY_SOURCES = Path(__file__).resolve().parents[2] / "relay"


def test_every_event_the_log_tables_name_is_logged_by_the_code() -> None:
    """operations.md's event tables (the agent's and the relay's, under "Logs") are
    what an operator greps and alerts on: an event renamed in the code and not in the
    table leaves a silent alert.  Each name in the first column must be an
    ``event="…"`` somewhere in relay/ (the tests that assert each event's moment are
    the features' own).  Round 20's audit checked this by hand; all 60 rows held."""
    text = (DOCS / "operations.md").read_text()
    section = text[text.index("\n## Logs"):text.index("\n### Audit log")]
    named = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            named |= set(re.findall(r"`([a-z_]+)`", line.split(" | ")[0]))
    assert len(named) >= 60, len(named)
    logged = set()
    for source in RELAY_SOURCES.rglob("*.py"):
        logged |= set(re.findall(r'event="([a-z_]+)"', source.read_text()))
    assert named - logged == set(), sorted(named - logged)


def test_every_event_the_code_logs_is_named_in_the_docs() -> None:
    """The other way round: an event the code logs that no doc names is one an operator
    cannot know to alert on (round 20's audit found 19, among them `forward_failed`,
    `tls_refused` and `relay_public_failed`).  Named anywhere in docs/ counts: most are
    in operations.md's tables, a few in the feature's own page.  `demo_proof` is
    `labrelay demo`'s own line, which it prints (README)."""
    docs = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    logged = set()
    for source in RELAY_SOURCES.rglob("*.py"):
        logged |= set(re.findall(r'event="([a-z_]+)"', source.read_text()))
    assert len(logged) >= 120, len(logged)
    unnamed = {e for e in logged if f"`{e}`" not in docs} - {"demo_proof"}
    assert unnamed == set(), sorted(unnamed)


TESTS = Path(__file__).resolve().parents[1]
_TEST_REF = re.compile(r"((?:tests/)?[\w/]*test_\w+\.py)(?:::(.+))?$")
_FRAGMENT = re.compile(r"…?[a-z][a-z0-9_]*…?$")


@functools.cache
def _test_names() -> dict[str, set[str]]:
    """Every test module under tests/, by its path from the repository root, with the
    names of the functions and classes it defines (at any depth)."""
    import ast
    found: dict[str, set[str]] = {}
    for path in TESTS.rglob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found[str(path.relative_to(TESTS.parent))] = {
            node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    return found


def _dangling(text: str, modules: dict[str, set[str]]) -> list[str]:
    """The backquoted test references in ``text`` that name no test: a module that does
    not exist, or ``module::name`` (``…`` standing for an elided part) that matches no
    function of it.  A bare backquoted ``…fragment…`` right after a module reference is
    read as a further name in that module, as the tables write them."""
    problems: list[str] = []
    current: list[str] = []
    for token in re.findall(r"`([^`\n]+)`", text):
        ref = _TEST_REF.match(token)
        if ref:
            module, names = ref.group(1), ref.group(2)
            current = ([module] if module in modules else []) if module.startswith("tests/") \
                else [m for m in modules if m.endswith("/" + module)]
            if not current:
                problems.append(f"{token}: no such test module")
            elif names:
                problems += _unmatched(token, names, current, modules)
        elif current and "…" in token and _FRAGMENT.match(token):
            problems += _unmatched(token, token, current, modules)
        elif not _FRAGMENT.match(token):
            current = []
    return problems


def _unmatched(token: str, names: str, within: list[str],
               modules: dict[str, set[str]]) -> list[str]:
    pieces = [p.split("[")[0].strip("._") for p in names.split("…")]
    wanted = [p for p in pieces if p]
    defined = set().union(*(modules[m] for m in within))
    if all(any(piece in name for name in defined) for piece in wanted):
        return []
    return [f"{token}: no test of {', '.join(within)} has that name"]


@pytest.mark.parametrize("doc", [*sorted(p.name for p in DOCS.glob("*.md")), "../README.md"])
def test_every_test_the_docs_name_exists(doc: str) -> None:
    """A doc that says which test holds a promise (config.md's "Promises and their
    tests", resilience.md, security.md, …) names a module and a test that exist: a test
    renamed or deleted leaves a row that points at nothing, and the promise looks held
    when no test holds it (round 20's second audit)."""
    problems = _dangling((DOCS / doc).read_text(encoding="utf-8"), _test_names())
    assert not problems, problems


def test_a_dangling_test_reference_is_found() -> None:
    """The check above can fail: a renamed test, a missing module and a wrong elided
    fragment are each reported; the real names are not."""
    modules = {"tests/unit/test_a.py": {"test_one_thing_holds", "test_other"}}
    assert _dangling("`tests/unit/test_a.py::test_one_thing_holds` "
                     "`test_a.py::test_one…holds` (`…other`)", modules) == []
    assert len(_dangling("`tests/unit/test_a.py::test_one_thing_held` `test_b.py` "
                         "`test_a.py` (`…another…`)", modules)) == 3
