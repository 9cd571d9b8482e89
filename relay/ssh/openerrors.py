"""Reading Conch's errors about channel opens and global requests.

Conch's ``ConchError`` carries its reason code and text in either order, and tells a
peer's refusal apart from a stopped connection only by ``data``: the helpers here
read them, so the connection, the relay's server side and the agent's link and pool
agree on what a failure meant.  A labrelay relay also says why it refused a forward
(:class:`RefusedWithReason`, :func:`refusal_reason`).
"""

from __future__ import annotations

from twisted.conch import error
from twisted.conch.ssh import connection
from twisted.python.failure import Failure

from relay.ssh.wire import RefusalNote

OPEN_CONNECT_FAILED = connection.OPEN_CONNECT_FAILED


def refused_by_peer(failure: Failure) -> bool:
    """Whether a global request's failure is the peer's ``REQUEST_FAILURE`` reply.

    Conch errbacks that with ``ConchError("global request failed", packet)`` and the
    requests pending on a stopped connection with ``ConchError("Connection stopped.")``,
    whose ``data`` is None (``args`` has two items either way)."""
    e = failure.value
    return isinstance(e, error.ConchError) and e.data is not None


def open_error(e: error.ConchError) -> tuple[int, str]:
    """(reason code, text) for a refused open from a ``ConchError``.

    Conch raises both ``ConchError(text, code)`` and ``ConchError(code, text)``
    (Twisted #3657), and ``ConchError(text)`` leaves the code ``None``.
    """
    text, code = e.value, e.data
    if isinstance(text, int) and not isinstance(code, int):
        text, code = code, text
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return (code if isinstance(code, int) else OPEN_CONNECT_FAILED), str(text)


def failure_text(failure: Failure) -> str:
    """A failed open's reason as words: the text of a ``ConchError`` (whose
    ``getErrorMessage()`` is the repr of its arguments, "(b'connect failed: ...', 2)",
    which reached the relay's logs and the users' error messages), else the failure's
    own message."""
    e = failure.value
    if isinstance(e, error.ConchError):
        return open_error(e)[1]
    return failure.getErrorMessage()


class RefusedWithReason(error.ConchError):
    """A ``REQUEST_FAILURE`` that a ``request-refused@labrelay`` preceded (the relay
    says why; :data:`relay.ssh.wire.REQUEST_REFUSED`).  Still the peer's refusal for
    :func:`refused_by_peer`."""

    def __init__(self, packet: bytes, note: RefusalNote) -> None:
        super().__init__("global request failed", packet)
        self.note = note


def refusal_reason(failure: Failure, request: bytes, bind: str, port: int) -> str | None:
    """The relay's reason for refusing ``request`` for ``bind:port``, if the failure
    carries a note about that very request; None for a plain refusal, a stopped
    connection, or a note about something else (ignored, not believed)."""
    e = failure.value
    if isinstance(e, RefusedWithReason) and e.note.answers(request, bind, port):
        return e.note.why
    return None
