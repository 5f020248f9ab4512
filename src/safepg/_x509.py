"""Just enough PEM and X.509 to index a CA file: fingerprints, subject and issuer, without a
dependency.

PEM is read the way OpenSSL reads it when libpq loads ``sslrootcert`` (`read_pem`): every block
OpenSSL would find is found, with its label, and anything OpenSSL could read differently (or
that OpenSSL versions read differently) is an error naming the block, never skipped.

A certificate is ``SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
signature, issuer Name, validity, subject Name, ... }, ... }``. Names are compared as their DER
bytes. OpenSSL compares a canonical form instead, so two encodings of one name can fail to match
here: then safepg simply does not narrow the trust set (slower, never weaker).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

logger = logging.getLogger("safepg")


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
        return pem_encode(self.der)


def pem_encode(der: bytes) -> bytes:
    """*der* as a canonical PEM block: ``BEGIN CERTIFICATE``, base64 in 64-character lines,
    ``\\n`` line ends. Every trust file safepg writes for libpq holds only such blocks."""
    b64 = base64.b64encode(der)
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


# --- PEM, as OpenSSL reads it -------------------------------------------------------------------
#
# libpq loads sslrootcert with SSL_CTX_load_verify_locations, which reads the file with
# PEM_X509_INFO_read_bio and so with PEM_read_bio (crypto/pem/pem_lib.c). That:
# - reads lines with BIO_gets, at most 254 bytes at a time: a longer line is read as several
#   (newer versions then ignore a line end read on its own, older ones see a blank line);
# - strips trailing bytes <= ' ' from each (and, where C's char is signed, bytes >= 0x80);
# - skips every line until one is "-----BEGIN <label>-----";
# - then reads up to "-----END <label>-----" (another END line is an error): optional RFC 1421
#   headers ended by a blank line (a line holding ':' before any blank line makes them headers),
#   then base64 in which spaces, tabs and line ends are ignored and '-' ends the data; after
#   headers, lines hold at most 64 characters and only the last may be shorter;
# - and fails the whole file on any error in a block.
# PEM_X509_INFO_read_bio then loads CERTIFICATE and X509 CERTIFICATE blocks as certificates,
# TRUSTED CERTIFICATE ones as certificates with OpenSSL trust settings, X509 CRL ones as CRLs,
# "... PRIVATE KEY" ones as keys (ignored by the store, but parsed), and skips any other label.

CERTIFICATE_LABELS = frozenset({"CERTIFICATE", "X509 CERTIFICATE"})
TRUSTED_LABEL = "TRUSTED CERTIFICATE"

_BEGIN = b"-----BEGIN "
_END = b"-----END "
_TAIL = b"-----"
_BOM = b"\xef\xbb\xbf"
_LINE_MAX = 254  # BIO_gets(bio, buf, 255) returns at most 254 bytes
_STRIP = bytes(range(0x21))  # stripped from line ends: bytes <= ' '
_STRIP_SIGNED = _STRIP + bytes(range(0x80, 0x100))  # and bytes >= 0x80 where char is signed
_B64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_MAYBE_HEADER, _IN_HEADER, _POST_HEADER = 0, 1, 2


class PemError(ValueError):
    """The data is not PEM that OpenSSL reads as safepg does; the message names the block."""


@dataclass(frozen=True)
class PemBlock:
    """One PEM block, as OpenSSL reads it.

    Attributes:
        index: its place among the file's blocks, from 1, whatever their labels.
        line: the line of its BEGIN line, from 1.
        label: what follows ``-----BEGIN `` (non-ASCII bytes shown escaped).
        headers: its RFC 1421 headers (``Proc-Type: ...``), ``b""`` if none.
        data: its body, base64-decoded as OpenSSL decodes it.
    """

    index: int
    line: int
    label: str
    headers: bytes
    data: bytes

    def __str__(self) -> str:
        return f"block #{self.index} (BEGIN {self.label}, line {self.line})"


def _lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, text) for each read of OpenSSL's BIO_gets; a text may keep its newline."""
    lines = data.split(b"\n")
    if not lines[-1]:
        lines.pop()  # the end of the data, not a line
    if max(map(len, lines), default=0) < _LINE_MAX:
        return enumerate(lines, 1)  # the usual case, quickly: every line is read at once
    return _chunks(lines, ends_with_newline=data.endswith(b"\n"))


def _chunks(lines: list[bytes], ends_with_newline: bool) -> Iterator[tuple[int, bytes]]:
    last = len(lines) - 1
    for i, line in enumerate(lines):
        has_newline = i < last or ends_with_newline
        if len(line) + has_newline <= _LINE_MAX:
            yield i + 1, line
            continue
        raw = line + b"\n" if has_newline else line
        for start in range(0, len(raw), _LINE_MAX):
            yield i + 1, raw[start : start + _LINE_MAX]


def _is_begin(line: bytes) -> bool:
    return line.startswith(_BEGIN) and line.endswith(_TAIL) and len(line) >= 16


def _b64decode(text: bytes) -> bytes | None:
    """*text* decoded as OpenSSL's EVP_DecodeUpdate and EVP_DecodeFinal do, or None if they fail
    (or decode nothing)."""
    cut = text.find(b"-")  # '-' ends the data: what follows is ignored
    if cut >= 0:
        text = text[:cut]
    text = text.translate(None, b" \t\r\n")
    if not text or len(text) % 4 or not _B64.fullmatch(text):
        return None
    return binascii.a2b_base64(text)


def read_pem(data: bytes) -> list[PemBlock]:
    """Every PEM block in *data*, found as OpenSSL finds them when libpq loads a CA file.

    Raises:
        PemError: OpenSSL would fail to load *data*, or could read it otherwise than this does
            (NUL bytes, non-ASCII bytes in a block or at the end of a BEGIN line, a byte order
            mark before a BEGIN line: OpenSSL versions and platforms differ on these). The
            message names the block and the line.
    """
    if b"\0" in data:
        at = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise PemError(f"line {at} holds a NUL byte, where OpenSSL stops reading the line")
    blocks: list[PemBlock] = []
    lines = _lines(data)
    for number, text in lines:
        if not text.startswith(_BEGIN):
            if text.startswith(_BOM) and _is_begin(text[3:].rstrip(_STRIP_SIGNED)):
                raise PemError(
                    f"line {number}: a BEGIN line after a UTF-8 byte order mark, which OpenSSL "
                    "versions read differently: save the file without it"
                )
            continue
        begin = text.rstrip(_STRIP)
        if not _is_begin(begin):
            if _is_begin(text.rstrip(_STRIP_SIGNED)):
                raise PemError(
                    f"line {number}: a BEGIN line that ends in non-ASCII bytes, which OpenSSL "
                    "reads differently on different platforms"
                )
            continue
        raw_label = begin[len(_BEGIN) : -len(_TAIL)]
        label = raw_label.decode("ascii", "backslashreplace")
        where = f"block #{len(blocks) + 1} (BEGIN {label}, line {number})"
        end_line = _END + raw_label + _TAIL
        state = _MAYBE_HEADER
        before: list[bytes] = []  # headers, or the body if no blank line comes
        after: list[bytes] = []  # the body, after a blank line
        lines_in = before
        short = partial = False
        for number_in, text_in in lines:
            if not text_in.isascii():
                raise PemError(f"{where}: line {number_in} holds non-ASCII bytes")
            was_partial = partial
            partial = len(text_in) == _LINE_MAX and not text_in.endswith(b"\n")
            if state == _MAYBE_HEADER and b":" in text_in:
                state = _IN_HEADER
            line = text_in.rstrip(_STRIP)
            if not line:
                if was_partial:  # newer OpenSSL versions ignore this line end, older ones not
                    raise PemError(
                        f"{where}: line {number_in} is {_LINE_MAX} characters long or more, "
                        "which OpenSSL versions read differently"
                    )
                if state == _POST_HEADER:
                    raise PemError(f"{where}: a second blank line, at line {number_in}")
                state = _POST_HEADER
                lines_in = after
                continue
            if line.startswith(_END):
                if line != end_line:
                    raise PemError(f"{where}: line {number_in} is not -----END {label}-----")
                break
            if short:
                raise PemError(f"{where}: a short base64 line before line {number_in}")
            lines_in.append(line)
            if state == _POST_HEADER:
                if len(line) > 64:
                    raise PemError(f"{where}: line {number_in} is longer than 64 characters")
                short = len(line) < 64
        else:
            raise PemError(f"{where}: no -----END {label}----- line")
        if state == _MAYBE_HEADER:
            headers, body = b"", before
        else:
            headers, body = b"".join(h + b"\n" for h in before), after
        decoded = _b64decode(b"".join(body))
        if decoded is None:
            raise PemError(f"{where}: its base64 does not decode")
        blocks.append(PemBlock(len(blocks) + 1, number, label, headers, decoded))
    return blocks


def certificate(block: PemBlock) -> Cert:
    """The certificate OpenSSL loads from a CERTIFICATE, X509 CERTIFICATE or TRUSTED
    CERTIFICATE block: its leading SEQUENCE. (OpenSSL ignores what follows it, except in a
    TRUSTED CERTIFICATE, where trust settings follow, which safepg does not evaluate.)

    Raises:
        PemError: OpenSSL would not load a certificate from the block (or would decrypt it).
    """
    if block.headers:
        raise PemError(
            f"{block} has RFC 1421 headers: OpenSSL refuses them, or decrypts the block "
            "(Proc-Type: 4,ENCRYPTED) with an empty password"
        )
    try:
        _tag, _start, end = _tlv(block.data, 0)
        cert = parse_der(block.data[:end])
        rest = block.data[end:]
        if block.label == TRUSTED_LABEL and rest and _tlv(rest, 0)[0] != 0x30:
            raise ValueError("its trust settings are not a SEQUENCE")
    except (ValueError, IndexError) as ex:
        raise PemError(f"{block} does not hold a certificate ({ex})") from None
    return cert


def _loaded_unread(block: PemBlock) -> bool:
    """OpenSSL parses *block* (and fails the file if it is bad), but not as a certificate."""
    return block.label == "X509 CRL" or "PRIVATE KEY" in block.label


@functools.lru_cache(maxsize=8)
def read_certificates(data: bytes) -> tuple[tuple[PemBlock, Cert | None], ...]:
    """`read_pem`, with each certificate block's certificate parsed (None for other blocks).

    Remembered for the last few files' contents: resolving the trust anchors and the fast path
    read the same big file (the OS store, certifi: 5-7 ms to parse) in the same connect.

    Raises:
        PemError: OpenSSL would not read *data* as this reads it.
    """
    return tuple(
        (b, certificate(b) if b.label in CERTIFICATE_LABELS or b.label == TRUSTED_LABEL else None)
        for b in read_pem(data)
    )


def parse_pem(data: bytes) -> list[Cert]:
    """The certificates of a trust file that may be rewritten, as plain certificates, into a
    narrower trust file: never wider than what OpenSSL trusts from *data*.

    That is, its CERTIFICATE and X509 CERTIFICATE blocks, less every certificate that is also
    in a TRUSTED CERTIFICATE block, or shares a subject with one (its trust settings would be
    lost in the rewrite; without it, narrowing falls back to the full set). Nothing at all when
    OpenSSL would fail to load *data*, or read it otherwise than `read_pem` (a narrower file
    that loads where the full one does not would be wider), or when it holds a CRL or a key.
    """
    plain: list[Cert] = []
    trusted: list[Cert] = []
    try:
        for block, cert in read_certificates(data):
            if cert is None:
                if _loaded_unread(block):
                    return []
            elif block.label == TRUSTED_LABEL:
                trusted.append(cert)
            else:
                plain.append(cert)
    except PemError:
        return []
    if not trusted:
        return plain
    fingerprints = {c.sha256 for c in trusted}
    subjects = {c.subject for c in trusted}
    return [c for c in plain if c.sha256 not in fingerprints and c.subject not in subjects]


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


_BASIC_CONSTRAINTS_OID = b"\x06\x03\x55\x1d\x13"


def is_ca(der: bytes) -> bool:
    """The certificate's basicConstraints extension says ``cA: TRUE`` (RFC 5280 4.2.1.9).

    False when it has no such extension, or cannot be read: a trust anchor safepg writes for a
    provider must say it is a CA, as OpenSSL requires of the certificates that sign a chain.
    """
    try:
        _tag, start, _end = _tlv(der, 0)
        tag, pos, tbs_end = _tlv(der, start)
        while pos < tbs_end:
            tag, content, end = _tlv(der, pos)
            if tag == 0xA3:  # [3] EXPLICIT Extensions
                _tag, ext_pos, exts_end = _tlv(der, content)
                while ext_pos < exts_end:
                    _tag, field, ext_end = _tlv(der, ext_pos)
                    ftag, _fstart, fend = _tlv(der, field)
                    if ftag == 0x06 and der[field:fend] == _BASIC_CONSTRAINTS_OID:
                        vtag, vstart, vend = _tlv(der, fend)
                        if vtag == 0x01:  # critical BOOLEAN
                            vtag, vstart, vend = _tlv(der, vend)
                        if vtag != 0x04:  # extnValue OCTET STRING
                            return False
                        stag, sstart, send = _tlv(der, vstart)  # BasicConstraints SEQUENCE
                        if stag != 0x30 or sstart == send:
                            return False  # cA DEFAULT FALSE
                        btag, bstart, bend = _tlv(der, sstart)
                        return btag == 0x01 and bend == bstart + 1 and der[bstart] != 0
                    ext_pos = ext_end
                return False
            pos = end
    except (ValueError, IndexError):
        return False
    return False
