"""Just enough X.509 to index a CA file: fingerprints, subject and issuer, without a dependency.

A certificate is ``SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
signature, issuer Name, validity, subject Name, ... }, ... }``. Names are compared as their DER
bytes. OpenSSL compares a canonical form instead, so two encodings of one name can fail to match
here: then safepg simply does not narrow the trust set (slower, never weaker).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n(?P<b64>.+?)-----END CERTIFICATE-----", re.DOTALL
)


@dataclass(frozen=True)
class Cert:
    der: bytes
    sha256: str
    subject: bytes
    issuer: bytes

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
    return Cert(der, hashlib.sha256(der).hexdigest(), subject=elements[4], issuer=elements[2])


def parse_pem(data: bytes) -> list[Cert]:
    """Every certificate in *data*; blocks that are not valid certificates are skipped."""
    certs = []
    for m in _PEM_BLOCK.finditer(data):
        try:
            certs.append(parse_der(base64.b64decode(m["b64"])))
        except (ValueError, binascii.Error):
            continue
    return certs
