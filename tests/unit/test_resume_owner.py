"""Who may resume a held session at the relay (relay.core.resume.may_resume), with
certificates from the real ``ssh-keygen``: the agent that opened it, or the same agent
process and login with a renewed certificate of the same key; and once resumed, the
session is the renewal's (docs/resilience.md, "Who may resume")."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from relay.core.resume import (
    SID_LEN,
    Offer,
    Refusal,
    ResumeOwner,
    ResumeRefused,
    ResumeTable,
    may_resume,
)

KEYGEN = shutil.which("ssh-keygen")
pytestmark = pytest.mark.skipif(KEYGEN is None, reason="ssh-keygen not installed")
SID = b"r" * SID_LEN


def _keygen(*args: str, cwd: Path) -> None:
    assert KEYGEN is not None
    subprocess.run([KEYGEN, "-q", *args], cwd=cwd, check=True, capture_output=True)


def _blob(path: Path) -> bytes:
    return base64.b64decode(path.read_text().split()[1])


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Certificates of lab_pc's key (serials 1 and 2, another CA's), of another key,
    and the two plain keys."""
    d = tmp_path_factory.mktemp("pki")
    for name in ("ca", "other_ca", "lab_pc", "other"):
        _keygen("-t", "ed25519", "-N", "", "-C", name, "-f", name, cwd=d)
    out = {"key": _blob(d / "lab_pc.pub"), "other_key": _blob(d / "other.pub")}
    for name, ca, key, serial in (("cert1", "ca", "lab_pc", 1), ("cert2", "ca", "lab_pc", 2),
                                  ("other_ca", "other_ca", "lab_pc", 3),
                                  ("other_cert", "ca", "other", 4)):
        shutil.copy(d / f"{key}.pub", d / f"{name}.pub")
        _keygen("-s", ca, "-I", name, "-n", "lab_pc", "-z", str(serial), "-V", "-5m:+1h",
                f"{name}.pub", cwd=d)
        out[name] = _blob(d / f"{name}-cert.pub")
    return out


def test_a_renewed_certificate_of_the_same_key_process_and_login_may_resume(
    blobs: dict[str, bytes],
) -> None:
    held = ResumeOwner(blobs["cert1"], b"i", "lab_pc")
    assert may_resume(held, held)
    assert may_resume(held, ResumeOwner(blobs["cert2"], b"i", "lab_pc"))
    # Signed by another CA: the login's checks decided whether that CA may (they ran).
    assert may_resume(held, ResumeOwner(blobs["other_ca"], b"i", "lab_pc"))


@pytest.mark.parametrize(("key", "instance", "login"), [
    ("other_cert", b"i", "lab_pc"),  # another key's certificate
    ("cert2", b"j", "lab_pc"),  # another process (the agent restarted)
    ("cert2", b"i", "spare"),  # another login: another agent
    ("key", b"i", ""),  # the plain key of the certificate
    ("cert2", b"i", "Lab_pc"),
], ids=["other-key", "other-instance", "other-login", "plain-key", "case"])
def test_anyone_else_may_not(blobs: dict[str, bytes], key: str, instance: bytes,
                             login: str) -> None:
    held = ResumeOwner(blobs["cert1"], b"i", "lab_pc")
    assert not may_resume(held, ResumeOwner(blobs[key], instance, login))


def test_a_plain_key_and_malformed_blobs_renew_nothing(blobs: dict[str, bytes]) -> None:
    plain = ResumeOwner(blobs["key"], b"i", "")
    assert may_resume(plain, ResumeOwner(blobs["key"], b"i", ""))
    assert not may_resume(plain, ResumeOwner(blobs["other_key"], b"i", ""))
    assert not may_resume(plain, ResumeOwner(blobs["cert1"], b"i", ""))
    broken = blobs["cert1"][:-40]  # a certificate's type name, then garbage
    assert not may_resume(ResumeOwner(broken, b"i", "lab_pc"),
                          ResumeOwner(broken + b"x", b"i", "lab_pc"))
    assert not may_resume(ResumeOwner(blobs["cert1"], b"i", "lab_pc"),
                          ResumeOwner(broken, b"i", "lab_pc"))
    # Owners that are not the relay's (tests', the agent's end): equality only.
    assert may_resume("k", "k") and not may_resume("k", "j")
    assert not may_resume((blobs["cert1"], b"i", "lab_pc"),
                          ResumeOwner(blobs["cert2"], b"i", "lab_pc"))


def test_resumed_the_session_is_the_renewals_and_no_longer_the_old_ones(
    blobs: dict[str, bytes],
) -> None:
    """The owner follows the resume, so the key checks (expiry, KRL) look at the
    certificate in use; a refused offer changes nothing."""
    old = ResumeOwner(blobs["cert1"], b"i", "lab_pc")
    new = old._replace(key=blobs["cert2"])
    table = ResumeTable()
    s = table.open(SID, old)
    s.wrote(b"abc")
    table.lost([s], 1.0, 60.0)
    with pytest.raises(ResumeRefused) as theirs:
        table.offered(Offer(SID, 0, False), old._replace(key=blobs["other_cert"]), 2.0)
    assert theirs.value.why is Refusal.NOT_YOURS and s.owner == old
    stream, plan = table.offered(Offer(SID, 1, False), new, 3.0)
    assert stream is s and b"".join(plan.retransmit) == b"bc"
    assert s.owner == new
    table.lost([s], 4.0, 60.0)
    assert may_resume(s.owner, old)  # the same key back on its first certificate
