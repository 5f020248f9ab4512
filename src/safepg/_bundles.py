"""Checking CA bundles before they are trusted: shipped data, refreshes and local overrides.

A bundle passes when it holds at least one certificate, every block parses, every certificate is
a CA (basicConstraints CA=TRUE), none is expired or not yet valid, and every signature verifies:
a self-issued certificate against its own key, any other against an issuer in the same file.
These checks need ``cryptography`` (``pip install 'safepg-tls[bundles]'``).

The file is read as OpenSSL reads it (`safepg._x509.read_pem`): CERTIFICATE and X509 CERTIFICATE
blocks are certificates to check; any other block OpenSSL would load or skip (TRUSTED
CERTIFICATE, X509 CRL, keys, anything) is refused, naming it. Then OpenSSL itself loads the file,
as libpq would, and must load exactly the certificates that were checked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import _x509
from ._errors import ConfigurationError

if TYPE_CHECKING:
    from cryptography import x509


class BundleError(ConfigurationError):
    """A CA bundle failed its checks; the message lists every problem."""


@dataclass(frozen=True)
class CheckedCert:
    sha256: str
    subject: str
    issuer: str
    not_after: dt.datetime
    self_signed: bool
    der: bytes = field(repr=False)


def _refused(block: _x509.PemBlock) -> str | None:
    """Why *block* has no place in a CA bundle, or None for a certificate block."""
    if block.label == _x509.TRUSTED_LABEL:
        return (
            "OpenSSL trusts the certificate in a TRUSTED CERTIFICATE block with trust settings "
            "that safepg does not check; a CA bundle holds plain certificates (BEGIN CERTIFICATE)"
        )
    if block.label == "X509 CRL":
        return "a certificate revocation list, which OpenSSL loads into the trust store"
    if "PRIVATE KEY" in block.label:
        return "a private key, which has no place in a CA bundle"
    if block.label not in _x509.CERTIFICATE_LABELS:
        return "not a certificate (OpenSSL skips it, but a CA bundle holds nothing else)"
    if block.headers:
        return (
            "RFC 1421 headers (Proc-Type, DEK-Info, ...), which OpenSSL refuses or decrypts "
            "with an empty password"
        )
    return None


def _load(pem: bytes) -> list[tuple[_x509.PemBlock, x509.Certificate]]:
    """The certificates of *pem*, read as OpenSSL reads it. Raises BundleError naming every
    block that is not a certificate OpenSSL would load as one, or does not parse."""
    from cryptography import x509  # check_bundle imported it, or said what to install

    try:
        blocks = _x509.read_pem(pem)
    except _x509.PemError as ex:
        raise BundleError(f"the file is not PEM that safepg reads as OpenSSL does: {ex}") from None
    certs = []
    problems = []
    for block in blocks:
        why = _refused(block)
        if why:
            problems.append(f"{block}: {why}")
            continue
        try:
            certs.append((block, x509.load_der_x509_certificate(block.data)))
        except ValueError as ex:
            problems.append(f"{block} does not parse: {ex}")
    if problems:
        raise BundleError("the CA bundle holds blocks safepg refuses:\n- " + "\n- ".join(problems))
    return certs


def _openssl_disagrees(pem: bytes, checked: Mapping[str, CheckedCert]) -> list[str]:
    """How what OpenSSL loads from *pem*, as libpq loads ``sslrootcert``, differs from the
    certificates safepg checked (by upper-case SHA-256 fingerprint): the backstop for any
    block OpenSSL finds and `_x509.read_pem` does not, or the other way around."""
    import tempfile

    from . import _stdssl

    # A file, not cadata=: libpq's loader (PEM_X509_INFO_read_bio) also takes TRUSTED
    # CERTIFICATE and CRL blocks, which the cadata= loader skips, and never asks for a pass
    # phrase on an encrypted block, which the cadata= loader may do on the terminal.
    try:
        fd, name = tempfile.mkstemp(prefix="safepg-bundle-", suffix=".pem")
    except OSError as ex:
        return [f"cannot write a temporary file for OpenSSL to load: {ex}"]
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        context = _stdssl.client_context()
        context.load_verify_locations(cafile=name)
        loaded = {
            hashlib.sha256(der).hexdigest().upper()
            for der in context.get_ca_certs(binary_form=True)
        }
        stats = context.cert_store_stats()
    except OSError as ex:  # ssl.SSLError among them
        return [f"OpenSSL cannot load the file: {ex}"]
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
    problems = [
        f"OpenSSL loads a certificate safepg did not check: SHA-256 {fp}"
        for fp in sorted(loaded - set(checked))
    ]
    problems += [
        f"OpenSSL does not load {checked[fp].subject} as a CA certificate (SHA-256 {fp})"
        for fp in sorted(set(checked) - loaded)
    ]
    if stats["x509"] != stats["x509_ca"]:
        problems.append(
            f"OpenSSL loads {stats['x509'] - stats['x509_ca']} certificate(s) that are not CAs "
            "and that safepg did not check"
        )
    if stats["crl"]:
        problems.append("OpenSSL loads a certificate revocation list from the file")
    return problems


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
            return False  # DSA and other schemes no CA bundle here uses (RSA-PSS fails above)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return cert.issuer == issuer.subject


def check_bundle(pem: bytes, *, now: dt.datetime | None = None) -> list[CheckedCert]:
    """Check a PEM bundle as the module docstring says; return its certificates.

    Raises:
        BundleError: naming every certificate that fails, and why.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
    except ImportError:
        raise ConfigurationError(
            "checking a CA bundle needs the cryptography package: pip install 'safepg-tls[bundles]'"
        ) from None
    now = now or dt.datetime.now(dt.timezone.utc)
    loaded = _load(pem)
    if not loaded:
        raise BundleError("the file holds no PEM certificate")
    by_subject: dict[bytes, list[x509.Certificate]] = {}
    for _block, cert in loaded:
        by_subject.setdefault(cert.subject.public_bytes(), []).append(cert)
    problems: list[str] = []
    checked: dict[str, CheckedCert] = {}
    for block, cert in loaded:
        name = cert.subject.rfc4514_string() or "(empty subject)"
        found = []
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            found.append(f"{name} is not a CA certificate")
        if cert.not_valid_after_utc <= now:
            found.append(f"{name} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        if cert.not_valid_before_utc > now:
            found.append(f"{name} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
        self_signed = cert.issuer == cert.subject
        issuers = [cert] if self_signed else by_subject.get(cert.issuer.public_bytes(), [])
        if not issuers:
            found.append(f"{name}: its issuer {cert.issuer.rfc4514_string()} is not in the file")
        elif not any(_verify(cert, issuer) for issuer in issuers):
            found.append(f"{name}: the signature does not verify")
        problems += [f"{block}: {problem}" for problem in found]
        fingerprint = cert.fingerprint(hashes.SHA256()).hex().upper()
        checked[fingerprint] = CheckedCert(
            fingerprint,
            name,
            cert.issuer.rfc4514_string(),
            cert.not_valid_after_utc,
            self_signed,
            cert.public_bytes(serialization.Encoding.DER),
        )
    if not problems:
        problems = _openssl_disagrees(pem, checked)
    if problems:
        raise BundleError("the CA bundle fails its checks:\n- " + "\n- ".join(problems))
    return list(checked.values())


def known_issuers(filename: str) -> frozenset[str]:
    """The certificates (upper-case SHA-256 fingerprints) safepg knows as issuers of the
    provider whose shipped file is *filename*: every certificate of that provider's shipped
    files, and every one ``cacerts/inventory.json`` records for them (and for the provider's
    files inventoried but not shipped, such as the RDS GovCloud intermediates).

    Raises:
        ValueError: *filename* is not a shipped CA file.
    """
    import importlib.resources
    import json

    from . import providers

    bundle = next((b for b in providers.BUNDLES if filename in b.files), None)
    if bundle is None:
        raise ValueError(f"{filename!r} is not a CA file shipped with safepg")
    shipped = {name for b in providers.BUNDLES for name in b.files}
    inventory = json.loads(
        (importlib.resources.files("safepg") / "cacerts" / "inventory.json").read_text("utf-8")
    )

    def owner(name: str) -> providers.Bundle | None:
        """The bundle a file is one of, or, for a file inventoried but not shipped, the bundle
        with the longest key it starts with (rds-govcloud-bundle.pem: RDS GovCloud's)."""
        if name in shipped:
            return next(b for b in providers.BUNDLES if name in b.files)
        keys = [b for b in providers.BUNDLES if name.startswith(f"{b.key}-")]
        return max(keys, key=lambda b: len(b.key), default=None)

    known: set[str] = set()
    for name, record in inventory.items():
        if owner(name) is bundle:
            known.update(str(cert["sha256"]).upper() for cert in record["certs"])
    for name in bundle.files:
        with open(providers.shipped_path(name), "rb") as f:
            blocks = _x509.read_pem(f.read())
        known.update(
            _x509.certificate(b).sha256.upper()
            for b in blocks
            if b.label in _x509.CERTIFICATE_LABELS
        )
    return frozenset(known)


def canonical_pem(certs: list[CheckedCert]) -> bytes:
    """*certs* as the file `safepg bundles install` writes: canonical PEM (`_x509.pem_encode`),
    each certificate once, in the order of the file they were checked from."""
    return b"".join(_x509.pem_encode(c.der) for c in certs)


# path -> (inode, size, mtime) of an override that passed.
_passed: dict[str, tuple[int, int, int]] = {}


def _check_private(path: str) -> None:
    """An override replaces trust anchors: only this user (or root) may have written it, its
    folder, or any folder above (see `_cache.chain_problem`). *path* is resolved."""
    if os.name != "posix":  # pragma: no cover
        return
    from . import _cache

    st = os.lstat(path)
    problem = _cache.chain_problem(os.path.dirname(path), root_may_own=True)
    if problem is None and (
        not stat.S_ISREG(st.st_mode)
        or st.st_uid not in (os.geteuid(), 0)
        or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        problem = (
            f"{path} can be written by other users (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o}), who could swap in their own CA"
        )
    if problem is not None:
        raise ConfigurationError(
            f"the CA bundle override {path} cannot be used: {problem}. Make it and the "
            "directories above it private (chmod go-w), or remove it."
        )


def checked_override(path: str) -> str:
    """*path*, if the override bundle there passes `check_bundle` and is exactly the file
    ``safepg bundles install`` writes from its certificates (`canonical_pem`): then libpq,
    which gets it as ``sslrootcert``, reads nothing safepg did not check.

    Raises:
        ConfigurationError: it fails, naming the file and the way back to the shipped data.
    """
    # The resolved path is checked and returned: a symbolic link could be changed later.
    path = os.path.realpath(path)
    _check_private(path)  # on every use, as cheaply as lstat allows
    st = os.stat(path)
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    if _passed.get(path) == key:
        return path
    with open(path, "rb") as f:
        pem = f.read()
    try:
        certs = check_bundle(pem)
        if pem != canonical_pem(certs):
            name = os.path.basename(path)
            raise BundleError(
                "it is not in the form safepg writes (canonical PEM: only BEGIN CERTIFICATE "
                "blocks, each once, nothing between them), so libpq could read more than was "
                f"checked. Install it with: safepg bundles install FILE --replace {name}"
            )
    except ConfigurationError as ex:
        raise ConfigurationError(
            f"the CA bundle override {path} cannot be used: {ex}\nFix or remove it to use the "
            "data shipped with safepg (digest "
            f"{hashlib.sha256(pem).hexdigest()[:16]}...)."
        ) from None
    _passed[path] = key
    return path
