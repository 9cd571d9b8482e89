"""Config errors and where they are: the bottom of :mod:`relay.config`.

Every config problem reaches the operator as a :class:`ConfigError` that names the
file (or "command line"), the key path (``link[0].remote[1].connect``) and what would
be valid.  The grammar in :mod:`relay.config.grammar` knows no locations: it raises
:class:`Bad` (a problem and a hint), and whoever knows where the text was written
(the TOML walker, the command line, a grant file) turns it into a ConfigError with
:func:`located`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class OperatorText(str):
    """A message labrelay composed for the operator from its own words and the
    operator's own files: a refused reload's problems, a refused host key with its fix.

    The log shows such a field escaped like any other, but cut at the whole message's
    limit (``relay.ops.logfmt.TEXT_LIMIT``), not a peer string's (``FIELD_LIMIT``, 200
    characters): the fix comes at the end (``ssh-keygen -R ...``, the line to add, the
    second problem of a reload), and a log that cuts it off tells the admin that
    something is wrong but not what to do.  Never wrap a string a peer chose."""

    __slots__ = ()


class ConfigError(Exception):
    """A configuration problem, with where it is and how to fix it.

    ``str(err)`` reads ``FILE: KEYPATH: PROBLEM (HINT)``; the CLI prints it and
    exits with status 2.
    """

    def __init__(self, source: str, keypath: str, problem: str, hint: str = "") -> None:
        self.source = source
        self.keypath = keypath
        self.problem = problem
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: {self.keypath}: " if self.keypath else f"{self.source}: "
        return where + self.problem + (f" ({self.hint})" if self.hint else "")


class ConfigErrors(ConfigError):
    """Several configuration problems found in one pass (each entry of a file is read
    even when an earlier one is wrong), so an operator fixes them all at once.

    ``errors`` holds each :class:`ConfigError`; ``str()`` is one line per problem."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.source, first.keypath, first.problem, first.hint)

    def __str__(self) -> str:
        errors = getattr(self, "errors", None)
        if not errors:
            return super().__str__()
        return f"{len(errors)} problems:\n" + "\n".join(f"  {e}" for e in errors)


def raise_all(errors: list[ConfigError]) -> None:
    """Raise nothing, the one error, or :class:`ConfigErrors` with all of them."""
    flat: list[ConfigError] = []
    for error in errors:
        flat.extend(error.errors if isinstance(error, ConfigErrors) else [error])
    if len(flat) == 1:
        raise flat[0]
    if flat:
        raise ConfigErrors(flat)


class Bad(Exception):
    """A syntax problem with no location yet: what is wrong and how to write it."""

    def __init__(self, problem: str, hint: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


Where = tuple[str, str]
"""``(source, keypath)`` of something written in a config or grant file."""

Locate = Callable[[str], tuple[str, str]]
"""Maps a canonical key path (``link[1].remote[0].name``) to ``(source, keypath)`` as
the user should read it, e.g. ``("command line", "-R '2201:localhost:22'")``."""


@contextmanager
def located(source: str, keypath: str) -> Iterator[None]:
    """Turn a located-less :class:`Bad` into a ConfigError at ``keypath``."""
    try:
        yield
    except Bad as e:
        raise ConfigError(source, keypath, e.problem, e.hint) from None
