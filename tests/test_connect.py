"""Connecting to a real TLS server: verified sessions, every refusal, and what errors say."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import subprocess
import traceback
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import safepg
from safepg import (
    CertificateExpiredError,
    ConfigurationError,
    HostnameMismatchError,
    InsecureConnectionError,
    SSLNotSupportedError,
    UntrustedCertificateError,
    _check,
)
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import EXPIRED_ON, CertificateShop

NOW = dt.datetime.now(dt.timezone.utc)
WEAK_MODES = ["disable", "allow", "prefer", "require", "verify-ca"]


def by_name(server: PostgresServer, name: str, **overrides: Any) -> str:
    """Connect to the test server (127.0.0.1) while verifying against *name*."""
    return server.conninfo(host=name, hostaddr="127.0.0.1", **overrides)


def tx_status(conn: psycopg.Connection[Any]) -> psycopg.pq.TransactionStatus:
    return conn.info.transaction_status


# -- the happy path ----------------------------------------------------------------------------


def test_connect_returns_a_verified_psycopg_connection(server: PostgresServer) -> None:
    with safepg.connect(server.conninfo()) as conn:
        assert type(conn) is psycopg.Connection
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
        report = safepg.check(conn)
    assert report.verified
    assert report.encrypted
    assert not report.local_socket
    assert report.sslmode == "verify-full"
    assert report.protocol in ("TLSv1.2", "TLSv1.3")
    assert report.backend_ssl is True
    assert report.backend_protocol == report.protocol  # libpq's side is read, not guessed
    assert report.cipher == report.backend_cipher
    assert report.bits == report.backend_bits
    assert report.ssl_library == "OpenSSL"
    assert report.trust is not None
    assert report.trust.path == str(server.ca_path)
    assert report.summary.startswith("verified TLSv1.")


def test_connect_accepts_url_and_psycopg_options(server: PostgresServer) -> None:
    with safepg.connect(server.url(), autocommit=True, row_factory=dict_row) as conn:
        assert conn.autocommit
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        assert conn.prepare_threshold == 5


def test_check_runs_as_non_superuser_and_keeps_transaction_state(server: PostgresServer) -> None:
    with safepg.connect(server.conninfo()) as conn:
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() == (False,)
        conn.rollback()
        safepg.check(conn)
        assert tx_status(conn) == psycopg.pq.TransactionStatus.IDLE
        conn.execute("CREATE TEMP TABLE t (x int)")
        safepg.check(conn)
        assert tx_status(conn) == psycopg.pq.TransactionStatus.INTRANS
        conn.execute("SELECT * FROM t")  # the transaction is still usable


def test_check_refuses_a_connection_below_policy(server: PostgresServer) -> None:
    with (
        psycopg.connect(server.conninfo(sslmode="require")) as conn,
        pytest.raises(InsecureConnectionError, match="below safepg's policy"),
    ):
        safepg.check(conn)
    with (
        psycopg.connect(server.conninfo(sslmode="disable")) as conn,
        pytest.raises(InsecureConnectionError, match="NOT encrypted"),
    ):
        safepg.check(conn)


def test_connect_time_check_refuses_a_session_without_tls(server: PostgresServer) -> None:
    # What connect() checks on every new session, at no round-trip cost, shown on sessions that
    # safepg itself would never open.
    with psycopg.connect(server.conninfo(sslmode="disable")) as conn:
        assert _check.session_problem(conn.pgconn, allow_socket=False)
    socket = server.conninfo(host=str(server.socket_dir))
    with psycopg.connect(socket) as conn:
        assert _check.session_problem(conn.pgconn, allow_socket=False)
        assert _check.session_problem(conn.pgconn, allow_socket=True) is None
    with psycopg.connect(server.conninfo(sslmode="require")) as conn:
        assert _check.session_problem(conn.pgconn, allow_socket=False) is None


def test_secure_conninfo_works_for_psql(server: PostgresServer) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    conninfo = safepg.secure_conninfo(server.conninfo(sslmode="disable"))
    out = subprocess.run(
        [psql, conninfo, "-XAtc", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "t"
    wrong = safepg.secure_conninfo(by_name(server, "wrong.example", sslmode="disable"))
    out = subprocess.run([psql, wrong, "-XAtc", "SELECT 1"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "does not match host name" in out.stderr


def test_intermediate_ca_chain(server: PostgresServer, certs: CertificateShop) -> None:
    intermediate = server.ca.intermediate()
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=intermediate)
    with safepg.connect(server.conninfo()) as conn:
        assert safepg.check(conn).verified


# -- the host name matrix of libpq's own SSL tests ---------------------------------------------

HOSTNAME_MATRIX = [
    # (certificate: dns names, ip names, common name), host dialled, accepted?
    pytest.param(
        ((), (), "common-name.pg-ssltest.test"), "common-name.pg-ssltest.test", True, id="cn-only"
    ),
    pytest.param(
        ((), (), "common-name.pg-ssltest.test"), "wronghost.test", False, id="cn-only-wrong"
    ),
    *[
        pytest.param(
            (
                (
                    "dns1.alt-name.pg-ssltest.test",
                    "dns2.alt-name.pg-ssltest.test",
                    "*.wildcard.pg-ssltest.test",
                ),
                (),
                None,
            ),
            host,
            ok,
            id=f"multi-san-{host}",
        )
        for host, ok in [
            ("dns1.alt-name.pg-ssltest.test", True),
            ("dns2.alt-name.pg-ssltest.test", True),
            ("foo.wildcard.pg-ssltest.test", True),
            ("wronghost.alt-name.pg-ssltest.test", False),
            ("deep.subdomain.wildcard.pg-ssltest.test", False),
        ]
    ],
    pytest.param(
        (("single.alt-name.pg-ssltest.test",), (), None),
        "single.alt-name.pg-ssltest.test",
        True,
        id="single-san",
    ),
    pytest.param(
        (("single.alt-name.pg-ssltest.test",), (), None),
        "deep.subdomain.single.alt-name.pg-ssltest.test",
        False,
        id="single-san-deeper",
    ),
    pytest.param(
        (
            ("dns1.alt-name.pg-ssltest.test", "dns2.alt-name.pg-ssltest.test"),
            (),
            "common-name.pg-ssltest.test",
        ),
        "dns1.alt-name.pg-ssltest.test",
        True,
        id="cn-and-san-san",
    ),
    pytest.param(
        (
            ("dns1.alt-name.pg-ssltest.test", "dns2.alt-name.pg-ssltest.test"),
            (),
            "common-name.pg-ssltest.test",
        ),
        "common-name.pg-ssltest.test",
        False,
        id="cn-and-san-cn-ignored",
    ),
    pytest.param(((), (), None), "common-name.pg-ssltest.test", False, id="no-names"),
    pytest.param(((), ("127.0.0.2",), None), "127.0.0.2", True, id="ip-san"),
    pytest.param(((), ("127.0.0.2",), None), "127.0.0.3", False, id="ip-san-wrong"),
    pytest.param((("localhost",), (), None), "127.0.0.2", False, id="ip-host-dns-only-cert"),
]


@pytest.mark.parametrize(("cert", "host", "accepted"), HOSTNAME_MATRIX)
def test_hostname_matrix(
    server: PostgresServer,
    certs: CertificateShop,
    cert: tuple[tuple[str, ...], tuple[str, ...], str | None],
    host: str,
    accepted: bool,
) -> None:
    dns, ips, cn = cert
    certs.present(*dns, ip_addresses=ips, common_name=cn)
    if accepted:
        with safepg.connect(by_name(server, host)) as conn:
            report = safepg.check(conn)
            assert report.verified
            assert report.host == host
        return
    with pytest.raises(HostnameMismatchError) as info:
        safepg.connect(by_name(server, host))
    err = info.value
    assert (err.host, err.port) == (host, server.port)
    assert f'does not name "{host}"' in str(err)
    assert str(server.ca_path) in str(err)
    if dns or ips:
        assert set(err.certificate_names) == {*dns, *ips}
    else:
        assert "no host name at all" in str(err) or "common-name" in str(err)


# -- untrusted, expired, no TLS ----------------------------------------------------------------


def test_wrong_ca(
    server: PostgresServer, certs: CertificateShop, rogue_ca: CertificateAuthority
) -> None:
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    with pytest.raises(UntrustedCertificateError) as info:
        safepg.connect(server.conninfo())
    err = info.value
    assert type(err) is UntrustedCertificateError
    assert 'issuer "commonName=rogue CA" is not among them' in str(err)
    assert "sslrootcert from the conninfo string" in str(err)
    assert err.trust is not None
    assert err.trust.path == str(server.ca_path)
    assert isinstance(err.__cause__, psycopg.OperationalError)
    assert "certificate verify failed" in str(err.__cause__)


def test_revoked_certificate(
    server: PostgresServer, certs: CertificateShop, tmp_path: Path
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    cert = certs.present("localhost", ip_addresses=["127.0.0.1"], common_name="revoked")
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(cert.cert.serial_number)
        .revocation_date(NOW - dt.timedelta(hours=1))
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(server.ca.cert.subject)
        .last_update(NOW - dt.timedelta(hours=1))
        .next_update(NOW + dt.timedelta(days=1))
        .add_revoked_certificate(revoked)
        .sign(server.ca.key, hashes.SHA256())
    )
    crl_path = tmp_path / "crl.pem"
    crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(UntrustedCertificateError, match="revocation list") as info:
        safepg.connect(server.conninfo(sslcrl=str(crl_path)))
    assert not isinstance(info.value, CertificateExpiredError)


def test_self_signed_server_certificate(server: PostgresServer, certs: CertificateShop) -> None:
    lone = CertificateAuthority("self-signed server")
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=lone)
    with pytest.raises(UntrustedCertificateError):
        safepg.connect(server.conninfo())


def test_expired_certificate(server: PostgresServer, certs: CertificateShop) -> None:
    certs.present_expired()
    with pytest.raises(CertificateExpiredError) as info:
        safepg.connect(server.conninfo())
    assert "validity period" in str(info.value)
    expired_on = EXPIRED_ON.strftime("%Y-%m-%d")
    assert f"expired on {expired_on}" in str(info.value)
    assert isinstance(info.value, UntrustedCertificateError)


def test_expiry_is_diagnosed_as_libpq_verifies_not_stricter(
    server: PostgresServer, certs: CertificateShop
) -> None:
    # An expired leaf with no Authority Key Identifier: libpq does not require one, Python 3.13's
    # default (strict) context does. The diagnosis must still say "expired", as libpq failed for.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from safepg.testing import IssuedCertificate

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(server.ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=30))
        .not_valid_after(NOW - dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(server.ca.key, hashes.SHA256())
    )
    server.use_certificate(IssuedCertificate(cert, key))
    try:
        with pytest.raises(CertificateExpiredError):
            safepg.connect(server.conninfo(host="localhost"))
    finally:
        server.reset_certificate()


def test_server_without_tls(server: PostgresServer) -> None:
    with server.ssl_disabled():
        with pytest.raises(SSLNotSupportedError, match="does not offer TLS") as info:
            safepg.connect(server.conninfo())
        # ... where raw psycopg with the libpq default would have gone on in clear text:
        with psycopg.connect(server.conninfo(sslmode="prefer")) as conn:
            assert not conn.pgconn.ssl_in_use
    assert "ssl = on" in str(info.value)


# -- downgrades: every way of asking for less still ends verified -------------------------------


@pytest.mark.parametrize("mode", WEAK_MODES)
@pytest.mark.parametrize("source", ["conninfo", "kwargs", "PGSSLMODE", "service"])
def test_downgrade_is_refused(
    server: PostgresServer,
    mode: str,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # The name does not match the certificate: only verify-full notices.
    kwargs: dict[str, Any]
    if source == "conninfo":
        conninfo, kwargs = by_name(server, "wrong.example", sslmode=mode), {}
    elif source == "kwargs":
        conninfo, kwargs = by_name(server, "wrong.example"), {"sslmode": mode}
    elif source == "PGSSLMODE":
        monkeypatch.setenv("PGSSLMODE", mode)
        conninfo, kwargs = by_name(server, "wrong.example"), {}
    else:
        service = tmp_path / "pg_service.conf"
        service.write_text(
            f"[svc]\nhost=wrong.example\nhostaddr=127.0.0.1\nport={server.port}\nsslmode={mode}\n"
            f"sslrootcert={server.ca_path}\nuser={server.user}\ndbname={server.dbname}\n"
        )
        monkeypatch.setenv("PGSERVICEFILE", str(service))
        conninfo, kwargs = f"service=svc password={server.password}", {}
    # Raw psycopg accepts the wrong name (or no TLS at all) at this sslmode ...
    with psycopg.connect(conninfo, **kwargs) as conn:
        assert conn.info.host == "wrong.example"
    # ... safepg does not.
    with pytest.raises(HostnameMismatchError):
        safepg.connect(conninfo, **kwargs)


def test_unix_socket_is_refused_before_connecting(server: PostgresServer) -> None:
    with pytest.raises(ConfigurationError, match="Unix-domain socket"):
        safepg.connect(server.conninfo(host=str(server.socket_dir)))


def test_unix_socket_opt_in_reports_local_socket(server: PostgresServer) -> None:
    conninfo = server.conninfo(host=str(server.socket_dir))
    with safepg.connect(conninfo, allow_unencrypted_unix_socket=True) as conn:
        report = safepg.check(conn)
    assert report.local_socket
    assert not report.encrypted
    assert not report.verified
    assert report.summary.startswith("local socket, not encrypted")


def test_hostaddr_only_is_refused(server: PostgresServer) -> None:
    with pytest.raises(ConfigurationError, match="without a host name"):
        safepg.connect(server.conninfo(host="", hostaddr="127.0.0.1"))


def test_multi_host_verifies_every_host(server: PostgresServer) -> None:
    port = server.port
    # The first host's name does not match: it is skipped, and the second one is used.
    conninfo = server.conninfo(
        host="wrong.example,localhost", hostaddr="127.0.0.1,127.0.0.1", port=f"{port},{port}"
    )
    with safepg.connect(conninfo) as conn:
        assert conn.info.host == "localhost"
    # Every host is checked: with no good host left, the mismatch is what is reported.
    conninfo = server.conninfo(
        host="localhost,wrong.example", hostaddr="127.0.0.1,127.0.0.1", port=f"1,{port}"
    )
    with pytest.raises(HostnameMismatchError, match=r"wrong\.example"):
        safepg.connect(conninfo)


# -- trust sources, end to end -----------------------------------------------------------------


def test_ssl_cert_file_stands_in_for_the_os_store(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_path))
    conninfo = server.conninfo(sslrootcert=None)
    with safepg.connect(conninfo) as conn:
        assert safepg.check(conn).trust.origin == "os-store"  # type: ignore[union-attr]
    # sslrootcert=system works with every libpq (15 does not know the value; psycopg-binary's
    # libpq cannot find the OS store on its own).
    with safepg.connect(server.conninfo(sslrootcert="system")) as conn:
        assert safepg.check(conn).verified


def test_pgsslrootcert_end_to_end(server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSSLROOTCERT", str(server.ca_path))
    with safepg.connect(server.conninfo(sslrootcert=None)) as conn:
        assert safepg.check(conn).trust.origin == "PGSSLROOTCERT"  # type: ignore[union-attr]


def test_root_crt_end_to_end(server: PostgresServer, clean_env: Path) -> None:
    root = clean_env / ".postgresql" / "root.crt"
    root.parent.mkdir()
    root.write_bytes(server.ca.cert_pem)
    with safepg.connect(server.conninfo(sslrootcert=None)) as conn:
        assert safepg.check(conn).trust.origin == "libpq-default"  # type: ignore[union-attr]


def test_rds_host_is_checked_against_the_rds_roots(server: PostgresServer) -> None:
    host = "mydb.abc123.eu-central-1.rds.amazonaws.com"
    certs_name = server.conninfo(host=host, hostaddr="127.0.0.1", sslrootcert=None)
    with pytest.raises(UntrustedCertificateError, match="bundled Amazon RDS roots"):
        safepg.connect(certs_name)


def test_service_file_sslrootcert(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    service = tmp_path / "pg_service.conf"
    service.write_text(
        f"[svc]\nhost=127.0.0.1\nport={server.port}\nsslrootcert={server.ca_path}\n"
        f"user={server.user}\ndbname={server.dbname}\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(service))
    with safepg.connect("service=svc", password=server.password) as conn:
        trust = safepg.check(conn).trust
    assert trust is not None
    assert trust.label == "sslrootcert from service 'svc' in the service file"


# -- client certificates pass through ----------------------------------------------------------


@pytest.mark.parametrize("key_password", [None, "key-Pa55phrase"])
def test_client_certificate(
    server: PostgresServer, tmp_path: Path, key_password: str | None
) -> None:
    client = server.ca.issue(common_name=server.cert_user, client=True)
    crt, key = client.write(tmp_path / "client.crt", tmp_path / "client.key", password=key_password)
    extra = {"sslpassword": key_password} if key_password else {}
    conninfo = server.conninfo(
        user=server.cert_user, password=None, sslcert=crt, sslkey=key, **extra
    )
    with safepg.connect(conninfo) as conn:
        report = safepg.check(conn)
    assert report.client_dn == f"/CN={server.cert_user}"


# -- secrets never leak ------------------------------------------------------------------------


def _all_text(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__)) + repr(err)


def test_passwords_never_appear(
    server: PostgresServer,
    certs: CertificateShop,
    rogue_ca: CertificateAuthority,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = server.password
    key_secret = "ssl-Key-Pa55word"
    client = server.ca.issue(common_name=server.cert_user, client=True)
    crt, key = client.write(tmp_path / "c.crt", tmp_path / "c.key", password="right-one")
    failures: list[BaseException] = []

    def attempt(*args: Any, **kwargs: Any) -> None:
        try:
            safepg.connect(*args, **kwargs).close()
        except psycopg.Error as ex:
            failures.append(ex)
        else:
            raise AssertionError("expected a failure")

    with caplog.at_level(logging.DEBUG):
        attempt(by_name(server, "wrong.example", sslmode="disable"))
        attempt(server.conninfo(host=str(server.socket_dir)))
        attempt(server.conninfo(host="", hostaddr="127.0.0.1"))
        attempt(server.conninfo(sslrootcert=str(tmp_path / "missing.pem")))
        attempt(server.conninfo(password="not-the-" + secret))
        attempt(server.conninfo(password=None), password=lambda: "not-the-" + secret)
        attempt(
            server.conninfo(user=server.cert_user, sslcert=crt, sslkey=key, sslpassword=key_secret)
        )
        attempt(server.url().replace("@", "%zz@"))
        attempt(server.url() + "&bad")
        certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
        attempt(server.conninfo())
        attempt(server.url())
        with server.ssl_disabled():
            attempt(server.conninfo())
    assert len(failures) == 12
    for err in failures:
        text = _all_text(err)
        assert secret not in text
        assert key_secret not in text
    assert secret not in caplog.text
    assert key_secret not in caplog.text


# -- async -------------------------------------------------------------------------------------


def test_connect_async(server: PostgresServer, certs: CertificateShop) -> None:
    async def main() -> None:
        async with await safepg.connect_async(server.conninfo(), row_factory=dict_row) as conn:
            assert type(conn) is psycopg.AsyncConnection
            cur = await conn.execute("SELECT 1 AS one")
            assert await cur.fetchone() == {"one": 1}
            report = await safepg.check_async(conn)
            assert report.verified
        with pytest.raises(HostnameMismatchError):
            await safepg.connect_async(by_name(server, "wrong.example", sslmode="require"))
        with pytest.raises(ConfigurationError, match="Unix-domain socket"):
            await safepg.connect_async(server.conninfo(host=str(server.socket_dir)))
        certs.present("localhost", ip_addresses=["127.0.0.1"], not_after=NOW - dt.timedelta(days=1))
        with pytest.raises(CertificateExpiredError):
            await safepg.connect_async(server.conninfo())

    asyncio.run(main())


def test_other_failures_are_psycopg_errors_unchanged(server: PostgresServer) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        safepg.connect(server.conninfo(password="wrong"))
    assert not isinstance(info.value, safepg.SafePGError)
    assert "password authentication failed" in str(info.value)


def test_public_classes_are_shown_under_safepg(certs: CertificateShop) -> None:
    """Tracebacks and SQLAlchemy's messages name safepg.X, not the private module."""
    import pickle

    for name in safepg.__all__:
        obj = getattr(safepg, name)
        if isinstance(obj, type):
            assert obj.__module__ == "safepg", name
    certs.present("other.example")
    with pytest.raises(safepg.HostnameMismatchError) as info:
        safepg.connect(certs.server.conninfo())
    assert "safepg.HostnameMismatchError" in "".join(traceback.format_exception_only(info.value))
    again = pickle.loads(pickle.dumps(info.value))  # noqa: S301 - our own object
    assert type(again) is safepg.HostnameMismatchError
