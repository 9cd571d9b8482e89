"""Log output for the ``labrelay`` command: human text or JSON lines.

labrelay's own events carry an ``event`` field (``link_connected``,
``forward_ready`` …) and are the operator's view of the process; library chatter
(Conch logs every channel open) is shown only at warning level and above, or
with ``--verbose``.  The JSON form writes one object per line with the event's
fields, for supervisors and for the integration tests, which wait on events
instead of sleeping.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import provider

_SIMPLE = (str, int, float, bool, type(None))


def _wanted(event: dict[str, Any], verbose: bool) -> bool:
    level = event.get("log_level", LogLevel.info)
    if "event" in event:
        return verbose or level >= LogLevel.info
    return level >= LogLevel.warn or (verbose and level >= LogLevel.info)


def _text(event: dict[str, Any]) -> str:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None and event.get("log_level", LogLevel.info) >= LogLevel.error:
        text += "\n" + failure.getTraceback()
    return text


def json_observer(stream: IO[str], verbose: bool = False) -> ILogObserver:
    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if not _wanted(event, verbose):
            return
        record: dict[str, Any] = {
            "event": event.get("event", "log"),
            "level": event.get("log_level", LogLevel.info).name,
            "time": event.get("log_time", time.time()),
            "text": _text(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and isinstance(value, _SIMPLE):
                record[key] = value
        stream.write(json.dumps(record) + "\n")
        stream.flush()

    return observe


def text_observer(stream: IO[str], verbose: bool = False) -> ILogObserver:
    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if not _wanted(event, verbose):
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.get("log_time")))
        level = event.get("log_level", LogLevel.info).name
        stream.write(f"{stamp} {level:<5} {_text(event)}\n")
        stream.flush()

    return observe
