"""Just enough X.509 to index a CA file: fingerprints, subject and issuer, without a dependency.

A certificate is ``SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
signature, issuer Name, validity, subject Name, ... }, ... }``. Names are compared as their DER
bytes. OpenSSL compares a canonical form instead, so two encodings of one name can fail to match
here: then safepg simply does not narrow the trust set (slower, never weaker).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

logger = logging.getLogger("safepg")

_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n(?P<b64>.+?)-----END CERTIFICATE-----", re.DOTALL
)


@dataclass(frozen=True)
class Cert:
    der: bytes
    sha256: str
    subject: bytes
    issuer: bytes
    not_after: dt.datetime | None = None

    @property
    def self_issued(self) -> bool:
        return self.subject == self.issuer

    def pem(self) -> bytes:
        b64 = base64.encodebytes(self.der).replace(b"\n", b"")
        lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
        return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, end) of the DER element at *pos*."""
    tag = data[pos]
    length = data[pos + 1]
    start = pos + 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[start : start + n], "big")
        start += n
    end = start + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, start, end


def parse_der(der: bytes) -> Cert:
    """Index one DER certificate. Raises ValueError when it is not one."""
    try:
        tag, start, _end = _tlv(der, 0)
        if tag != 0x30:
            raise ValueError("not a SEQUENCE")
        tag, pos, tbs_end = _tlv(der, start)  # tbsCertificate
        if tag != 0x30:
            raise ValueError("no tbsCertificate")
        elements: list[bytes] = []
        while pos < tbs_end and len(elements) < 6:
            tag, _content, end = _tlv(der, pos)
            if tag != 0xA0 or elements:  # skip the explicit [0] version
                elements.append(der[pos:end])
            pos = end
    except IndexError:
        raise ValueError("truncated DER") from None
    if len(elements) < 5:
        raise ValueError("incomplete tbsCertificate")
    # serialNumber, signature, issuer, validity, subject
    return Cert(
        der,
        hashlib.sha256(der).hexdigest(),
        subject=elements[4],
        issuer=elements[2],
        not_after=_not_after(elements[3]),
    )


def _not_after(validity: bytes) -> dt.datetime | None:
    """notAfter of a Validity SEQUENCE (UTCTime or GeneralizedTime), or None if unreadable."""
    try:
        _tag, pos, end = _tlv(validity, 0)
        _tag, _start, pos = _tlv(validity, pos)  # notBefore
        tag, start, end = _tlv(validity, pos)
        text = validity[start:end].decode("ascii")
        if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280)
            year = int(text[:2])
            text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
        elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
            return None
        return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def parse_pem(data: bytes) -> list[Cert]:
    """Every certificate in *data*; blocks that are not valid certificates are skipped."""
    certs = []
    for m in _PEM_BLOCK.finditer(data):
        try:
            certs.append(parse_der(base64.b64decode(m["b64"])))
        except (ValueError, binascii.Error):
            continue
    return certs


_CN_OID = b"\x06\x03\x55\x04\x03"


def common_name(name: bytes) -> str | None:
    """The last commonName in a DER Name, or None."""
    found = None
    try:
        _tag, pos, end = _tlv(name, 0)
        while pos < end:  # RDNs (SETs)
            _tag, set_pos, set_end = _tlv(name, pos)
            while set_pos < set_end:  # AttributeTypeAndValue SEQUENCEs
                _tag, atv, atv_end = _tlv(name, set_pos)
                _tag, _oid, oid_end = _tlv(name, atv)
                if name[atv:oid_end] == _CN_OID:
                    _tag, v_start, v_end = _tlv(name, oid_end)
                    found = name[v_start:v_end].decode("utf-8", "replace")
                set_pos = atv_end
            pos = set_end
    except (ValueError, IndexError):
        return found
    return found


EXPIRY_WARNING = dt.timedelta(days=90)
_expiry_warned: set[str] = set()


def warn_if_expiring(certs: Iterable[Cert], where: str, now: dt.datetime | None = None) -> None:
    """Log a warning, once per process per certificate, for anchors expiring within 90 days."""
    soon = (now or dt.datetime.now(dt.timezone.utc)) + EXPIRY_WARNING
    for cert in certs:
        if cert.not_after is None or cert.not_after >= soon or cert.sha256 in _expiry_warned:
            continue
        _expiry_warned.add(cert.sha256)
        name = common_name(cert.subject) or f"SHA-256 {cert.sha256[:16]}..."
        logger.warning(
            "safepg: the trust anchor %r in %s expires on %s. Connections that rely on it "
            "will fail after that date: update the file (safepg bundles install, your OS "
            "ca-certificates or certifi), or ask the server's operator which CA replaces it.",
            name,
            where,
            f"{cert.not_after:%Y-%m-%d}",
        )
