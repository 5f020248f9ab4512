"""`_bundles.check_bundle` and the override file checks, one decision at a time.

A provider's bundle (shipped, or an override installed with ``safepg bundles install``)
replaces trust anchors, so every check that keeps a certificate out has a case here that fails
when the check is removed or inverted: not a CA, expired (to the second), not yet valid, an
issuer missing from the file, a signature that does not verify (tampered, or a scheme safepg
does not check), blocks that are not certificates, and override files that another user could
have written. The certificates are made per run.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, padding, rsa
from cryptography.x509.oid import NameOID

from safepg import ConfigurationError, _bundles
from safepg.testing import CertificateAuthority

from .test_guarantees import NOBODY, as_user, needs_root, world

__all__ = ["world"]  # fixture, shared

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def pem_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def self_signed(
    name: str,
    *,
    ca: bool | None = True,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | dsa.DSAPrivateKey | None = None,
    pss: bool = False,
) -> x509.Certificate:
    """A self-signed certificate: *ca* None leaves out BasicConstraints; *pss* signs with
    RSA-PSS (a scheme no CA bundle here uses, which safepg does not check)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if pss:
        assert isinstance(key, rsa.RSAPrivateKey)
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return builder.sign(key, hashes.SHA256(), rsa_padding=pad)
    return builder.sign(key, hashes.SHA256())


def refused(pem: bytes, now: dt.datetime | None = None) -> str:
    with pytest.raises(_bundles.BundleError) as info:
        _bundles.check_bundle(pem, now=now)
    return str(info.value)


def test_a_plain_ca_passes() -> None:
    ca = CertificateAuthority("plain root")
    [checked] = _bundles.check_bundle(ca.cert_pem)
    assert checked.subject == "CN=plain root"
    assert checked.self_signed


def test_a_leaf_is_not_a_ca() -> None:
    assert "is not a CA certificate" in refused(pem_of(self_signed("leaf", ca=False)))


def test_a_certificate_without_basic_constraints_is_not_a_ca() -> None:
    assert "is not a CA certificate" in refused(pem_of(self_signed("no constraints", ca=None)))


def test_expiry_is_checked_to_the_second() -> None:
    ca = CertificateAuthority("expiring root")
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    end = cert.not_valid_after_utc
    assert "expired on" in refused(ca.cert_pem, now=end)  # not valid at its last instant
    _bundles.check_bundle(ca.cert_pem, now=end - dt.timedelta(seconds=1))


def test_a_certificate_not_yet_valid_is_refused() -> None:
    ca = CertificateAuthority("future root", not_before=NOW + dt.timedelta(days=1))
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    start = cert.not_valid_before_utc
    assert "is not valid before" in refused(ca.cert_pem, now=start - dt.timedelta(seconds=1))
    _bundles.check_bundle(ca.cert_pem, now=start)  # valid from its first instant


def test_an_intermediate_is_checked_against_its_issuer_in_the_file() -> None:
    root = CertificateAuthority("bundle root")
    intermediate = CertificateAuthority("bundle intermediate", parent=root)
    checked = _bundles.check_bundle(intermediate.cert_pem + root.cert_pem)
    assert [(c.subject, c.self_signed) for c in checked] == [
        ("CN=bundle intermediate", False),
        ("CN=bundle root", True),
    ]
    assert "is not in the file" in refused(intermediate.cert_pem)  # its issuer left out
    impostor = CertificateAuthority("bundle root")  # same name, another key
    assert "the signature does not verify" in refused(intermediate.cert_pem + impostor.cert_pem)


def test_a_tampered_signature_is_refused() -> None:
    der = bytearray(
        x509.load_pem_x509_certificate(CertificateAuthority("t").cert_pem).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-3] ^= 0x01  # inside the signature's last integer: the certificate still parses
    cert = x509.load_der_x509_certificate(bytes(der))
    assert "the signature does not verify" in refused(pem_of(cert))


def test_an_rsa_pss_signature_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "the signature does not verify" in refused(pem_of(self_signed("pss", key=key, pss=True)))


def test_every_block_that_is_not_a_certificate_is_named() -> None:
    ca = CertificateAuthority("with extras")
    key = ca.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    crl = b"-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n"
    said = refused(ca.cert_pem + key + crl)
    assert "a private key" in said
    assert "a certificate revocation list" in said


def test_text_that_is_not_pem_is_refused() -> None:
    said = refused(b"-----BEGIN CERTIFICATE-----\nMIIB\n")  # no END line
    assert "not PEM that safepg reads as OpenSSL does" in said


def test_checking_needs_the_cryptography_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import cryptography fails
    with pytest.raises(ConfigurationError, match=r"pip install 'safepg-tls\[bundles\]'"):
        _bundles.check_bundle(CertificateAuthority("any").cert_pem)


def test_no_temporary_file_for_openssl_is_a_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    said = refused(CertificateAuthority("any").cert_pem)
    assert "cannot write a temporary file for OpenSSL to load" in said


# -- override files: nobody else may have written them -----------------------------------------


@needs_root
def test_an_override_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rds-global-bundle.pem"
    path.write_bytes(CertificateAuthority("override").cert_pem)
    path.chmod(0o644)
    os.chown(path, NOBODY, NOBODY)  # not writable by group or others, but not ours
    with pytest.raises(ConfigurationError, match=f"owner uid {NOBODY}"):
        _bundles.checked_override(str(path))


def test_a_group_writable_override_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rds-global-bundle.pem"
    path.write_bytes(CertificateAuthority("override").cert_pem)
    path.chmod(0o664)
    with pytest.raises(ConfigurationError, match="can be written by other users"):
        _bundles.checked_override(str(path))


@needs_root
def test_another_user_may_use_an_override_root_installed(world: Path) -> None:
    """Root's folder and file, read by ``nobody``: an administrator's install is trusted."""
    folder = world / "bundles"
    folder.mkdir(mode=0o755)
    path = folder / "rds-global-bundle.pem"
    path.write_bytes(CertificateAuthority("override").cert_pem)
    path.chmod(0o644)

    def use() -> str:
        return _bundles.checked_override(str(path))

    assert as_user(NOBODY, use) == str(path)


def test_a_signature_scheme_without_a_check_is_refused() -> None:
    """A DSA root: safepg verifies RSA (PKCS#1 v1.5), ECDSA and EdDSA signatures only."""
    cert = self_signed("dsa root", key=dsa.generate_private_key(key_size=2048))
    assert "the signature does not verify" in refused(pem_of(cert))


def test_a_providers_known_issuers_include_what_it_records_but_does_not_ship() -> None:
    """RDS GovCloud's intermediates are recorded (cacerts/inventory.json), not shipped: a newer
    GovCloud file that holds them adds no unknown root. They are no other provider's."""
    import importlib.resources
    import json

    inventory = json.loads(
        (importlib.resources.files("safepg") / "cacerts" / "inventory.json").read_text("utf-8")
    )
    recorded = {str(c["sha256"]).upper() for c in inventory["rds-govcloud-bundle.pem"]["certs"]}
    assert recorded <= _bundles.known_issuers("rds-govcloud-roots.pem")
    assert recorded.isdisjoint(_bundles.known_issuers("rds-global-bundle.pem"))
