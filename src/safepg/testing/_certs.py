"""Throwaway certificate authorities and certificates for tests.

Made with ``cryptography`` (the ``safepg-tls[testing]`` extra). Keys are EC P-256: quick to make and
accepted by every PostgreSQL and libpq version safepg supports.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as ex:  # pragma: no cover - depends on the install
    raise ImportError(
        "safepg.testing needs the 'cryptography' package: pip install 'safepg-tls[testing]'"
    ) from ex

__all__ = ["CertificateAuthority", "IssuedCertificate"]

_ONE_DAY = dt.timedelta(days=1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> Path:
    p = Path(path)
    # Create with the final mode straight away: a private key is never readable by others.
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(p, mode)
    return p


@dataclass(frozen=True)
class IssuedCertificate:
    """A leaf certificate, its private key and the intermediates between it and the root."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        """The leaf followed by its intermediates, as a server presents them."""
        return self.cert_pem + b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self.chain
        )

    def key_pem(self, password: str | None = None) -> bytes:
        return _key_pem(self.key, password)

    def write(
        self,
        cert_path: str | os.PathLike[str],
        key_path: str | os.PathLike[str],
        *,
        password: str | None = None,
    ) -> tuple[Path, Path]:
        """Write the chain and the key (mode 0600, encrypted when *password* is given)."""
        return _write(cert_path, self.chain_pem), _write(
            key_path, self.key_pem(password), mode=0o600
        )


class CertificateAuthority:
    """A certificate authority made for one test run.

    Args:
        name: the CA's common name.
        parent: issue this CA from *parent*, making it an intermediate.
        not_before, not_after: the validity period (default: from yesterday, for ten years),
            to test expired and expiring CAs.
    """

    def __init__(
        self,
        name: str = "safepg throwaway test CA",
        *,
        parent: CertificateAuthority | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> None:
        self.name = name
        self.parent = parent
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name = parent.cert.subject if parent else subject
        signing_key = parent.key if parent else self.key
        now = _now()
        if not_before is None:
            not_before = now - _ONE_DAY
            if not_after is not None and not_after <= not_before:  # an expired CA
                not_before = not_after - dt.timedelta(days=365)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after or now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
        )
        if parent:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
                critical=False,
            )
        self.cert: x509.Certificate = builder.sign(signing_key, hashes.SHA256())

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_cert(self, path: str | os.PathLike[str]) -> Path:
        """Write this CA's certificate as a PEM trust file."""
        return _write(path, self.cert_pem)

    def intermediate(self, name: str = "safepg throwaway intermediate CA") -> CertificateAuthority:
        """Make a CA signed by this one."""
        return CertificateAuthority(name, parent=self)

    def _chain(self) -> tuple[x509.Certificate, ...]:
        # The intermediates a leaf of this CA needs, nearest first; the root is left out.
        out: list[x509.Certificate] = []
        ca: CertificateAuthority | None = self
        while ca is not None and ca.parent is not None:
            out.append(ca.cert)
            ca = ca.parent
        return tuple(out)

    def issue(
        self,
        *dns_names: str,
        ip_addresses: Iterable[str] = (),
        common_name: str | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        client: bool = False,
    ) -> IssuedCertificate:
        """Issue a leaf certificate.

        Args:
            dns_names: dNSName subjectAltNames (wildcards allowed).
            ip_addresses: iPAddress subjectAltNames.
            common_name: the subject CN; none when not given.
            not_before: defaults to a day ago, or 30 days before *not_after* if that is earlier.
            not_after: defaults to a year from now; pass a past time for an expired certificate.
            client: issue a client certificate (for ``sslcert``/``sslkey``) instead of a server one.

        With no names and no common name, the certificate names nothing at all.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = not_after or now + dt.timedelta(days=365)
        not_before = not_before or min(now - _ONE_DAY, not_after - dt.timedelta(days=30))
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        if sans:
            # RFC 5280: with an empty subject, the subjectAltName extension must be critical.
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not attrs)
        cert = builder.sign(self.key, hashes.SHA256())
        return IssuedCertificate(cert, key, self._chain())
