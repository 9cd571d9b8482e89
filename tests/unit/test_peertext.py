"""relay.core.peertext.shown: a peer's words as one printable line, bounded."""

from __future__ import annotations

import io

from relay.core.peertext import SHOWN_LIMIT, shown


def test_control_and_invisible_characters_are_shown_as_escapes() -> None:
    text = "\x1b]52;c;ZXZpbA==\x07\x1b[2J\r\n\tPassword: \u202eevil\x9b2J\x7f"
    out = shown(text)
    assert out.isprintable()
    assert out == ("\\x1b]52;c;ZXZpbA==\\x07\\x1b[2J\\r\\n\\tPassword: \\u202eevil"
                   "\\x9b2J\\x7f")


def test_printable_text_is_kept_as_it_is() -> None:
    for text in ("service web:8080 unavailable", "é@ü 日本語", "a\\b"):
        assert shown(text) == text


def test_bytes_that_are_not_utf8_are_shown_by_value() -> None:
    assert shown(b"ok \xff\xfe \xe2\x80\xae") == "ok \\xff\\xfe \\u202e"


def test_long_text_is_cut_and_says_how_much() -> None:
    out = shown("A" * 1_000_000)
    assert out == "A" * SHOWN_LIMIT + f"[... {1_000_000 - SHOWN_LIMIT} more chars]"
    assert shown("x" * 50, limit=None) == "x" * 50


def test_labrelay_connect_says_a_peers_words_as_text() -> None:
    """Connector.say is the one door to the user's terminal."""
    from relay.user.connect import Connector

    err = io.StringIO()
    connector = Connector(None, None, [], stderr=err)  # type: ignore[arg-type]
    connector.say("refused by the relay: \x1b[2J\x1b]0;owned\x07" + "B" * 5000)
    line = err.getvalue()
    assert line.endswith("more chars]\n") and line[:-1].isprintable()
    assert len(line) < 2200  # SAY_LIMIT (2000) and the marker
