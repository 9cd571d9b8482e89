"""Certificates, KRLs and key limits with files made by the real ``ssh-keygen``.

``ssh-keygen -s`` signs user certificates (validity windows, principals, critical
options) and ``ssh-keygen -k`` writes KRLs (serials, ranges, key ids, explicit keys,
SHA256 fingerprints); the checks run on them with a given ``now`` and address."""

from __future__ import annotations

import base64
import calendar
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from relay.config.schema import ServiceGrant
from relay.core.certs import Authority, CertVerdict, check_certificate, is_certificate
from relay.core.grants import AGENT, USER, Principal
from relay.core.keylife import KeyLimits, KeyOptionError, parse_expiry, parse_from
from relay.core.krl import KrlError, parse_krl

KEYGEN = shutil.which("ssh-keygen")
needs_keygen = pytest.mark.skipif(
    KEYGEN is None and os.environ.get("CI") != "true", reason="ssh-keygen not installed")

ALICE = Principal(USER, "alice", (ServiceGrant("gpu-cluster", 22),), frozenset(), 10)
BOB = Principal(USER, "bob", (ServiceGrant("gpu-cluster", 22),), frozenset(), 10)


def keygen(*args: str, cwd: Path) -> None:
    assert KEYGEN is not None, "ssh-keygen is needed (CI=true: not skipped)"
    subprocess.run([KEYGEN, "-q", *args], cwd=cwd, check=True, capture_output=True)


def blob(path: Path) -> bytes:
    return base64.b64decode(path.read_text().split()[1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    for name in ("ca", "other_ca", "user", "user2"):
        keygen("-t", "ed25519", "-N", "", "-C", name, "-f", name, cwd=d)
    return d


def sign(pki: Path, name: str, *options: str, ca: str = "ca", key: str = "user",
         serial: int = 1) -> bytes:
    shutil.copy(pki / f"{key}.pub", pki / f"{name}.pub")
    keygen("-s", ca, "-z", str(serial), *options, f"{name}.pub", cwd=pki)
    return blob(pki / f"{name}-cert.pub")


def authorities(pki: Path, *lines: Authority) -> dict[bytes, list[Authority]]:
    out: dict[bytes, list[Authority]] = {}
    for a in lines:
        out.setdefault(a.ca_blob, []).append(a)
    return out


def line(pki: Path, principal: Principal = ALICE, accepted: tuple[str, ...] = ("alice",),
         limits: KeyLimits | None = None) -> Authority:
    return Authority(blob(pki / "ca.pub"), principal, frozenset(accepted),
                     limits or KeyLimits(), "users:1")


NOW = time.time()


@needs_keygen
def test_a_valid_certificate_is_granted_with_its_expiry(pki: Path) -> None:
    cert = sign(pki, "ok", "-I", "alice@lab", "-n", "alice", "-V", "-5m:+1h")
    assert is_certificate(cert) and not is_certificate(blob(pki / "user.pub"))
    verdict = check_certificate(cert, authorities(pki, line(pki)), now=time.time(),
                                address="10.0.0.5", login="alice")
    assert verdict.principal == ALICE and verdict.reason == ""
    assert verdict.expires is not None and 3500 < verdict.expires - time.time() <= 3600


@needs_keygen
@pytest.mark.parametrize(("options", "now_offset", "reason"), [
    (("-n", "alice", "-V", "20200101:20200201"), 0, "expired"),
    (("-n", "alice", "-V", "+1d:+2d"), 0, "not yet valid"),
    (("-n", "mallory", "-V", "-5m:+1h"), 0, "which no line of its CA accepts"),
    (("-n", "alice", "-O", "force-command=/bin/true"), 0, "force-command"),
    (("-n", "alice", "-O", "source-address=192.168.0.0/16"), 0, "source-address"),
    (("-n", "alice", "-O", "verify-required"), 0, "unknown critical option 'verify-required'"),
    (("-n", "alice", "-O", "critical:lab-only@example.org=x"), 0, "unknown critical option"),
    (("-n", "alice", "-O", "no-port-forwarding"), 0, "lacks the permit-port-forwarding"),
    (("-n", "alice", "-O", "clear"), 0, "lacks the permit-port-forwarding"),
], ids=["expired", "not-yet-valid", "wrong-principal", "force-command", "source-address",
        "verify-required", "unknown-critical", "no-port-forwarding", "clear"])
def test_refused_certificates_say_why(pki: Path, options: tuple[str, ...], now_offset: int,
                                      reason: str) -> None:
    cert = sign(pki, f"bad{abs(hash(options))}", "-I", "k", *options)
    verdict = check_certificate(cert, authorities(pki, line(pki)), now=time.time() + now_offset,
                                address="10.0.0.5", login="alice")
    assert verdict.principal is None and reason in verdict.reason, verdict.reason


@needs_keygen
def test_a_validity_refusal_gives_times_in_utc_and_the_relays_clock(pki: Path) -> None:
    """Clock skew between the relay and the CA shows as a certificate refused moments
    after it was signed: the reason gives the bound as ``ssh-keygen -L`` shows it (UTC,
    not a Unix time) and the relay's own clock beside it, with the difference."""
    cert = sign(pki, "skew", "-I", "k", "-n", "alice", "-V", "20300101000000Z:20300201000000Z")
    now = calendar.timegm((2029, 12, 31, 23, 58, 30, 0, 0, 0))
    why = check_certificate(cert, authorities(pki, line(pki)), now=now, address="10.0.0.5",
                            login="alice").reason
    assert ("is not yet valid (valid from 2030-01-01 00:00:00 UTC; the relay's clock says "
            "2029-12-31 23:58:30 UTC, 1.5 min earlier;") in why, why
    why = check_certificate(cert, authorities(pki, line(pki)), now=now + 31 * 86400 + 95,
                            address="10.0.0.5", login="alice").reason
    assert ("expired (valid until 2030-02-01 00:00:00 UTC; the relay's clock says "
            "2030-02-01 00:00:05 UTC, 5 s later;") in why, why


@needs_keygen
def test_extensions_for_what_the_relay_never_offers_take_nothing_away(pki: Path) -> None:
    """``-O clear -O permit-port-forwarding`` (no pty, agent or X11 forwarding, user rc)
    and an unknown extension: granted, as sshd grants them (it ignores unknown ones)."""
    cert = sign(pki, "fwonly", "-I", "k", "-n", "alice", "-O", "clear",
                "-O", "permit-port-forwarding", "-O", "extension:lab@example.org=x")
    verdict = check_certificate(cert, authorities(pki, line(pki)), now=time.time(),
                                address="10.0.0.5", login="alice")
    assert verdict.principal == ALICE, verdict.reason


@needs_keygen
def test_source_address_that_allows_the_peer(pki: Path) -> None:
    cert = sign(pki, "src", "-I", "k", "-n", "alice", "-O", "source-address=10.0.0.0/8")
    verdict = check_certificate(cert, authorities(pki, line(pki)), now=time.time(),
                                address="10.1.2.3", login="alice")
    assert verdict.principal == ALICE


@needs_keygen
def test_a_certificate_from_another_ca_is_refused(pki: Path) -> None:
    cert = sign(pki, "other", "-I", "k", "-n", "alice", ca="other_ca")
    verdict = check_certificate(cert, authorities(pki, line(pki)), now=time.time(),
                                address="10.0.0.5", login="alice")
    assert verdict.principal is None and "untrusted CA" in verdict.reason


@needs_keygen
def test_a_line_grants_only_the_login_it_is_for(pki: Path) -> None:
    """A certificate for ``alice,bob`` logs in as alice by alice's line and as bob by
    bob's, never under a name no line accepting it is for, and, once alice's line is
    gone, not as alice by bob's line (sshd: a ``cert-authority`` line in bob's
    ``authorized_keys`` never lets anyone log in as alice).  Until round 16 a login
    under another name fell back to the first accepting line: ``x`` logged in as alice,
    and alice, her line deleted, as bob."""
    cert = sign(pki, "both", "-I", "k", "-n", "alice,bob")
    lines = authorities(pki, line(pki), line(pki, BOB, ("bob",)))

    def check(login: str, using: dict[bytes, list[Authority]] = lines) -> CertVerdict:
        return check_certificate(cert, using, now=NOW, address="1.2.3.4", login=login)

    assert check("bob").principal == BOB and check("alice").principal == ALICE
    refused = check("x")
    assert refused.principal is None, refused
    assert "may log in as alice, bob only, not as 'x'" in refused.reason, refused.reason
    only_bob = authorities(pki, line(pki, BOB, ("bob",)))  # alice's line deleted
    refused = check("alice", only_bob)
    assert refused.principal is None, refused
    assert "may log in as bob only, not as 'alice'" in refused.reason, refused
    assert check("bob", only_bob).principal == BOB


@needs_keygen
def test_a_relay_wide_ca_logs_in_only_as_the_login_name(pki: Path) -> None:
    """``trusted_user_ca`` lines are login-bound: the login name must be one of the
    certificate's principals and the line's user; the CA's other lines still work as
    before (a per-user line does not need the login name)."""
    ca = blob(pki / "ca.pub")
    bound = [Authority(ca, p, frozenset((p.name,)), KeyLimits(), "relay.toml", login_bound=True)
             for p in (ALICE, BOB)]
    lines = authorities(pki, *bound)
    cert = sign(pki, "bound", "-I", "alice@lab", "-n", "alice,al")

    def check(login: str, certificate: bytes = cert,
              using: dict[bytes, list[Authority]] = lines) -> Principal | None:
        return check_certificate(certificate, using, now=NOW, address="1.2.3.4",
                                 login=login).principal

    assert check("alice") == ALICE
    assert check("bob") is None and check("al") is None and check("x") is None
    reason = check_certificate(cert, lines, now=NOW, address="1.2.3.4", login="bob").reason
    assert "trusted_user_ca" in reason and "'bob'" in reason and "alice@lab" in reason
    assert "(CA SHA256:" in reason
    # bob's certificate, presented as alice: refused (it is bob's, not alice's).
    assert check("alice", sign(pki, "bobs", "-I", "bob@lab", "-n", "bob")) is None
    # The same CA also on a per-user line accepting "al" for bob: that line needs no
    # principal named by the login, but is for bob's login only.
    mixed = authorities(pki, *bound, line(pki, BOB, ("al",)))
    assert check("bob", using=mixed) == BOB and check("alice", using=mixed) == ALICE
    assert check("x", using=mixed) is None


@needs_keygen
def test_the_lines_own_limits_apply(pki: Path) -> None:
    cert = sign(pki, "lim", "-I", "k", "-n", "alice")
    limited = line(pki, limits=KeyLimits(sources=parse_from("10.0.0.0/8")))
    verdict = check_certificate(cert, authorities(pki, limited), now=NOW, address="1.2.3.4",
                                login="alice")
    assert verdict.principal is None and "from=" in verdict.reason


@needs_keygen
def test_agent_certificate_principals_name_its_services(pki: Path) -> None:
    agent = Principal(AGENT, "lab_pc", (), frozenset(), None)
    cert = sign(pki, "agent", "-I", "lab_pc", "-n", "lab_pc,gpu-cluster:22,jupyter:*,bad:0")
    verdict = check_certificate(cert, authorities(pki, line(pki, agent, ("lab_pc",))),
                                now=NOW, address="1.2.3.4", login="lab_pc")
    assert verdict.principal is not None
    assert verdict.principal.services == (ServiceGrant("gpu-cluster", 22),
                                          ServiceGrant("jupyter", None))
    assert verdict.principal.may_register("gpu-cluster", 22)
    assert not verdict.principal.may_register("bad", 0)


# --- KRL -------------------------------------------------------------------------


@needs_keygen
def test_krl_by_serial_range_key_id_key_and_fingerprint(pki: Path) -> None:
    (pki / "spec").write_text("serial: 5\nserial: 10-20\nid: revoked@lab\n")
    keygen("-k", "-f", "krl", "-s", "ca.pub", "spec", cwd=pki)
    keygen("-k", "-u", "-f", "krl", "user2.pub", cwd=pki)  # the key itself, added
    krl = parse_krl((pki / "krl").read_bytes())
    lines = authorities(pki, line(pki))

    def check(cert: bytes) -> str:
        return check_certificate(cert, lines, now=NOW, address="1.2.3.4", login="alice",
                                 krl=krl).reason

    assert check(sign(pki, "s5", "-I", "a", "-n", "alice", serial=5)).endswith(
        "serial 5 is revoked in the KRL")
    assert "serial 15" in check(sign(pki, "s15", "-I", "a", "-n", "alice", serial=15))
    assert check(sign(pki, "s21", "-I", "a", "-n", "alice", serial=21)) == ""
    assert "key id 'revoked@lab'" in check(sign(pki, "kid", "-I", "revoked@lab", "-n", "alice",
                                                serial=30))
    assert "certificate's key" in check(sign(pki, "u2", "-I", "a", "-n", "alice", key="user2",
                                             serial=31))
    assert check(sign(pki, "fine", "-I", "a", "-n", "alice", serial=32)) == ""
    assert krl.revoked_key(blob(pki / "user2.pub")) is not None
    assert krl.revoked_key(blob(pki / "user.pub")) is None

    (pki / "spec2").write_text(f"sha256: {(pki / 'user.pub').read_text().strip()}\n")
    keygen("-k", "-f", "krl2", "spec2", cwd=pki)
    assert "SHA256" in (parse_krl((pki / "krl2").read_bytes()).revoked_key(
        blob(pki / "user.pub")) or "")


@needs_keygen
def test_krl_serial_bitmap(pki: Path) -> None:
    # Many scattered serials make ssh-keygen choose its bitmap encoding.
    serials = list(range(100, 400, 3))
    (pki / "spec3").write_text("".join(f"serial: {s}\n" for s in serials))
    keygen("-k", "-f", "krl3", "-s", "ca.pub", "spec3", cwd=pki)
    krl = parse_krl((pki / "krl3").read_bytes())
    assert any(entry.bitmaps for entry in krl.certs.values())  # the encoding under test
    revoked = {s for s in range(0, 1000)
               if any(entry.match(s, b"") for entry in krl.certs.values())}
    assert revoked == set(serials)


def test_a_huge_krl_bitmap_costs_its_size_not_one_object_per_serial() -> None:
    """A 2 MiB bitmap of ones (16 million serials) parses at once and is looked up
    per serial; it was expanded bit by bit (quadratic: ~1.6 s at 32 KiB, hours at
    2 MiB) into a set of 16 million ints (~1 GiB)."""
    import struct
    import time

    from relay.core import krl as k

    def s(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    bits = b"\x7f" + b"\xff" * (k.MAX_BITMAP_BITS // 8 - 1)  # positive, 2^24 - 1 bits
    sub = bytes([k.CERT_SERIAL_BITMAP]) + s(struct.pack(">Q", 1000) + s(b"\0" + bits))
    head = k.MAGIC + struct.pack(">IQQQ", 1, 1, 0, 0) + s(b"") + s(b"bomb")
    data = head + bytes([k.SECTION_CERTIFICATES]) + s(s(b"") + s(b"") + sub)
    started = time.perf_counter()
    krl = parse_krl(data)
    took = time.perf_counter() - started
    entry = krl.certs[b""]
    assert took < 1.0 and not entry.serials
    assert entry.match(1000, b"") and entry.match(1000 + 2**24 - 2, b"")
    assert entry.match(999, b"") is None and entry.match(1000 + 2**24 - 1, b"") is None
    too_big = b"\x01" + bits
    sub = bytes([k.CERT_SERIAL_BITMAP]) + s(struct.pack(">Q", 0) + s(too_big))
    with pytest.raises(KrlError, match="too large"):
        parse_krl(head + bytes([k.SECTION_CERTIFICATES]) + s(s(b"") + s(b"") + sub))


def test_krl_garbage_is_refused() -> None:
    with pytest.raises(KrlError):
        parse_krl(b"not a krl")
    with pytest.raises(KrlError):
        parse_krl(b"SSHKRL\n\x00\x00\x00\x00\x01" + b"\x00" * 5)


# --- expiry-time and from= ------------------------------------------------------


def test_expiry_time_formats() -> None:
    assert parse_expiry("20300101Z") == calendar.timegm((2030, 1, 1, 0, 0, 0))
    assert parse_expiry("203001011230Z") == calendar.timegm((2030, 1, 1, 12, 30, 0))
    assert parse_expiry("20300101123005Z") == calendar.timegm((2030, 1, 1, 12, 30, 5))
    assert parse_expiry("20300101") == time.mktime((2030, 1, 1, 0, 0, 0, 0, 0, -1))
    for bad in ("2030", "20301301", "tomorrow", "20300101123"):
        with pytest.raises(KeyOptionError):
            parse_expiry(bad)


def test_key_limits() -> None:
    limits = KeyLimits(expires=1000.0, sources=parse_from("10.0.0.0/8,!10.9.9.9,192.168.1.?"))
    assert limits.refusal(999.0, "10.1.1.1") is None
    assert limits.refusal(999.0, "192.168.1.7") is None
    assert "from=" in (limits.refusal(999.0, "10.9.9.9") or "")
    assert "from=" in (limits.refusal(999.0, "8.8.8.8") or "")
    assert "expired" in (limits.refusal(1000.0, "10.1.1.1") or "")
    with pytest.raises(KeyOptionError):
        parse_from("10.0.0.0/99")


@needs_keygen
def test_a_relay_wide_ca_listed_in_the_krl_logs_no_one_in(pki: Path) -> None:
    """docs/relay.md: listing the CA's key in ``revoked_keys`` cuts a ``trusted_user_ca``
    off without a reload of the config: every certificate it signed is refused, for the
    user it names too."""
    ca = blob(pki / "ca.pub")
    bound = [Authority(ca, ALICE, frozenset(("alice",)), KeyLimits(), "relay.toml",
                       login_bound=True)]
    lines = authorities(pki, *bound)
    cert = sign(pki, "bound_krl", "-I", "alice@lab", "-n", "alice", serial=77)
    assert check_certificate(cert, lines, now=NOW, address="1.2.3.4",
                             login="alice").principal == ALICE
    keygen("-k", "-f", "krl_ca", "ca.pub", cwd=pki)  # the CA's own key, revoked
    krl = parse_krl((pki / "krl_ca").read_bytes())
    verdict = check_certificate(cert, lines, now=NOW, address="1.2.3.4", login="alice",
                                krl=krl)
    assert verdict.principal is None and "revoked" in verdict.reason, verdict.reason
