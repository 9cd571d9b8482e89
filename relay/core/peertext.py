"""A peer's words made safe to show on a terminal (:func:`shown`).

Some text a peer chose is *shown*, not only logged: the reason an agent gives for a
refused open reaches the user in the relay's refusal (a channel's open-failure text,
the data port's error byte), and ``labrelay connect`` writes the relay's words to the
user's stderr, which is her terminal (ssh runs it as a ProxyCommand and passes its
stderr through).  Raw, those bytes are terminal control sequences: a malicious agent,
a compromised relay or an on-path box on the (unencrypted) data port could clear her
screen, draw a fake ``Password:`` prompt, set the window title or, through OSC 52,
write her clipboard (xterm, kitty, iTerm2 …).  OpenSSH's client shows a server's
words through ``strnvis`` for the same reason (CVE-2019-6109/6110 were the scp
client's lapses).  The log has its own escaping (relay.ops.logfmt); this is the same
rule for text that leaves by another door, in the layer that both the relay's server
side and the user's client may import.
"""

from __future__ import annotations

SHOWN_LIMIT = 200
"""Characters of one peer string shown (the log's field limit, OpenSSH's ``%.100s``)."""

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(ch: str) -> str:
    """One character as a person can read it on a terminal (relay.ops.logfmt uses the
    same rule for the log)."""
    if ch.isprintable():
        return ch
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def shown(text: str | bytes, limit: int | None = SHOWN_LIMIT) -> str:
    """``text`` as one line of printable characters: control characters (ESC, BEL,
    CR, LF …), other non-printable ones (bidirectional overrides such as U+202E,
    unassigned code points) and invalid UTF-8 become visible ``\\x1b``, ``\\n``,
    ``\\u202e``, ``\\xNN``; at most ``limit`` characters of it are kept, then
    ``[... N more chars]``.  Only the kept part is looked at, so a megabyte costs
    ``limit`` steps.  Backslashes are left alone: the result is for a person to read,
    not to parse back."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    cut = 0
    if limit is not None and len(text) > limit:
        cut = len(text) - limit
        text = text[:limit]
    if not text.isprintable():
        text = "".join(visible(ch) for ch in text)
    return text + (f"[... {cut} more chars]" if cut else "")
