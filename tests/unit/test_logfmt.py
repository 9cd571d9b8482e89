"""relay.ops.logfmt: peer strings reach a log escaped and truncated, and never as a format.

The forged line below is what a pre-auth user name tried against the relay before the
fix: it showed in the text log as a line of its own.
"""

from __future__ import annotations

import ast
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Application, IService
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, textFileLogObserver
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from zope.interface import provider

from relay.config.errors import OperatorText
from relay.ops.logfmt import (
    CONTINUATION,
    FIELD_LIMIT,
    TEXT_LIMIT,
    escape,
    format_event,
    json_observer,
    sanitize_event,
    sanitizing_observer,
    text_observer,
)

FORGED = "mallory\n2026-01-01 00:00:00 info  user admin connected from 10.0.0.1"
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (debug|info |warn |error|critical) ")
RELAY = Path(__file__).resolve().parents[2] / "relay"


def emit(observer: ILogObserver, fmt: str, level: LogLevel = LogLevel.info,
         failure: Failure | None = None, **fields: Any) -> None:
    publisher = LogPublisher(observer)
    log = Logger(namespace="test", observer=publisher)
    if failure is not None:
        log.failure(fmt, failure, level, **fields)
    else:
        log.emit(level, fmt, **fields)


# --- escape ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("alice", "alice"),
        ("a b-c_d.e@f", "a b-c_d.e@f"),
        ("line\nbreak", "line\\nbreak"),
        ("cr\rtab\t", "cr\\rtab\\t"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("nul\x00del\x7f", "nul\\x00del\\x7f"),
        ("back\\slash", "back\\\\slash"),
        ("rtl\u202eevil", "rtl\\u202eevil"),
        ("nbsp\u00a0", "nbsp\\xa0"),
        ("emoji \U0001f600 ok", "emoji \U0001f600 ok"),
        ("ünïcödé", "ünïcödé"),
        (b"bytes\xff\xfe ok", "bytes\\xff\\xfe ok"),
        (b"utf8 \xc3\xa9", "utf8 é"),
        (b"esc\x1b", "esc\\x1b"),
    ],
)
def test_escape_makes_one_visible_line(raw: str | bytes, shown: str) -> None:
    assert escape(raw) == shown
    assert escape(raw).isprintable()


def test_escape_truncates_with_a_marker() -> None:
    big = "x" * (1024 * 1024)
    shown = escape(big)
    assert shown == "x" * FIELD_LIMIT + f"[... {1024 * 1024 - FIELD_LIMIT} more chars]"
    assert escape(b"y" * 300, 10) == "y" * 10 + "[... 290 more bytes]"
    assert escape("z" * FIELD_LIMIT) == "z" * FIELD_LIMIT  # exactly the limit: no marker
    assert escape("\n" * 5, 2) == "\\n\\n[... 3 more chars]"


def test_escape_without_backslash_leaves_escaped_text_alone() -> None:
    once = escape("a\nb\\c")
    assert escape(once, backslash=False) == once == "a\\nb\\\\c"


# --- events --------------------------------------------------------------------------


def test_sanitize_event_copies_and_escapes_fields_only() -> None:
    event = {"log_format": "user {user}", "log_level": LogLevel.info, "user": FORGED,
             "blob": b"\xff" * 1000, "n": 3, "log_text": "legacy\nline"}
    safe = sanitize_event(event)
    assert event["user"] == FORGED  # the shared event is not changed
    assert safe["user"] == FORGED.replace("\n", "\\n")
    assert safe["blob"] == "\\xff" * FIELD_LIMIT + "[... 800 more bytes]"
    assert safe["n"] == 3 and safe["log_format"] == "user {user}"
    assert safe["log_text"] == "legacy\\nline"


def test_operator_text_is_shown_whole_up_to_the_message_limit_and_still_escaped() -> None:
    """A message labrelay composed for the operator (a reload's problems, a host key's
    fix) keeps its end, which is the fix; it is still escaped and still bounded."""
    fix = "x" * 600 + "\n" + "ssh-keygen -R host"
    event = {"reason": OperatorText(fix), "errors": [OperatorText(fix), "y" * 600],
             "huge": OperatorText("z" * 10 * TEXT_LIMIT), "peer": "p" * 600}
    safe = sanitize_event(event)
    assert safe["reason"] == "x" * 600 + "\\n" + "ssh-keygen -R host"
    assert safe["errors"] == [safe["reason"], "y" * FIELD_LIMIT + "[... 400 more chars]"]
    assert safe["huge"].endswith(f"[... {9 * TEXT_LIMIT} more chars]")
    assert safe["peer"] == "p" * FIELD_LIMIT + "[... 400 more chars]"  # a plain str: as before


class Secret:
    def __init__(self) -> None:
        self.key = "PRIVATE HOST KEY"

    def __getitem__(self, item: object) -> str:
        return "PRIVATE HOST KEY"

    def __call__(self) -> str:
        return "PRIVATE HOST KEY"


@pytest.mark.parametrize(
    "fmt",
    [
        "Unsupported key type {log_source.key} or bad key",
        "Unsupported key type {log_source[0]} or bad key",
        "Unsupported key type {log_source()} or bad key",
        "Unsupported key type {0} or bad key",
        "Unsupported key type {nope} or bad key",
        "Unsupported key type {unbalanced or bad key",
    ],
)
def test_a_format_built_from_peer_bytes_reads_nothing(fmt: str) -> None:
    """Conch once logged a peer's key algorithm name *in* the format string; the
    formatter takes plain field names only, and shows such a format escaped."""
    text = format_event(sanitize_event({"log_format": fmt, "log_source": Secret(),
                                        "log_level": LogLevel.error, "peer": "1.2.3.4"}))
    assert "PRIVATE" not in text
    assert text.startswith("[unformatted: Unsupported key type")
    assert "peer=1.2.3.4" in text


def test_format_event_keeps_conversions_and_specs() -> None:
    event = sanitize_event({"log_format": "{a!r} {b:>4} {c:.1f} {{literal}}", "a": "x\ny",
                            "b": "z", "c": 2.25})
    assert format_event(event) == "'x\\\\ny'    z 2.2 {literal}"


def test_format_event_escapes_control_characters_in_the_format_and_caps_it() -> None:
    # Conch's own formats contain "\n" ("Disconnecting with error, code {code}\nreason: ...")
    text = format_event(sanitize_event({"log_format": "code {code}\nreason: {d}", "code": 2,
                                        "d": b"x"}))
    assert text == "code 2\\nreason: x"
    many = sanitize_event({"log_format": "{a}" * 50, "a": "q" * 500})
    assert len(format_event(many)) <= TEXT_LIMIT + 40


# --- observers -----------------------------------------------------------------------


def test_text_observer_writes_a_forged_user_name_on_one_line() -> None:
    out = io.StringIO()
    emit(text_observer(out), "auth refused for user {user} from {peer}: {why}",
         user=FORGED, peer="127.0.0.1:5000", why="bad key", event="relay_auth_refused")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and LINE.match(lines[0])
    assert "user mallory\\n2026-01-01 00:00:00 info  user admin" in lines[0]


def test_text_observer_truncates_a_one_mebibyte_name() -> None:
    out = io.StringIO()
    emit(text_observer(out), "auth refused for user {user}", user="A" * (1 << 20),
         event="relay_auth_refused")
    line = out.getvalue()
    assert line.count("\n") == 1 and len(line) < 400
    assert f"[... {(1 << 20) - FIELD_LIMIT} more chars]" in line


def test_text_observer_traceback_lines_are_continuations() -> None:
    try:
        raise ValueError(FORGED)
    except ValueError:
        failure = Failure()
    out = io.StringIO()
    emit(text_observer(out), "global request {type} failed", LogLevel.critical, failure,
         type=b"tcpip-forward\n2026-01-01 00:00:00 info  forged")
    lines = out.getvalue().splitlines()
    assert LINE.match(lines[0]) and "tcpip-forward\\n2026" in lines[0]
    assert len(lines) > 3
    assert all(line.startswith(CONTINUATION) for line in lines[1:]), lines
    # the exception's own line break only ever starts a continuation line
    assert CONTINUATION + "2026-01-01 00:00:00 info  user admin connected" in out.getvalue()


def test_text_observer_escapes_legacy_log_msg() -> None:
    out = io.StringIO()
    publisher = LogPublisher(text_observer(out))
    # what twisted.python.log.msg("...") becomes for a new-style observer
    publisher({"log_format": "{log_text}", "log_text": "legacy " + FORGED,
               "log_level": LogLevel.warn, "message": ("legacy " + FORGED,)})
    assert out.getvalue().count("\n") == 1 and "legacy mallory\\n2026" in out.getvalue()


def test_json_observer_fields_and_text_escaped_and_truncated() -> None:
    out = io.StringIO()
    emit(json_observer(out), "agent {agent} registered {service}", agent="lab\x1bpc",
         service="s" * 5000 + "\n", event="relay_service_registered", port=22)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "relay_service_registered" and record["port"] == 22
    assert record["agent"] == "lab\\x1bpc"
    assert record["service"] == "s" * FIELD_LIMIT + "[... 4801 more chars]"
    assert record["text"] == f"agent lab\\x1bpc registered {record['service']}"


def test_json_observer_traceback_is_escaped() -> None:
    try:
        raise ValueError("x\x1by")
    except ValueError:
        failure = Failure()
    out = io.StringIO()
    emit(json_observer(out), "failed", LogLevel.error, failure, event="boom")
    record = json.loads(out.getvalue())
    assert "ValueError: x\\x1by" in record["text"] and "\x1b" not in record["text"]


def test_sanitizing_observer_protects_twisteds_own_file_observer() -> None:
    out = io.StringIO()
    emit(sanitizing_observer(textFileLogObserver(out)), "user {user} from {log_source.key}",
         user=FORGED)
    text = out.getvalue()
    assert text.count("\n") == 1, text
    assert "mallory\\n2026" in text and "PRIVATE" not in text


def test_sanitizing_observer_wraps_a_legacy_observer() -> None:
    seen: list[str] = []

    @provider(legacy_log.ILogObserver)
    def legacy(event: dict[str, Any]) -> None:
        seen.append(legacy_log.textFromEventDict(event) or "")

    emit(sanitizing_observer(legacy), "user {user}", user=FORGED)
    assert seen == ["user " + FORGED.replace("\n", "\\n")]


def test_twistd_root_sets_the_sanitizing_observer_on_the_application(tmp_path: Path) -> None:
    """Under twistd, the plugin's service puts a sanitizing observer around the one
    twistd would have built from --logfile (twistd uses the application's component)."""
    from twisted.application.service import MultiService

    from relay.ops.tap import TwistdRoot

    logfile = tmp_path / "twistd.log"
    server_options = {"logfile": str(logfile), "nodaemon": True, "logger": None,
                      "syslog": False}
    app = Application("labrelay")
    root = TwistdRoot(MultiService(), server_options)
    root.setServiceParent(app)
    assert IService(app).namedServices == {} and root.parent is IService(app)
    observer = app.getComponent(ILogObserver)
    assert observer is not None
    emit(observer, "user {user}", user=FORGED)
    text = logfile.read_text()
    assert text.count("\n") == 1 and "mallory\\n2026" in text


def test_twistd_root_leaves_an_explicit_logger_alone() -> None:
    from twisted.application.service import MultiService

    from relay.ops.tap import TwistdRoot

    app = Application("labrelay")
    TwistdRoot(MultiService(), {"logger": "my.observer"}).setServiceParent(app)
    assert app.getComponent(ILogObserver, None) is None


# --- the code base ---------------------------------------------------------------------


def test_every_log_format_in_relay_is_a_literal() -> None:
    """A peer string must only ever be a field value: every ``*log*.info/warn/...``
    call in relay/ passes a string literal as its format (no f-string, no .format)."""
    offenders = []
    for path in RELAY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("debug", "info", "warn", "error", "critical",
                                      "failure", "emit", "msg", "err"):
                continue
            if "log" not in ast.unparse(node.func.value).lower():
                continue
            first = node.args[1] if node.func.attr == "emit" and len(node.args) > 1 else (
                node.args[0] if node.args else None)
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders
