"""``safepg bundles install … --replace``: a provider's file cannot quietly gain a root.

A certificate the new file adds that is not among the provider's known issuers (its shipped
files, ``cacerts/inventory.json``) is refused, listed with its subject (escaped) and SHA-256
fingerprint, unless the operator names each one with ``--allow-new-root``. Real certificates,
generated per run.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import pytest

from safepg import _bundles, providers
from safepg._cli import main
from safepg.testing import CertificateAuthority

from .cli_json import run_json

AZURE_FILE = "azure-postgres-roots.pem"
SHIPPED_AZURE = Path(providers.shipped_path(AZURE_FILE)).read_bytes()


def fingerprint(ca: CertificateAuthority) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(ca.cert_pem.decode())).hexdigest().upper()


@pytest.fixture
def overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "bundles"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("SAFEPG_BUNDLE_DIR", str(directory))
    return directory


@pytest.fixture(scope="module")
def new_root() -> CertificateAuthority:
    return CertificateAuthority("unknown root\x1b[2J CA")  # a control character, to escape


def test_an_added_root_is_refused_unless_named(
    new_root: CertificateAuthority,
    tmp_path: Path,
    overrides: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    newer = tmp_path / "newer.pem"
    newer.write_bytes(SHIPPED_AZURE + new_root.cert_pem)
    install = ["bundles", "install", str(newer), "--replace", AZURE_FILE]
    assert main(install) == 3
    err = capsys.readouterr().err
    assert fingerprint(new_root) in err
    assert "CN=unknown root\\x1b[2J CA" in err  # escaped, never the raw control character
    assert "\x1b" not in err
    assert f"--allow-new-root {fingerprint(new_root)}" in err
    assert not (overrides / AZURE_FILE).exists()
    # The same in JSON, validated against the schema; the added certificate is marked unknown.
    code, data = run_json(capsys, *install)
    assert (code, data["error"]["class"], data["installed_as"]) == (3, "BundleError", None)
    assert data["added"] == [
        {"sha256": fingerprint(new_root), "subject": data["added"][0]["subject"], "known": False}
    ]
    assert not (overrides / AZURE_FILE).exists()
    # Named by its fingerprint (any case, colons allowed): installed.
    spelled = ":".join(fingerprint(new_root).lower()[i : i + 2] for i in range(0, 64, 2))
    code, data = run_json(capsys, *install, "--allow-new-root", spelled)
    assert code == 0
    assert data["installed_as"] == str(overrides / AZURE_FILE)
    assert _bundles.checked_override(str(overrides / AZURE_FILE))


def test_each_added_root_must_be_named(
    new_root: CertificateAuthority,
    tmp_path: Path,
    overrides: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = CertificateAuthority("another unknown root")
    newer = tmp_path / "newer.pem"
    newer.write_bytes(SHIPPED_AZURE + new_root.cert_pem + other.cert_pem)
    install = ["bundles", "install", str(newer), "--replace", AZURE_FILE]
    assert main([*install, "--allow-new-root", fingerprint(new_root)]) == 3
    err = capsys.readouterr().err
    assert fingerprint(other) in err
    assert fingerprint(new_root) not in err  # named: not listed as refused
    assert not (overrides / AZURE_FILE).exists()
    allow = ["--allow-new-root", fingerprint(new_root), "--allow-new-root", fingerprint(other)]
    assert main([*install, *allow]) == 0


def test_an_allowance_that_names_nothing_added_is_refused(
    new_root: CertificateAuthority,
    tmp_path: Path,
    overrides: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    newer = tmp_path / "newer.pem"
    newer.write_bytes(SHIPPED_AZURE)
    install = ["bundles", "install", str(newer), "--replace", AZURE_FILE]
    assert main([*install, "--allow-new-root", fingerprint(new_root)]) == 2
    assert "names no certificate" in capsys.readouterr().err
    assert not (overrides / AZURE_FILE).exists()
    with pytest.raises(SystemExit):
        main([*install, "--allow-new-root", "not-a-fingerprint"])


def test_a_known_issuer_of_the_same_provider_needs_no_allowance(
    tmp_path: Path, overrides: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Supabase ships two roots in two files: either may appear in the other's newer copy.
    old = Path(providers.shipped_path("supabase-root-2021.pem")).read_bytes()
    new = Path(providers.shipped_path("supabase-prod-ca-2025.pem")).read_bytes()
    newer = tmp_path / "newer.pem"
    newer.write_bytes(old + new)
    code, data = run_json(
        capsys, "bundles", "install", str(newer), "--replace", "supabase-root-2021.pem"
    )
    assert code == 0
    assert [a["known"] for a in data["added"]] == [True]
    assert (overrides / "supabase-root-2021.pem").exists()
    # Not across providers: Azure's roots are no Amazon RDS issuers.
    assert _bundles.known_issuers("rds-global-bundle.pem").isdisjoint(
        _bundles.known_issuers(AZURE_FILE)
    )
