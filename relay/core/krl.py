"""OpenSSH key revocation lists (KRL), as ``ssh-keygen -k`` writes them (sans-IO).

The format is OpenSSH's ``PROTOCOL.krl``: a header (magic ``SSHKRL\\n\\0``, format
version 1, KRL version, date, flags, reserved, comment) then sections, each a type
byte and a string:

* certificates (1): a CA key (empty: any CA) and sub-sections revoking serials (a
  list, ranges, a bitmap) and key ids;
* explicit keys (2): public key blobs;
* SHA1 (3) and SHA256 (5) fingerprints of public key blobs;
* a signature (4): ignored here, as ``sshd`` ignores it (the file is the operator's).

No library parses KRLs (pyca/cryptography reads certificates, not revocation lists),
hence this small parser.  :meth:`Krl.revoked_key` and :meth:`Krl.revoked_cert` answer
with the reason, so the refusal in the log says which entry matched.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

MAGIC = b"SSHKRL\n\x00"
FORMAT_VERSION = 1

SECTION_CERTIFICATES = 1
SECTION_EXPLICIT_KEY = 2
SECTION_FINGERPRINT_SHA1 = 3
SECTION_SIGNATURE = 4
SECTION_FINGERPRINT_SHA256 = 5

CERT_SERIAL_LIST = 0x20
CERT_SERIAL_RANGE = 0x21
CERT_SERIAL_BITMAP = 0x22
CERT_KEY_ID = 0x23

MAX_BITMAP_BITS = 1 << 24
"""A bitmap wider than this is refused (a hostile or corrupt file costs no memory)."""


class KrlError(ValueError):
    """The bytes are not a KRL this parser understands."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise KrlError("truncated KRL")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.u32())

    def mpint_bytes(self) -> bytes:
        """An mpint's magnitude, big-endian (leading zero bytes stripped)."""
        raw = self.string()
        if raw and raw[0] & 0x80:
            raise KrlError("negative bitmap in KRL")
        return raw.lstrip(b"\0")

    def done(self) -> bool:
        return self.at == len(self.data)


@dataclass(frozen=True)
class _Bitmap:
    """Serials ``offset + i`` for every bit ``i`` set in ``bits`` (big-endian, bit 0
    the last byte's lowest), kept as the file's bytes and looked up per serial: as
    large as the file, never one object per serial (a 2 MiB bitmap would otherwise be
    16 million set entries, and expanding it bit by bit took time quadratic in it)."""

    offset: int
    bits: bytes

    def __contains__(self, serial: int) -> bool:
        i = serial - self.offset
        if i < 0 or i >= 8 * len(self.bits):
            return False
        return bool(self.bits[len(self.bits) - 1 - i // 8] >> (i % 8) & 1)


@dataclass
class _CertRevocations:
    serials: set[int] = field(default_factory=set)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    bitmaps: list[_Bitmap] = field(default_factory=list)
    key_ids: set[bytes] = field(default_factory=set)

    def match(self, serial: int, key_id: bytes) -> str | None:
        if serial in self.serials or any(serial in b for b in self.bitmaps):
            return f"serial {serial} is revoked"
        for low, high in self.ranges:
            if low <= serial <= high:
                return f"serial {serial} is in revoked range {low}-{high}"
        if key_id in self.key_ids:
            return f"key id {key_id.decode('utf-8', 'replace')!r} is revoked"
        return None


@dataclass
class Krl:
    """A parsed KRL: what it revokes."""

    version: int = 0
    comment: str = ""
    keys: set[bytes] = field(default_factory=set)  # public key blobs
    sha1: set[bytes] = field(default_factory=set)
    sha256: set[bytes] = field(default_factory=set)
    certs: dict[bytes, _CertRevocations] = field(default_factory=dict)  # CA blob (b"": any)

    def revoked_key(self, blob: bytes) -> str | None:
        """Why the plain key (or a certificate's CA or signed key) ``blob`` is revoked."""
        if blob in self.keys:
            return "the key is listed in the KRL"
        if hashlib.sha256(blob).digest() in self.sha256:
            return "the key's SHA256 fingerprint is listed in the KRL"
        if hashlib.sha1(blob).digest() in self.sha1:  # the format's own hash
            return "the key's SHA1 fingerprint is listed in the KRL"
        return None

    def revoked_cert(self, ca_blob: bytes, serial: int, key_id: bytes,
                     key_blob: bytes) -> str | None:
        """Why a certificate (its CA, serial, key id and the key it signs) is revoked:
        by serial or key id under its CA or any CA, or because the signed key or the
        CA key itself is revoked."""
        for ca in (ca_blob, b""):
            entry = self.certs.get(ca)
            if entry is not None:
                why = entry.match(serial, key_id)
                if why is not None:
                    return f"certificate {why} in the KRL"
        why = self.revoked_key(key_blob)
        if why is not None:
            return f"the certificate's key: {why}"
        why = self.revoked_key(ca_blob)
        if why is not None:
            return f"the certificate's CA: {why}"
        return None


def parse_krl(data: bytes) -> Krl:
    """Parse a binary KRL; :class:`KrlError` if it is not one."""
    r = _Reader(data)
    if r.take(len(MAGIC)) != MAGIC:
        raise KrlError("not a KRL (bad magic); make one with ssh-keygen -k")
    if r.u32() != FORMAT_VERSION:
        raise KrlError("unsupported KRL format version")
    krl = Krl(version=r.u64())
    r.u64()  # generated date
    r.u64()  # flags
    r.string()  # reserved
    krl.comment = r.string().decode("utf-8", "replace")
    while not r.done():
        kind = r.u8()
        body = _Reader(r.string())
        if kind == SECTION_CERTIFICATES:
            _certs(body, krl)
        elif kind == SECTION_EXPLICIT_KEY:
            while not body.done():
                krl.keys.add(body.string())
        elif kind == SECTION_FINGERPRINT_SHA1:
            while not body.done():
                krl.sha1.add(body.string())
        elif kind == SECTION_FINGERPRINT_SHA256:
            while not body.done():
                krl.sha256.add(body.string())
        elif kind == SECTION_SIGNATURE:
            continue
        else:
            raise KrlError(f"unknown KRL section type {kind}")
    return krl


def _certs(body: _Reader, krl: Krl) -> None:
    ca = body.string()
    body.string()  # reserved
    entry = krl.certs.setdefault(ca, _CertRevocations())
    while not body.done():
        kind = body.u8()
        sub = _Reader(body.string())
        if kind == CERT_SERIAL_LIST:
            while not sub.done():
                entry.serials.add(sub.u64())
        elif kind == CERT_SERIAL_RANGE:
            low, high = sub.u64(), sub.u64()
            if low > high:
                raise KrlError("KRL serial range with its minimum above its maximum")
            entry.ranges.append((low, high))
        elif kind == CERT_SERIAL_BITMAP:
            offset = sub.u64()
            bits = sub.mpint_bytes()
            if len(bits) > MAX_BITMAP_BITS // 8:
                raise KrlError("KRL serial bitmap too large")
            if bits:
                entry.bitmaps.append(_Bitmap(offset, bits))
        elif kind == CERT_KEY_ID:
            while not sub.done():
                entry.key_ids.add(sub.string())
        else:
            raise KrlError(f"unknown KRL certificate section type {kind:#x}")


def krl_union(a: Krl, b: Krl) -> Krl:
    """What either revokes: in force while a changed revoked-keys file is not yet
    trusted (:mod:`relay.server.keytrust`), so a half-written one never un-revokes."""
    out = Krl(version=max(a.version, b.version), comment=b.comment,
              keys=a.keys | b.keys, sha1=a.sha1 | b.sha1, sha256=a.sha256 | b.sha256)
    for ca in a.certs.keys() | b.certs.keys():
        x = a.certs.get(ca, _CertRevocations())
        y = b.certs.get(ca, _CertRevocations())
        out.certs[ca] = _CertRevocations(
            serials=x.serials | y.serials, ranges=x.ranges + [r for r in y.ranges
                                                              if r not in x.ranges],
            bitmaps=x.bitmaps + [m for m in y.bitmaps if m not in x.bitmaps],
            key_ids=x.key_ids | y.key_ids)
    return out


def krl_may_unrevoke(old: Krl, new: Krl) -> bool:
    """Whether ``new`` might revoke less than ``old`` (conservative: a serial merged into
    a range or bitmap by ``ssh-keygen -k -u`` counts as possibly un-revoked)."""
    if not (old.keys <= new.keys and old.sha1 <= new.sha1 and old.sha256 <= new.sha256):
        return True
    for ca, x in old.certs.items():
        y = new.certs.get(ca)
        if y is None or not (x.serials <= y.serials and x.key_ids <= y.key_ids
                             and all(r in y.ranges for r in x.ranges)
                             and all(m in y.bitmaps for m in x.bitmaps)):
            return True
    return False
