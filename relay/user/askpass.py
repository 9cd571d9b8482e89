"""Asking the user for a key's passphrase, where and as ssh asks.

``labrelay connect`` usually runs as ssh's ``ProxyCommand``: its stdin and stdout
are ssh's stream, never a place to prompt.  Like ssh (``readpass.c``) it asks on
the controlling terminal (``/dev/tty``, echo off), or runs ``$SSH_ASKPASS PROMPT``
and reads its stdout: always with ``SSH_ASKPASS_REQUIRE=force``, first with
``prefer``, never with ``never``, and by default only when there is no terminal
and a display (``DISPLAY``/``WAYLAND_DISPLAY``) to show it on.  No answer (no
terminal and no askpass, the dialog cancelled, end of input) is ``None``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping

ASKPASS_TIMEOUT = 300.0  # a person answering a dialog


def ask(prompt: str, env: Mapping[str, str] | None = None) -> str | None:
    """The passphrase the user typed, or None if they could not be asked (or declined)."""
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
        finally:
            termios.tcsetattr(fd, termios.TCSAFLUSH, old)
            os.write(fd, b"\n")
        return line.decode(errors="replace").rstrip("\r\n")
    finally:
        os.close(fd)
