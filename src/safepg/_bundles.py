"""Checking CA bundles before they are trusted: shipped data, refreshes and local overrides.

A bundle passes when it holds at least one certificate, every block parses, every certificate is
a CA (basicConstraints CA=TRUE), none is expired or not yet valid, and every signature verifies:
a self-issued certificate against its own key, any other against an issuer in the same file.
These checks need ``cryptography`` (``pip install safepg[bundles]``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from cryptography import x509

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class BundleError(ConfigurationError):
    """A CA bundle failed its checks; the message lists every problem."""


@dataclass(frozen=True)
class CheckedCert:
    sha256: str
    subject: str
    issuer: str
    not_after: dt.datetime
    self_signed: bool


def _load(pem: bytes) -> list[x509.Certificate]:
    try:
        from cryptography import x509
    except ImportError:
        raise ConfigurationError(
            "checking a CA bundle needs the cryptography package: pip install 'safepg[bundles]'"
        ) from None
    certs = []
    for i, block in enumerate(_PEM_BLOCK.findall(pem), 1):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as ex:
            raise BundleError(f"certificate #{i} does not parse: {ex}") from None
    return certs


def _verify(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """The signature on *cert* verifies with *issuer*'s key.

    Done by hand: cryptography's verify_directly_issued_by refuses SHA-1, and old roots that
    are still in use (DigiCert Global Root CA) are self-signed with it. A root's self-signature
    proves only that the file is intact; the trust in it comes from the provenance record.
    """
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

    key = issuer.public_key()
    algorithm = cert.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False  # RSA-PSS and other schemes no CA bundle here uses
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return cert.issuer == issuer.subject


def check_bundle(pem: bytes, *, now: dt.datetime | None = None) -> list[CheckedCert]:
    """Check a PEM bundle as the module docstring says; return its certificates.

    Raises:
        BundleError: naming every certificate that fails, and why.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = now or dt.datetime.now(dt.timezone.utc)
    certs = _load(pem)
    if not certs:
        raise BundleError("the file holds no PEM certificate")
    by_subject: dict[bytes, list[x509.Certificate]] = {}
    for cert in certs:
        by_subject.setdefault(cert.subject.public_bytes(), []).append(cert)
    problems: list[str] = []
    checked: dict[str, CheckedCert] = {}
    for cert in certs:
        name = cert.subject.rfc4514_string() or "(empty subject)"
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            problems.append(f"{name} is not a CA certificate")
        if cert.not_valid_after_utc <= now:
            problems.append(f"{name} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        if cert.not_valid_before_utc > now:
            problems.append(f"{name} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
        self_signed = cert.issuer == cert.subject
        issuers = [cert] if self_signed else by_subject.get(cert.issuer.public_bytes(), [])
        if not issuers:
            problems.append(f"{name}: its issuer {cert.issuer.rfc4514_string()} is not in the file")
        elif not any(_verify(cert, issuer) for issuer in issuers):
            problems.append(f"{name}: the signature does not verify")
        fingerprint = cert.fingerprint(hashes.SHA256()).hex().upper()
        checked[fingerprint] = CheckedCert(
            fingerprint,
            name,
            cert.issuer.rfc4514_string(),
            cert.not_valid_after_utc,
            self_signed,
        )
    if problems:
        raise BundleError("the CA bundle fails its checks:\n- " + "\n- ".join(problems))
    return list(checked.values())


# path -> (inode, size, mtime) of an override that passed.
_passed: dict[str, tuple[int, int, int]] = {}


def _check_private(path: str) -> None:
    """An override replaces trust anchors: only this user may have written it or its folder."""
    if os.name != "posix":  # pragma: no cover
        return
    for where in (path, os.path.dirname(os.path.abspath(path))):
        st = os.stat(where)
        if st.st_uid not in (os.geteuid(), 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigurationError(
                f"the CA bundle override {path} cannot be used: {where} can be written by "
                f"other users (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}), who "
                "could swap in their own CA. Make it private (chmod go-w) or remove it."
            )


def checked_override(path: str) -> str:
    """*path*, if the override bundle there passes `check_bundle`.

    Raises:
        ConfigurationError: it fails, naming the file and the way back to the shipped data.
    """
    st = os.stat(path)
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    if _passed.get(path) == key:
        return path
    _check_private(path)
    with open(path, "rb") as f:
        pem = f.read()
    try:
        check_bundle(pem)
    except ConfigurationError as ex:
        raise ConfigurationError(
            f"the CA bundle override {path} cannot be used: {ex}\nFix or remove it to use the "
            "data shipped with safepg (digest "
            f"{hashlib.sha256(pem).hexdigest()[:16]}...)."
        ) from None
    _passed[path] = key
    return path
