"""Provider profiles, their error hints, the verify_as alias option, bundle overrides, the refresh
script's checks and expiry warnings."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import logging
import ssl
import sys
from pathlib import Path
from types import ModuleType

import certifi
import psycopg
import pytest

import safepg
from safepg import (
    ConfigurationError,
    HostnameMismatchError,
    UntrustedCertificateError,
    _bundles,
    providers,
)
from safepg._cli import main
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop

NOW = dt.datetime.now(dt.timezone.utc)
RDS_HOST = "mydb.abc123xyz.us-east-1.rds.amazonaws.com"


# -- profile selection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "key"),
    [
        (RDS_HOST, "rds"),
        ("cluster-ro-1.cluster-ro-abc.eu-west-1.rds.amazonaws.com", "rds"),
        ("MYDB.ABC.EU-WEST-1.RDS.AMAZONAWS.COM.", "rds"),
        ("mydb.abc.us-gov-west-1.rds.amazonaws.com", "rds-govcloud"),
        ("mydb.abc.us-gov-east-1.rds.amazonaws.com", "rds-govcloud"),
        ("myproxy.proxy-abc123.us-east-1.rds.amazonaws.com", "rds-proxy"),
        ("myproxy.proxy-abc.us-gov-west-1.rds.amazonaws.com", "rds-proxy"),
        ("ro.endpoint.proxy-c9akciq32abc.us-east-1.rds.amazonaws.com", "rds-proxy"),
        # Security review item 10: an instance *named* proxy-... is an ordinary RDS instance.
        ("proxy-orders.c9akciq32abc.us-east-1.rds.amazonaws.com", "rds"),
        ("proxy-orders.cluster-c9akciq32abc.us-east-1.rds.amazonaws.com", "rds"),
        ("a.b.proxy-c9akciq32abc.us-east-1.rds.amazonaws.com", "rds"),
        ("proxy-x.proxy-c9akciq32abc.us-gov-west-1.rds.amazonaws.com", "rds-proxy"),
        ("mydb.abc.rds.cn-north-1.amazonaws.com.cn", "rds-china"),
        ("mydb.postgres.database.azure.com", "azure"),
        ("mydb.postgres.database.chinacloudapi.cn", "azure"),
        ("db.abcdefghij.supabase.co", "supabase"),
        ("aws-0-eu-central-1.pooler.supabase.com", "supabase"),
        ("ep-cool-name-123.eu-central-1.aws.neon.tech", "neon"),
        ("abc123.us-central1.sql.goog", "cloud-sql"),
        ("db-postgresql-nyc1-123-do-user-1-0.b.db.ondigitalocean.com", "digitalocean"),
        ("pg-abc-project.aivencloud.com", "aiven"),
        ("p.abc123.db.postgresbridge.com", "crunchy-bridge"),
    ],
)
def test_profile_selection(host: str, key: str) -> None:
    profile = providers.profile_for_host(host)
    assert profile is not None
    assert profile.key == key


@pytest.mark.parametrize(
    "host",
    [
        "rds.amazonaws.com.evil.example",
        "x-rds.amazonaws.com",
        "rds.amazonaws.com",
        "evilrds.amazonaws.com",
        "mydb.rds.amazonaws.co",
        "amazonaws.com.cn",
        "postgres.database.azure.com.evil.example",
        "mydb.notpostgres.database.azure.com.example",
        "supabase.co",
        "evilsupabase.co",
        "supabase.co.evil.example",
        "neon.tech.evil.example",
        "sql.goog",
        "db.example.com",
        "localhost",
        "127.0.0.1",
    ],
)
def test_look_alikes_do_not_match(host: str) -> None:
    assert providers.profile_for_host(host) is None
    assert safepg.resolve_trust(host=host).origin in ("os-store", "certifi")


@pytest.mark.parametrize(
    ("host", "label"),
    [
        ("mydb.postgres.database.azure.com", "bundled Azure Database for PostgreSQL roots"),
        ("db.abcdefghij.supabase.co", "bundled Supabase roots"),
        ("mydb.abc.us-gov-west-1.rds.amazonaws.com", "bundled Amazon RDS GovCloud roots"),
    ],
)
def test_bundled_profiles_resolve_to_their_files(host: str, label: str) -> None:
    trust = safepg.resolve_trust(host=host)
    assert trust.label == label
    assert trust.origin == "bundled"
    profile = providers.profile_for_host(host)
    assert profile is not None
    assert profile.bundle is not None
    wanted = set()
    for name in profile.bundle.files:
        wanted |= fingerprints(Path(providers.shipped_path(name)).read_bytes())
    assert fingerprints(Path(trust.path).read_bytes()) == wanted  # Supabase: both files


def fingerprints(pem: bytes) -> set[str]:
    from safepg import _x509

    return {c.sha256 for c in _x509.parse_pem(pem)}


def test_every_profile_has_hints() -> None:
    for profile in providers.PROFILES:
        host = profile.patterns[0].replace("*", "x")
        assert providers.profile_for_host(host) is profile, host
        assert profile.untrusted_hint(host).startswith(profile.name)
        assert "sslrootcert" in profile.untrusted_hint(host) or profile.trust == "os-store"


# -- hints in real errors ----------------------------------------------------------------------


def test_rds_error_names_the_region_bundle(server: PostgresServer, certs: CertificateShop) -> None:
    certs.present(RDS_HOST)
    with pytest.raises(UntrustedCertificateError) as info:
        safepg.connect(server.conninfo(host=RDS_HOST, hostaddr="127.0.0.1", sslrootcert=None))
    message = str(info.value)
    assert "Amazon RDS / Aurora:" in message
    assert "https://truststore.pki.rds.amazonaws.com/us-east-1/us-east-1-bundle.pem" in message
    assert info.value.trust is not None
    assert info.value.trust.label == "bundled Amazon RDS roots"


def test_china_error_says_which_bundle(server: PostgresServer, certs: CertificateShop) -> None:
    host = "mydb.abc.rds.cn-northwest-1.amazonaws.com.cn"
    certs.present(host)
    with pytest.raises(UntrustedCertificateError) as info:
        safepg.connect(server.conninfo(host=host, hostaddr="127.0.0.1", sslrootcert=None))
    assert "cn-northwest-1-bundle.pem" in str(info.value)
    assert "sslrootcert=" in str(info.value)


def test_cloud_sql_legacy_certificate_hint(server: PostgresServer, certs: CertificateShop) -> None:
    # A legacy per-instance certificate: only a "project:instance" common name.
    certs.present(common_name="my-project:my-instance")
    host = "abc123.us-central1.sql.goog"
    with pytest.raises(HostnameMismatchError) as info:
        safepg.connect(server.conninfo(host=host, hostaddr="127.0.0.1"))
    assert "project:instance" in str(info.value)
    assert "GOOGLE_MANAGED_CAS_CA" in str(info.value)


# -- verify_as: dialling an alias --------------------------------------------------------------


def test_verify_as_dials_the_alias(server: PostgresServer, certs: CertificateShop) -> None:
    certs.present("db.alias-target.test")
    # "localhost" stands for an alias (a CNAME) whose certificate names the real endpoint.
    with pytest.raises(HostnameMismatchError, match="verify_as"):
        safepg.connect(server.conninfo(host="localhost"))
    with safepg.connect(server.conninfo(host="localhost"), verify_as="db.alias-target.test") as c:
        report = safepg.check(c)
    assert report.verified
    assert report.host == "db.alias-target.test"
    assert report.hostaddr == "127.0.0.1"
    secure = safepg.secure_conninfo(server.conninfo(host="localhost"), verify_as="db.x.test")
    assert "host=db.x.test" in secure
    assert "hostaddr=" in secure


def test_verify_as_async(server: PostgresServer, certs: CertificateShop) -> None:
    import asyncio

    certs.present("db.alias-target.test")

    async def run() -> str:
        conn = await safepg.connect_async(
            server.conninfo(host="localhost"), verify_as="db.alias-target.test"
        )
        async with conn:
            return (await safepg.check_async(conn)).host

    assert asyncio.run(run()) == "db.alias-target.test"


@pytest.mark.parametrize(
    ("conninfo", "verify_as", "error", "message"),
    [
        ("host=a.example,b.example", "db.test", ConfigurationError, "exactly one TCP host"),
        ("host=a.example hostaddr=10.0.0.1", "db.test", ConfigurationError, "hostaddr"),
        ("host=/tmp", "db.test", ConfigurationError, "exactly one TCP host"),
        ("host=a.example", "", ConfigurationError, "not a host name"),
        ("host=a.example", "a,b", ConfigurationError, "not a host name"),
        ("host=a.example", "/tmp", ConfigurationError, "not a host name"),
        ("host=does-not-exist.invalid", "db.test", psycopg.OperationalError, "resolve"),
    ],
)
def test_verify_as_misuse(
    conninfo: str, verify_as: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        safepg.secure_conninfo(conninfo, verify_as=verify_as)


# -- overrides of the shipped files ------------------------------------------------------------


@pytest.fixture
def rds_through_test_ca(server: PostgresServer, certs: CertificateShop) -> str:
    certs.present(RDS_HOST)
    return server.conninfo(host=RDS_HOST, hostaddr="127.0.0.1", sslrootcert=None)


@pytest.fixture
def overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty bundle override directory, in use (SAFEPG_BUNDLE_DIR)."""
    directory = tmp_path / "bundles"
    directory.mkdir()
    monkeypatch.setenv("SAFEPG_BUNDLE_DIR", str(directory))
    return directory


def test_override_bundle_is_checked_and_used(
    server: PostgresServer,
    rds_through_test_ca: str,
    overrides: Path,
) -> None:
    shipped = Path(providers.shipped_path("rds-global-bundle.pem")).read_bytes()
    (overrides / "rds-global-bundle.pem").write_bytes(shipped + server.ca.cert_pem)
    with safepg.connect(rds_through_test_ca, fast_path=False) as conn:
        trust = safepg.check(conn).trust
    assert trust is not None
    assert trust.label == "bundled Amazon RDS roots (newer copy, checked)"


def test_override_writable_by_others_is_refused(
    server: PostgresServer,
    rds_through_test_ca: str,
    overrides: Path,
) -> None:
    bundle = overrides / "rds-global-bundle.pem"
    bundle.write_bytes(server.ca.cert_pem)
    bundle.chmod(0o666)
    with pytest.raises(ConfigurationError, match="can be written by other users"):
        safepg.connect(rds_through_test_ca)
    bundle.chmod(0o644)
    overrides.chmod(0o777)
    with pytest.raises(ConfigurationError, match="can be written by other users"):
        safepg.connect(rds_through_test_ca)
    # Security review item 1: a directory further up that others can write to (no sticky
    # bit) lets them rename the override's folder and put their own in its place.
    overrides.chmod(0o755)
    overrides.parent.chmod(0o777)
    try:
        with pytest.raises(ConfigurationError, match=f"{overrides.parent} can be written"):
            safepg.connect(rds_through_test_ca)
    finally:
        overrides.parent.chmod(0o755)


@pytest.mark.parametrize("problem", ["expired", "garbage", "not-a-ca"])
def test_bad_override_is_refused(
    server: PostgresServer,
    rds_through_test_ca: str,
    overrides: Path,
    problem: str,
) -> None:
    if problem == "expired":
        pem = CertificateAuthority("old", not_after=NOW - dt.timedelta(days=1)).cert_pem
    elif problem == "garbage":
        pem = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    else:
        pem = server.issue_certificate("leaf.example").cert_pem
    (overrides / "rds-global-bundle.pem").write_bytes(pem)
    with pytest.raises(ConfigurationError, match="override") as info:
        safepg.connect(rds_through_test_ca)
    assert "Fix or remove it" in str(info.value)


def test_bundles_install_command(
    server: PostgresServer,
    rds_through_test_ca: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    newer = tmp_path / "global-bundle.pem"
    shipped = Path(providers.shipped_path("rds-global-bundle.pem")).read_bytes()
    newer.write_bytes(shipped + server.ca.cert_pem)
    fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(server.ca.cert_pem.decode())).hexdigest()
    install = ["bundles", "install", str(newer), "--replace", "rds-global-bundle.pem"]
    assert main([*install, "--allow-new-root", fingerprint]) == 0
    out = capsys.readouterr().out
    assert "+ CN=safepg test root CA" in out
    installed = providers.override_dir() / "rds-global-bundle.pem"
    assert installed.stat().st_mode & 0o777 == 0o600
    with safepg.connect(rds_through_test_ca) as conn:
        assert safepg.check(conn).verified
    bad = tmp_path / "bad.pem"
    bad.write_bytes(CertificateAuthority("old", not_after=NOW - dt.timedelta(days=1)).cert_pem)
    assert main(["bundles", "install", str(bad), "--replace", "rds-global-bundle.pem"]) == 3
    assert "expired on" in capsys.readouterr().err


def test_providers_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["providers", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "safepg.providers/1"
    assert [p["key"] for p in data["profiles"]] == [p.key for p in providers.PROFILES]
    files = {f["file"]: f for f in data["bundle_files"]}
    assert files["rds-global-bundle.pem"]["certificates"] == 102
    assert not files["rds-global-bundle.pem"]["override"]
    assert main(["providers"]) == 0
    assert "Google Cloud SQL" in capsys.readouterr().out


# -- expiry warnings ---------------------------------------------------------------------------


def test_warning_for_an_anchor_in_use_expiring_soon(
    server: PostgresServer,
    certs: CertificateShop,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    short = CertificateAuthority("short-lived CA", not_after=NOW + dt.timedelta(days=45))
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=short)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + short.cert_pem)
    with caplog.at_level(logging.WARNING, logger="safepg"):
        for _ in range(3):
            safepg.connect(server.conninfo(sslrootcert=str(bundle))).close()
    warnings = [r for r in caplog.records if "expires on" in r.getMessage()]
    assert len(warnings) == 1  # once per process
    assert "short-lived CA" in warnings[0].getMessage()


# -- the refresh script ------------------------------------------------------------------------


def load_refresh_script() -> ModuleType:
    path = Path(__file__).parent.parent / "scripts" / "refresh_bundles.py"
    spec = importlib.util.spec_from_file_location("refresh_bundles", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["refresh_bundles"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def refresh() -> ModuleType:
    return load_refresh_script()


def test_refresh_unchanged_from_the_shipped_files(refresh: ModuleType, tmp_path: Path) -> None:
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    for name in [*refresh.SOURCES, "inventory.json", "PROVENANCE.md"]:
        (cacerts / name).write_bytes(Path(providers.shipped_path(name)).read_bytes())
    assert refresh.main(["--from", str(cacerts), "--cacerts", str(cacerts)]) == 0


def test_refresh_diff_and_write(refresh: ModuleType, tmp_path: Path) -> None:
    cacerts = tmp_path / "cacerts"
    source = tmp_path / "source"
    cacerts.mkdir()
    source.mkdir()
    for name in ("inventory.json", "PROVENANCE.md", "supabase-root-2021.pem"):
        (cacerts / name).write_bytes(Path(providers.shipped_path(name)).read_bytes())
    newer = CertificateAuthority("Supabase Root 2031 CA (test)")
    (source / "supabase-root-2021.pem").write_bytes(newer.cert_pem)
    args = ["--from", str(source), "--cacerts", str(cacerts), "supabase-root-2021.pem"]
    assert refresh.main(args) == 3  # changes found, not written
    assert refresh.main([*args, "--write"]) == 0
    assert (cacerts / "supabase-root-2021.pem").read_bytes().strip() == newer.cert_pem.strip()
    inventory = json.loads((cacerts / "inventory.json").read_text())
    assert inventory["supabase-root-2021.pem"]["count"] == 1
    provenance = (cacerts / "PROVENANCE.md").read_text()
    assert inventory["supabase-root-2021.pem"]["file_sha256"] in provenance
    assert refresh.main(args) == 0  # now unchanged


def _other_key_same_name() -> bytes:
    """A CA certificate naming "Root X" as issuer, signed by a different "Root X" key."""
    real, impostor = CertificateAuthority("Root X"), CertificateAuthority("Root X")
    child = CertificateAuthority("Child", parent=impostor)
    return real.cert_pem + child.cert_pem


def test_refresh_writes_relabelled_blocks_in_canonical_form(refresh: ModuleType) -> None:
    """What a publisher labels X509 CERTIFICATE is checked like the rest and written plain."""
    ca = CertificateAuthority("relabelled")
    pem = ca.cert_pem.replace(b"CERTIFICATE-----", b"X509 CERTIFICATE-----")
    written, certs = refresh.build("azure-postgres-roots.pem", [pem])
    assert len(certs) == 1
    assert written == ca.cert_pem.replace(b"\r\n", b"\n")
    assert b"X509" not in written


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("expired", "expired on"),
        ("not-yet-valid", "not valid before"),
        ("not-a-ca", "is not a CA certificate"),
        ("corrupted", "does not parse"),
        ("bad-base64", "base64"),
        ("trusted", "BEGIN TRUSTED CERTIFICATE.* is not a certificate block"),
        ("bad-signature", "signature does not verify"),
        ("missing-issuer", "is not in the file"),
        ("empty", "no PEM certificate"),
    ],
)
def test_refresh_refuses_bad_input(
    refresh: ModuleType, server: PostgresServer, tmp_path: Path, case: str, message: str
) -> None:
    good = CertificateAuthority("good").cert_pem
    pem = {
        "expired": CertificateAuthority("old", not_after=NOW - dt.timedelta(days=1)).cert_pem,
        "not-yet-valid": CertificateAuthority(
            "future", not_before=NOW + dt.timedelta(days=5)
        ).cert_pem,
        "not-a-ca": server.issue_certificate("leaf.example").cert_pem,
        "corrupted": good.replace(good.splitlines()[5], b"A" * 64),
        "bad-base64": good.replace(good.splitlines()[3], b"!!!!" * 16),
        "bad-signature": _other_key_same_name(),
        "missing-issuer": CertificateAuthority("orphan", parent=CertificateAuthority()).cert_pem,
        "empty": b"nothing here\n",
        "trusted": good.replace(b"BEGIN CERTIFICATE", b"BEGIN TRUSTED CERTIFICATE").replace(
            b"END CERTIFICATE", b"END TRUSTED CERTIFICATE"
        ),
    }[case]
    with pytest.raises(_bundles.BundleError, match=message):
        refresh.build("azure-postgres-roots.pem", [pem])
    source = tmp_path / "source"
    source.mkdir()
    (source / "azure-postgres-roots.pem").write_bytes(pem)
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    shipped = Path(providers.shipped_path("azure-postgres-roots.pem")).read_bytes()
    (cacerts / "azure-postgres-roots.pem").write_bytes(shipped)
    args = ["--from", str(source), "--cacerts", str(cacerts), "--write"]
    assert refresh.main([*args, "azure-postgres-roots.pem"]) == 1
    assert (cacerts / "azure-postgres-roots.pem").read_bytes() == shipped  # nothing written


def test_refresh_keeps_govcloud_roots_only(refresh: ModuleType) -> None:
    root = CertificateAuthority("GovCloud test root")
    intermediate = root.intermediate("GovCloud test intermediate")
    pem, certs = refresh.build("rds-govcloud-roots.pem", [root.cert_pem + intermediate.cert_pem])
    assert [c.subject for c in certs] == ["CN=GovCloud test root"]
    assert pem.count(b"BEGIN CERTIFICATE") == 1
