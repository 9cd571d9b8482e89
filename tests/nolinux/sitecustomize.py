"""Put this directory first on ``PYTHONPATH`` and Python looks like a POSIX system
without Linux's extras (macOS, the BSDs): the tests of the user's end run
``labrelay connect`` under it to show that nothing Linux-only is on its path.

Removed before anything imports them: ``os.splice``/``pipe2``/``eventfd`` and
their flags, ``fcntl.F_SETPIPE_SZ``/``F_GETPIPE_SZ``, ``select.epoll`` (Twisted
then picks its poll reactor, as it picks kqueue or select elsewhere),
``socket.TCP_QUICKACK``; and the native module ``relay.datapath._splice_c``
cannot be imported (it is Linux-only C).  Whatever still calls one of these fails
with AttributeError or ImportError, as it would on a Mac.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import sys
from importlib.abc import MetaPathFinder
from typing import Any

_GONE = {
    os: ("splice", "SPLICE_F_MOVE", "SPLICE_F_NONBLOCK", "SPLICE_F_MORE", "pipe2",
         "eventfd", "eventfd_read", "eventfd_write", "EFD_CLOEXEC", "EFD_NONBLOCK",
         "EFD_SEMAPHORE", "memfd_create"),
    fcntl: ("F_SETPIPE_SZ", "F_GETPIPE_SZ"),
    select: ("epoll", "EPOLLIN", "EPOLLOUT", "EPOLLERR", "EPOLLHUP", "EPOLLET",
             "EPOLLRDHUP", "EPOLLEXCLUSIVE"),
    socket: ("TCP_QUICKACK",),
}
for module, names in _GONE.items():
    for name in names:
        if hasattr(module, name):
            delattr(module, name)


class _NoNativeModule(MetaPathFinder):
    """Refuses ``relay.datapath._splice_c``, as an install without it would."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "relay.datapath._splice_c":
            raise ImportError("no native data path on this system (tests/nolinux)")
        return None


sys.meta_path.insert(0, _NoNativeModule())
