"""Log output for the ``labrelay`` command: human text or JSON lines, made safe.

labrelay's own events carry an ``event`` field (``link_connected``,
``forward_ready`` …) and are the operator's view of the process; library chatter
(Conch logs every channel open) is shown only at warning level and above, or
with ``--verbose``.  The JSON form writes one object per line with the event's
fields, for supervisors and for the integration tests, which wait on events
instead of sleeping.

Peers choose many of the strings that end up in a log (user names, service names,
channel types, host names, hellos, banners; up to a packet's size before any
authentication).  Every observer this module builds therefore sees events through
:func:`sanitize_event` first, as OpenSSH's ``strnvis``/``%.100s`` do for sshd:

- every string or bytes field is **escaped** (:func:`escape`: a backslash, control
  characters, non-printable and invalid UTF-8 become visible ``\\\\``, ``\\n``,
  ``\\x1b``, ``\\xNN``, ``\\u202e``) and **truncated** to :data:`FIELD_LIMIT`
  characters with a marker saying how much was cut, before anything is formatted;
- the message is formatted by :func:`format_event`, which takes plain field names
  only (``{name}``, ``{name!r}``, ``{name:>5}``): no attribute or item lookup, no
  calls, so a format string that a library built from peer bytes can neither read
  the process's objects nor fail the observer;
- the formatted message is escaped again (control characters only) and capped, and
  a failure's traceback is escaped line by line and written as indented
  continuation lines (``  | …``), so no peer byte can start a line of its own.

The text form's lines therefore always start with a time stamp (or, on journald, a
``<N>`` priority) or with ``  | ``.

Under systemd, when stderr *is* the journal (``$JOURNAL_STREAM`` names its device and
inode), the text form drops its own time stamp, which journald records anyway, and
starts each line with the syslog priority (``<3>`` error, ``<4>`` warning, ``<6>``
info, ``<7>`` debug) that journald reads as the entry's priority.
:func:`sanitizing_observer` gives the same guarantee to observers this module does
not build (twistd's log file, syslog).
"""

from __future__ import annotations

import functools
import json
import re
import string
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from twisted.logger import ILogObserver, LegacyLogObserverWrapper, LogLevel, globalLogBeginner
from twisted.python import log as legacy_log
from zope.interface import provider

from relay.config.errors import OperatorText
from relay.core.peertext import visible

FIELD_LIMIT = 200
"""Characters of one field shown in a log (OpenSSH shows ``%.100s`` of a user name)."""
TEXT_LIMIT = 2000
"""Characters of a whole formatted message, and of a pre-formatted legacy message."""
TRACEBACK_LINES = 60
"""Lines of a failure's traceback kept (the end, where the exception is)."""
CONTINUATION = "  | "
"""How a text-form continuation line (a traceback) starts: never a time stamp."""

_SIMPLE = (str, int, float, bool, type(None))
_PLAIN_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _escape_char(ch: str, backslash: bool) -> str:
    if ch == "\\":
        return "\\\\" if backslash else ch
    return visible(ch)


def escape(value: str | bytes, limit: int | None = FIELD_LIMIT, *,
           backslash: bool = True) -> str:
    """``value`` as one printable line: at most ``limit`` characters of it (bytes:
    bytes), escaped, then ``[... N more chars]`` if some were cut.

    Only the kept part is ever looked at, so a 1 MiB string costs ``limit`` steps.
    Invalid UTF-8 in bytes shows as ``\\xNN``.  ``backslash=False`` leaves
    backslashes alone, for text whose fields were escaped already.
    """
    cut = 0
    if limit is not None and len(value) > limit:
        cut = len(value) - limit
        value = value[:limit]
    if isinstance(value, bytes):
        unit = "bytes"
        text = value.decode("utf-8", "surrogateescape")
    else:
        unit = "chars"
        text = value
    if not (text.isprintable() and "\\" not in text):
        text = "".join(_escape_char(ch, backslash) for ch in text)
    return text + (f"[... {cut} more {unit}]" if cut else "")


def sanitize_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``event`` whose string and bytes fields are escaped and truncated.

    ``log_*`` keys are twisted.logger's own (level, time, source, the format) and are
    kept, except ``log_text``: the pre-formatted message of a legacy ``log.msg``, as
    peer-controlled as any field.  The event given is not changed: other observers
    share it.
    """
    safe: dict[str, Any] = {}
    for key, value in event.items():
        if key == "log_text" and isinstance(value, (str, bytes)):
            safe[key] = escape(value, TEXT_LIMIT)
        elif not key.startswith("log_") and isinstance(value, (str, bytes)):
            safe[key] = escape(value, _limit(value))
        elif not key.startswith("log_") and _simple_list(value):
            safe[key] = [escape(v, _limit(v)) if isinstance(v, (str, bytes)) else v
                         for v in value[:LIST_LIMIT]]
        else:
            safe[key] = value
    return safe


def _limit(value: str | bytes) -> int:
    """A peer's string is cut at FIELD_LIMIT; a message labrelay composed for the
    operator (:class:`OperatorText`) only at TEXT_LIMIT, so its fix is not cut off."""
    return TEXT_LIMIT if isinstance(value, OperatorText) else FIELD_LIMIT


LIST_LIMIT = 100
"""Items of a list field kept (a reload's changes or problems)."""


def _simple_list(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, (*_SIMPLE, bytes)) for v in value)


class _PlainFieldFormatter(string.Formatter):
    """``str.format`` restricted to plain field names: ``{a.b}``, ``{a[0]}`` and
    positional fields raise, so a format cannot reach past an event's own fields."""

    def get_field(self, field_name: str, args: Any, kwargs: Mapping[str, Any]) -> Any:
        if not _PLAIN_FIELD.match(field_name):
            raise KeyError(field_name)
        return kwargs[field_name], field_name


_FORMATTER = _PlainFieldFormatter()


@functools.lru_cache(maxsize=512)
def _plain_format(fmt: str) -> bool:
    """Whether ``fmt``'s every field is a plain name with no nested field in its format
    spec: then ``str.format_map`` does what :data:`_FORMATTER` would, at a fraction of
    the cost (the JSON audit events of every session are formatted here)."""
    try:
        parsed = list(_FORMATTER.parse(fmt))
    except ValueError:
        return False
    return all(name is None or (_PLAIN_FIELD.match(name) is not None
                                and "{" not in (spec or ""))
               for _, name, spec, _ in parsed)


def format_event(event: Mapping[str, Any]) -> str:
    """The event's message, from an event that went through :func:`sanitize_event`.

    Formats with plain field names only; a format that asks for more (or does not
    match its fields) is shown escaped, with the fields, instead of being evaluated.
    The result is one line of at most :data:`TEXT_LIMIT` characters.
    """
    fmt = event.get("log_format")
    if fmt is None:
        text = event.get("log_text")
        text = "" if text is None else str(text)
    else:
        if isinstance(fmt, bytes):
            fmt = fmt.decode("utf-8", "replace")
        try:
            fmt = str(fmt)
            # The C formatter when every field is a plain name (checked once per format:
            # formats are the code's constants); the restricted Python one otherwise.
            text = fmt.format_map(event) if _plain_format(fmt) else (
                _FORMATTER.vformat(fmt, (), event))
        except Exception:
            fields = " ".join(f"{k}={event[k]}" for k in sorted(event)
                              if not k.startswith("log_") and isinstance(event[k], _SIMPLE))
            text = f"[unformatted: {escape(str(fmt), TEXT_LIMIT)}] {fields}"
    return escape(text, TEXT_LIMIT, backslash=False)


def _traceback(event: Mapping[str, Any]) -> list[str]:
    failure = event.get("log_failure")
    if failure is None or event.get("log_level", LogLevel.info) not in _ERROR_UP:
        return []
    try:
        lines = failure.getTraceback().splitlines()
    except Exception:
        return ["(traceback unavailable)"]
    if len(lines) > TRACEBACK_LINES:
        lines = [f"[... {len(lines) - TRACEBACK_LINES} traceback lines cut]",
                 *lines[-TRACEBACK_LINES:]]
    return [escape(line, TEXT_LIMIT, backslash=False) for line in lines]


_INFO_UP = frozenset((LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical))
_WARN_UP = frozenset((LogLevel.warn, LogLevel.error, LogLevel.critical))
_ERROR_UP = frozenset((LogLevel.error, LogLevel.critical))
"""Levels by set membership: ``constantly``'s ``>=`` walks every constant of the class
on each comparison, and every library debug event of every session comes through here."""


def _wanted(event: Mapping[str, Any], verbose: bool) -> bool:
    level = event.get("log_level", LogLevel.info)
    if "event" in event:
        return verbose or level in _INFO_UP
    return level in _WARN_UP or (verbose and level in _INFO_UP)


def json_observer(stream: IO[str], verbose: bool = False) -> ILogObserver:
    """One JSON object per line: ``event``, ``level``, ``time``, ``text`` and every
    simple field (and list of simple values), all escaped and truncated
    (:func:`sanitize_event`)."""

    @provider(ILogObserver)
    def observe(raw: dict[str, Any]) -> None:
        if not _wanted(raw, verbose):
            return
        event = sanitize_event(raw)
        text = "\n".join([format_event(event), *_traceback(event)])
        record: dict[str, Any] = {
            "event": event.get("event", "log"),
            "level": event.get("log_level", LogLevel.info).name,
            "time": event.get("log_time", time.time()),
            "text": text,
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and (
                    isinstance(value, _SIMPLE) or _simple_list(value)):
                record[key] = value
        stream.write(json.dumps(record) + "\n")
        stream.flush()

    return observe


_PRIORITY = {"critical": 2, "error": 3, "warn": 4, "info": 6, "debug": 7}
"""syslog priorities of twisted.logger's levels, as journald reads a ``<N>`` prefix."""


def is_journal(stream: IO[str], environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is connected to journald: ``$JOURNAL_STREAM`` (``DEV:INODE``,
    set by systemd for a unit whose output goes to the journal) names its file."""
    import os

    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def text_observer(stream: IO[str], verbose: bool = False,
                  journal: bool = False) -> ILogObserver:
    """``YYYY-MM-DD HH:MM:SS level message``, one line per event; a traceback follows
    as lines that start with :data:`CONTINUATION`.  With ``journal`` (stderr is
    journald's), ``<N>level message``: journald adds the time and reads the priority."""

    @provider(ILogObserver)
    def observe(raw: dict[str, Any]) -> None:
        if not _wanted(raw, verbose):
            return
        event = sanitize_event(raw)
        level = event.get("log_level", LogLevel.info).name
        if journal:
            lines = [f"<{_PRIORITY.get(level, 6)}>{level:<5} {format_event(event)}"]
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.get("log_time")))
            lines = [f"{stamp} {level:<5} {format_event(event)}"]
        lines += [CONTINUATION + line for line in _traceback(event)]
        stream.write("\n".join(lines) + "\n")
        stream.flush()

    return observe


def sanitizing_observer(inner: Any) -> ILogObserver:
    """Wraps an observer this module did not build (twistd's log file or syslog; a
    legacy ``log.ILogObserver`` too) so that it only ever sees safe events: fields
    escaped and truncated, the message pre-formatted by :func:`format_event` (the
    inner observer formats ``{log_safe_text}``, never a format a library built)."""
    if not ILogObserver.providedBy(inner) and legacy_log.ILogObserver.providedBy(inner):
        inner = LegacyLogObserverWrapper(inner)

    @provider(ILogObserver)
    def observe(raw: dict[str, Any]) -> None:
        event = sanitize_event(raw)
        event["log_safe_text"] = format_event(event)
        event["log_format"] = "{log_safe_text}"
        for legacy in ("log_text", "message", "format"):  # raw text of a legacy log.msg
            event.pop(legacy, None)
        inner(event)

    return observe


def start_logging(fmt: str, verbose: bool) -> None:
    """Begin the global log for the ``labrelay`` command (and its demo): JSON lines on
    stdout for ``json``, else text on stderr."""
    if fmt == "json":
        observer = json_observer(sys.stdout, verbose)
    else:
        observer = text_observer(sys.stderr, verbose, journal=is_journal(sys.stderr))
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
