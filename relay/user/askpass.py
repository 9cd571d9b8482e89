"""Asking the user for a key's passphrase, where and as ssh asks.

``labrelay connect`` usually runs as ssh's ``ProxyCommand``: its stdin and stdout
are ssh's stream, never a place to prompt.  Like ssh (``readpass.c``) it asks on
the controlling terminal (``/dev/tty``, echo off), or runs ``$SSH_ASKPASS PROMPT``
and reads its stdout: always with ``SSH_ASKPASS_REQUIRE=force``, first with
``prefer``, never with ``never``, and by default only when there is no terminal
and a display (``DISPLAY``/``WAYLAND_DISPLAY``) to show it on.  No answer (no
terminal and no askpass, the dialog cancelled, end of input) is ``None``.

Ctrl-C (or SIGTERM, SIGHUP, SIGQUIT) while it asks ends the process by that signal
once the terminal's echo is back, as ssh's ``readpass.c`` does.  The reactor's own
handlers only schedule a stop, and a blocking read of the terminal never gets there:
the user's ssh died of the same Ctrl-C, the shell prompted again, and this process
went on reading, echo off, the next line the user typed for the shell.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from types import FrameType

ASKPASS_TIMEOUT = 300.0  # a person answering a dialog


_STOPPING = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")


class _Signalled(BaseException):
    """A stopping signal arrived while asking (BaseException: nothing on the way may
    take it for an error to go on from)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise _Signalled(signum)


@contextmanager
def _dies_of_signals() -> Iterator[None]:
    """Within: a stopping signal interrupts the blocking read (or the askpass wait),
    the ``finally`` blocks on the way restore the terminal, then the process dies of
    that signal.  Only the main thread can set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in _STOPPING:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _raise)
    caught = None
    try:
        yield
    except _Signalled as e:
        caught = e.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught is not None:
        signal.signal(caught, signal.SIG_DFL)
        os.kill(os.getpid(), caught)


def ask(prompt: str, env: Mapping[str, str] | None = None) -> str | None:
    """The passphrase the user typed, or None if they could not be asked (or declined)."""
    with _dies_of_signals():
        return _ask(prompt, env)


def _ask(prompt: str, env: Mapping[str, str] | None) -> str | None:
    env = os.environ if env is None else env
    require = env.get("SSH_ASKPASS_REQUIRE", "").strip().lower()
    program = env.get("SSH_ASKPASS", "").strip()
    display = bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))
    if program and require in ("force", "prefer"):
        return _askpass(program, prompt)
    answer = _tty(prompt)
    if answer is not None or require == "never":
        return answer
    if program and display:
        return _askpass(program, prompt)
    return None


def _askpass(program: str, prompt: str) -> str | None:
    try:
        out = subprocess.run([program, prompt], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, timeout=ASKPASS_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.decode(errors="replace").rstrip("\r\n")


def _tty(prompt: str) -> str | None:
    """Read a line on the controlling terminal with echo off; None if there is none."""
    import termios  # POSIX, here rather than at import: this module is imported everywhere

    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None
    try:
        try:
            old = termios.tcgetattr(fd)
        except termios.error:
            return None
        new = list(old)
        new[3] &= ~termios.ECHO
        os.write(fd, prompt.encode())
        termios.tcsetattr(fd, termios.TCSAFLUSH, new)
        try:
            line = b""
            while not line.endswith(b"\n"):
                chunk = os.read(fd, 1024)
                if not chunk:
                    return None
                line += chunk
        finally:  # a hung-up terminal (EIO) must not hide what ended the read
            with suppress(termios.error, OSError):
                termios.tcsetattr(fd, termios.TCSAFLUSH, old)
                os.write(fd, b"\n")
        return line.decode(errors="replace").rstrip("\r\n")
    finally:
        os.close(fd)
