"""The CA files safepg ships match their provenance record, and are fit to ship."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.resources
import json
import re
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from safepg import _bundles, providers

CACERTS = importlib.resources.files("safepg") / "cacerts"
SHIPPED = sorted(p.name for p in CACERTS.iterdir() if p.name.endswith(".pem"))
PROVENANCE = (CACERTS / "PROVENANCE.md").read_text()
INVENTORY = json.loads((CACERTS / "inventory.json").read_text())
# A shipped certificate must stay valid for this long, so that a release carries fresh data.
MIN_REMAINING = dt.timedelta(days=180)


def _certs(name: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((CACERTS / name).read_bytes())


def test_every_bundle_the_code_names_is_shipped() -> None:
    for bundle in providers.BUNDLES:
        assert set(bundle.files) <= set(SHIPPED)
    for profile in providers.PROFILES:
        assert (profile.trust == "bundled") == (profile.bundle is not None)


@pytest.mark.parametrize("name", SHIPPED)
def test_file_digest_matches_provenance(name: str) -> None:
    digest = hashlib.sha256((CACERTS / name).read_bytes()).hexdigest()
    row = re.search(rf"^\| `{re.escape(name)}` \| (\d+) \| `([0-9a-f]{{64}})` \|", PROVENANCE, re.M)
    assert row, f"{name} has no row in PROVENANCE.md"
    assert row[2] == digest
    assert INVENTORY[name]["file_sha256"] == digest
    assert int(row[1]) == INVENTORY[name]["count"] == len(_certs(name))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_certificate_is_recorded(name: str) -> None:
    recorded = {c["sha256"].upper() for c in INVENTORY[name]["certs"]}
    for cert in _certs(name):
        fingerprint = cert.fingerprint(hashes.SHA256()).hex().upper()
        assert fingerprint in recorded
        assert fingerprint in PROVENANCE


@pytest.mark.parametrize("name", SHIPPED)
def test_certificates_are_unexpired_cas(name: str) -> None:
    soon = dt.datetime.now(dt.timezone.utc) + MIN_REMAINING
    for cert in _certs(name):
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca, cert.subject.rfc4514_string()
        assert cert.not_valid_after_utc > soon, (
            f"{cert.subject.rfc4514_string()} in {name} expires {cert.not_valid_after_utc:%Y-%m-%d}"
        )


@pytest.mark.parametrize("name", SHIPPED)
def test_bundle_loads_in_openssl(name: str) -> None:
    ctx = ssl.create_default_context(cafile=providers.shipped_path(name))
    assert len(ctx.get_ca_certs()) == INVENTORY[name]["count"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_is_canonical(name: str) -> None:
    """Shipped data passes the checks every override passes (including OpenSSL loading exactly
    the certificates checked), in the very form `safepg bundles install` writes."""
    data = (CACERTS / name).read_bytes()
    assert _bundles.canonical_pem(_bundles.check_bundle(data)) == data
