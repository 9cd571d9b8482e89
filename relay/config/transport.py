"""The grammar of the transport settings: how a link reaches the relay (docs/networks.md).

Shared by the TOML file (``[[link]]`` ``transport``, ``tls_port``, ``tls_server_name``,
``tls_ca_file``, ``tls_pin``, ``proxy``) and the command line (``-o Transport=tls``,
``-o TLSPort``, ``-o TLSServerName``, ``-o TLSCAFile``, ``-o TLSPin``, ``-o Proxy``), so
both say the same thing about the same mistake.  The plain functions raise
:class:`~relay.config.errors.Bad`; :func:`transport_config` locates them.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

from relay.config.errors import Bad, ConfigError, located
from relay.config.grammar import parse_relay_listen
from relay.config.schema import (
    DEFAULT_TLS_PORT,
    ProxyURL,
    TLSListenConfig,
    TransportConfig,
    TransportMode,
)
from relay.config.section import Section

MODES: tuple[TransportMode, ...] = ("tcp", "tls", "auto")
PROXY_ENV = "env"
EXAMPLE_PIN = "sha256//YLh1dUR9y6Kja30RrAn7JKnbQG/uEtLMkBgFF2Fuihg="
_PIN_HINT = (
    "pin the key as curl does, sha256//BASE64 (`openssl x509 -in cert.pem -pubkey -noout | "
    "openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64`), or the "
    "certificate as `openssl x509 -in cert.pem -noout -fingerprint -sha256` prints it, "
    f"e.g. {EXAMPLE_PIN}"
)
_PROXY_HINT = 'e.g. proxy = "http://proxy.example.org:3128", "http://user:pass@10.0.0.1:8080" ' \
              'or "env" (https_proxy, no_proxy)'


def mode(text: str) -> TransportMode:
    """``tcp``, ``tls`` or ``auto``."""
    lowered = text.lower()
    for m in MODES:
        if lowered == m:
            return m
    raise Bad(f"unknown transport {text!r}", 'use "tcp" (SSH), "tls" (SSH inside TLS, port '
              '443 by default) or "auto" (tcp, then tls, then tls through the proxy)')


def shown_proxy(text: str) -> str:
    """A proxy URL as an error may show it: everything between ``//`` and the last
    ``@`` (the credentials, however mistyped: a password with an unencoded ``/``, ``#``
    or ``?`` is cut by URL parsing into what looks like a port or a path) is ``***``."""
    scheme, sep, rest = text.rpartition("://")
    at = rest.rfind("@")
    if at >= 0:
        rest = "***@" + rest[at + 1:]
    return (scheme + sep + rest)[:200]


def proxy_url(text: str) -> ProxyURL:
    """``http://[user:pass@]host[:port]`` (port 3128 if none; ``host:port`` alone is
    read as http, as ``https_proxy`` often is written).  A refusal never quotes the
    credentials (:func:`shown_proxy`): errors go to the terminal, the agent's log and
    the journal, and a parse error's own text (urllib's) can hold a piece of the
    password."""
    if "://" not in text:
        text = "http://" + text
    shown = shown_proxy(text)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise Bad(f"not a proxy URL: {shown} (its port is not a number 1..65535)",
                  _PROXY_HINT + "; in a user name or password, write / # ? @ : % as %2F "
                  "%23 %3F %40 %3A %25") from None
    if parts.scheme.lower() != "http":
        raise Bad(f"proxy scheme {parts.scheme[:20]!r} is not supported: labrelay speaks "
                  "plain HTTP to the proxy (the tunnel inside it is TLS)", _PROXY_HINT)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise Bad(f"a proxy URL has no path, query or fragment: {shown}",
                  _PROXY_HINT + "; in a user name or password, write / # ? as %2F %23 %3F")
    host = parts.hostname
    if not host or any(c.isspace() for c in host):
        raise Bad(f"no host in proxy URL {shown}", _PROXY_HINT)
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if user is not None and password is None:
        password = ""
    return ProxyURL(host=host, port=port or 3128, user=user, password=password)


def pin(text: str) -> str:
    """A pinned certificate key or certificate: ``sha256//BASE64`` (the SPKI's SHA-256,
    curl's ``--pinnedpubkey``) -> ``spki:BASE64``; 64 hex digits, colons allowed (the
    certificate's SHA-256, as openssl prints it) -> ``cert:hex``."""
    body = text.strip()
    if body.lower().startswith("sha256//"):
        b64 = body[8:]
        try:
            digest = base64.b64decode(b64, validate=True)
        except binascii.Error:
            raise Bad(f"{text!r} is not sha256// followed by base64", _PIN_HINT) from None
        if len(digest) != 32:
            raise Bad(f"{text!r} is not a SHA-256 digest ({len(digest)} bytes)", _PIN_HINT)
        return "spki:" + base64.b64encode(digest).decode()
    body = body.removeprefix("sha256 Fingerprint=").removeprefix("SHA256 Fingerprint=")
    hexed = body.replace(":", "").lower()
    if re.fullmatch(r"[0-9a-f]{64}", hexed):
        return "cert:" + hexed
    raise Bad(f"{text!r} is not a certificate pin", _PIN_HINT)


def server_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,253}", text):
        raise Bad(f"{text!r} is not a host name", 'e.g. tls_server_name = "relay.example.org"')
    return text.lower()


def transport_config(get: Callable[[str], str | None], where: Callable[[str], tuple[str, str]],
                     path: Callable[[str], Path], port: Callable[[str], int | None]
                     ) -> TransportConfig:
    """The transport settings of one link from its raw strings: ``get(key)`` gives the
    text of ``transport``, ``tls_server_name``, ``tls_ca_file``, ``tls_pin``, ``proxy``
    (or None), ``port("tls_port")`` the checked port, ``path(text)`` a file path as the
    caller resolves it, ``where(key)`` ``(source, keypath)`` for an error."""

    def parsed(key: str, parse: Callable[[str], object]) -> object | None:
        text = get(key)
        if text is None:
            return None
        try:
            return parse(text)
        except Bad as e:
            raise ConfigError(*where(key), e.problem, e.hint) from None

    chosen = parsed("transport", mode) or "tcp"
    proxy_text = get("proxy")
    proxy_env = proxy_text is not None and proxy_text.strip().lower() == PROXY_ENV
    proxy = None if proxy_env else parsed("proxy", proxy_url)
    ca_text = get("tls_ca_file")
    pinned = parsed("tls_pin", pin)
    if pinned is not None and ca_text is not None:
        raise ConfigError(*where("tls_pin"), "set either tls_pin or tls_ca_file, not both",
                          "a pin replaces the CA check: keep one")
    tls_port = port("tls_port")
    return TransportConfig(
        mode=chosen,  # type: ignore[arg-type]
        tls_port=DEFAULT_TLS_PORT if tls_port is None else tls_port,
        server_name=parsed("tls_server_name", server_name),  # type: ignore[arg-type]
        ca_file=None if ca_text is None else path(ca_text),
        pin=pinned,  # type: ignore[arg-type]
        proxy=proxy,  # type: ignore[arg-type]
        proxy_from_env=proxy_env,
    )


#: ``-o`` options (``labrelay agent``, ``labrelay connect``) and the TOML key of each.
OPTION_KEYS = {"Transport": "transport", "TLSPort": "tls_port",
               "TLSServerName": "tls_server_name", "TLSCAFile": "tls_ca_file",
               "TLSPin": "tls_pin", "Proxy": "proxy"}


def is_transport_option(text: str) -> bool:
    """Whether ``-o text`` is one of labrelay's own transport options (``Transport=tls``,
    ``Proxy ...``), which ``ssh -G`` would refuse as unknown."""
    name = text.strip().replace("=", " ", 1).split(" ", 1)[0].lower()
    return name in {k.lower() for k in OPTION_KEYS}


def claim_option(options: dict[str, tuple[str, str]], key: str, value: str, keypath: str,
                 source: str) -> None:
    """Record ``-o`` option ``key`` (its TOML key); the same key twice with different
    values is an error, as for ssh's other options here."""
    previous = options.get(key)
    if previous is not None and previous[0] != value:
        show = shown_proxy if key == "proxy" else str  # never a proxy's credentials
        raise ConfigError(source, keypath, f"{show(value)} conflicts with "
                          f"{show(previous[0])}", "give each setting once")
    options[key] = (value, keypath)


def apply_options(t: TransportConfig, options: dict[str, tuple[str, str]],
                  source: str) -> TransportConfig:
    """``t`` with command-line options on top: ``options`` maps a TOML key to
    ``(text, keypath)`` (ports and paths already checked).  A pin given replaces a CA
    file from the config and the other way round; both on one command line is an error."""
    if "tls_pin" in options and "tls_ca_file" in options:
        raise ConfigError(source, options["tls_pin"][1], "cannot be combined with "
                          f"{options['tls_ca_file'][1]}", "a pin replaces the CA check: keep one")
    for key, (text, keypath) in options.items():
        with located(source, keypath):
            if key == "transport":
                t = replace(t, mode=mode(text))
            elif key == "tls_port":
                if not text.isdigit() or not 1 <= int(text[:6]) <= 65535:
                    raise Bad(f"expected a port 1..65535, got {text[:20]!r}", "e.g. 443")
                t = replace(t, tls_port=int(text))
            elif key == "tls_server_name":
                t = replace(t, server_name=server_name(text))
            elif key == "tls_ca_file":
                try:
                    path = Path(text).expanduser().absolute()
                except RuntimeError:  # ~nobody: no such user
                    raise Bad(f"cannot expand {text[:100]!r}", "give the path without "
                              "~user") from None
                t = replace(t, ca_file=path, pin=None)
            elif key == "tls_pin":
                t = replace(t, pin=pin(text), ca_file=None)
            elif key == "proxy":
                env = text.strip().lower() == PROXY_ENV
                t = replace(t, proxy=None if env else proxy_url(text), proxy_from_env=env)
    return t


def tls_listen(sec: Section, path: Callable[[str], Path]) -> TLSListenConfig | None:
    """``[relay]``'s TLS port: ``tls_cert`` (with ``tls_key``) turns it on, on 443 unless
    ``tls_listen`` says otherwise; ``path(text)`` resolves a file as the loader does."""
    cert, key = sec.string("tls_cert"), sec.string("tls_key")
    if cert is None:
        for other in ("tls_key", "tls_listen", "tls_names", "tls_handshake_timeout"):
            if other in sec.data:
                raise sec.error(other, f"{other} has no effect without tls_cert",
                                "set tls_cert and tls_key (PEM files, e.g. certbot's "
                                "fullchain.pem and privkey.pem) to turn the TLS port on")
        return None
    if key is None:
        raise sec.error("tls_key", "tls_cert is set but tls_key is not",
                        'e.g. tls_key = "/etc/letsencrypt/live/relay.example.org/privkey.pem"')
    listen = parse_relay_listen(sec.string("tls_listen") or "0.0.0.0:443", source=sec.source,
                                keypath=sec.keypath("tls_listen"))
    names = []
    for j, text in enumerate(sec.strings("tls_names")):
        with located(sec.source, f"{sec.keypath('tls_names')}[{j}]"):
            names.append(server_name(text))
    return TLSListenConfig(
        cert=path(cert), key=path(key), listen=listen, names=tuple(names),
        handshake_timeout=sec.number("tls_handshake_timeout", 10.0, low=0, above=True),
    )
