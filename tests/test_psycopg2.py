"""safepg.psycopg2.connect against the real TLS server: verified, or refused with safepg's errors,
which are psycopg2's OperationalError too. (The adversaries of test_hostile_network.py attack it
as well.)"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest

import safepg
import safepg.psycopg2
from safepg._params import build_plan
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop

NOW = dt.datetime.now(dt.timezone.utc)
WEAK_MODES = ["disable", "allow", "prefer", "require", "verify-ca"]


def _refused(exc: type[Any], conninfo: str, **kwargs: Any) -> Any:
    """The error safepg.psycopg2.connect raises: the safepg class, psycopg2's too."""
    with pytest.raises(psycopg2.OperationalError) as info:
        safepg.psycopg2.connect(conninfo, **kwargs)
    err = info.value
    assert isinstance(err, exc)
    assert isinstance(err, safepg.SafePGError)
    assert "password=" not in str(err)
    return err


def test_connect_returns_a_verified_psycopg2_connection(server: PostgresServer) -> None:
    conn = safepg.psycopg2.connect(server.conninfo())
    try:
        assert type(conn) is psycopg2.extensions.connection
        assert conn.info.ssl_in_use
        assert conn.info.ssl_attribute("protocol") in ("TLSv1.2", "TLSv1.3")
        dsn = conn.get_dsn_parameters()
        assert dsn["sslmode"] == "verify-full"
        assert dsn["sslrootcert"] == str(server.ca_path)
        assert dsn["gssencmode"] == "disable"
        with conn.cursor() as cur:
            cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert cur.fetchone() == (True,)
    finally:
        conn.close()


def test_a_password_callable_gives_each_connection_a_fresh_value(server: PostgresServer) -> None:
    targets: list[safepg.ConnectTarget] = []

    def provider(target: safepg.ConnectTarget) -> str:
        targets.append(target)
        return server.password

    for _ in range(2):
        safepg.psycopg2.connect(server.conninfo(password=None), password=provider).close()
    assert [t.port for t in targets] == [server.port, server.port]
    with pytest.raises(safepg.ConfigurationError, match="Unix-domain socket"):
        safepg.psycopg2.connect(
            server.conninfo(host=str(server.socket_dir), password=None),
            password=provider,
            allow_unencrypted_unix_socket=True,
        )
    assert len(targets) == 2  # refused before the callable was called
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        safepg.psycopg2.connect(server.conninfo(password=None), password=lambda: "wrong")


def test_url_keywords_and_factories(server: PostgresServer) -> None:
    class MyConnection(psycopg2.extensions.connection):
        pass

    conn = safepg.psycopg2.connect(
        server.url(),
        connection_factory=MyConnection,
        cursor_factory=psycopg2.extras.RealDictCursor,
        database=server.dbname,
        application_name="safepg-psycopg2",
    )
    with conn, conn.cursor() as cur:
        assert type(conn) is MyConnection
        cur.execute("SELECT current_setting('application_name') AS name")
        assert cur.fetchone() == {"name": "safepg-psycopg2"}
    conn.close()


@pytest.mark.parametrize("mode", WEAK_MODES)
@pytest.mark.parametrize("source", ["dsn", "kwargs", "PGSSLMODE"])
def test_downgrade_is_raised_and_logged(
    server: PostgresServer,
    mode: str,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The name does not match the certificate: only verify-full notices.
    base: dict[str, Any] = {"host": "wrong.example", "hostaddr": "127.0.0.1"}
    kwargs: dict[str, Any] = {}
    if source == "dsn":
        base["sslmode"] = mode
    elif source == "kwargs":
        kwargs["sslmode"] = mode
    else:
        monkeypatch.setenv("PGSSLMODE", mode)
    conninfo = server.conninfo(**base)
    # Raw psycopg2 accepts the wrong name (or no TLS at all) at this sslmode ...
    psycopg2.connect(conninfo, **kwargs).close()
    # ... safepg does not, and says why it raised sslmode.
    with caplog.at_level(logging.INFO, logger="safepg"):
        _refused(safepg.HostnameMismatchError, conninfo, **kwargs)
    assert f"sslmode={mode} (from " in caplog.text
    assert "raised to verify-full" in caplog.text


def test_wrong_host_name(server: PostgresServer) -> None:
    err = _refused(
        safepg.psycopg2.HostnameMismatchError,
        server.conninfo(host="wrong.example", hostaddr="127.0.0.1"),
    )
    assert isinstance(err, safepg.HostnameMismatchError)
    assert isinstance(err, psycopg.OperationalError)  # like every safepg connect error
    assert 'does not name "wrong.example"' in str(err)
    assert err.host == "wrong.example"
    assert err.port == server.port
    assert set(err.certificate_names) >= {"localhost"}
    assert isinstance(err.__cause__, psycopg2.OperationalError)
    assert type(err).__module__ == "safepg.psycopg2"


def test_rogue_ca(
    server: PostgresServer, certs: CertificateShop, rogue_ca: CertificateAuthority
) -> None:
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    err = _refused(safepg.UntrustedCertificateError, server.conninfo())
    assert not isinstance(err, safepg.CertificateExpiredError)
    assert 'issuer "commonName=rogue CA" is not among them' in str(err)
    assert err.trust is not None
    assert err.trust.path == str(server.ca_path)
    assert "certificate verify failed" in str(err.__cause__)


def test_expired_certificate(server: PostgresServer, certs: CertificateShop) -> None:
    certs.present_expired()
    err = _refused(safepg.CertificateExpiredError, server.conninfo())
    assert "validity period" in str(err)


def test_server_without_tls(server: PostgresServer) -> None:
    with server.ssl_disabled():
        err = _refused(safepg.SSLNotSupportedError, server.conninfo(sslmode="prefer"))
        # ... where raw psycopg2 would have gone on in clear text:
        conn = psycopg2.connect(server.conninfo(sslmode="prefer"))
        assert not conn.info.ssl_in_use
        conn.close()
    assert "does not offer TLS" in str(err)


def test_unix_socket_is_refused_unless_allowed(server: PostgresServer) -> None:
    conninfo = server.conninfo(host=str(server.socket_dir))
    err = _refused(safepg.ConfigurationError, conninfo)
    assert "Unix-domain socket" in str(err)
    conn = safepg.psycopg2.connect(conninfo, allow_unencrypted_unix_socket=True)
    assert not conn.info.ssl_in_use
    conn.close()


@pytest.mark.parametrize(
    ("sslmode", "problem"),
    [("disable", "not encrypted"), ("require", "libpq used sslmode=require")],
)
def test_session_check_refuses_what_libpq_let_through(
    server: PostgresServer, sslmode: str, problem: str
) -> None:
    """The post-connect check, on real sessions below policy (safepg's own never are)."""
    plan = build_plan(server.conninfo(), {})
    conn = psycopg2.connect(server.conninfo(sslmode=sslmode))
    try:
        assert problem in (safepg.psycopg2._session_problem(conn, plan) or "")
    finally:
        conn.close()
    with safepg.psycopg2.connect(server.conninfo()) as verified:
        assert safepg.psycopg2._session_problem(verified, plan) is None
    verified.close()


def test_bad_input_is_a_configuration_error(server: PostgresServer) -> None:
    _refused(safepg.ConfigurationError, server.conninfo(), async_=True)
    _refused(safepg.ConfigurationError, server.conninfo(), dbname="a", database="b")
    _refused(safepg.ConfigurationError, "not a conninfo")


def test_other_failures_are_psycopg2_errors_unchanged(server: PostgresServer) -> None:
    with pytest.raises(psycopg2.OperationalError) as info:
        safepg.psycopg2.connect(server.conninfo(password="wrong"))
    assert not isinstance(info.value, safepg.SafePGError)
    assert "password authentication failed" in str(info.value)


def test_sqlalchemy_psycopg2_creator(
    server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlalchemy

    import safepg.sqlalchemy

    url = server.url("postgresql+psycopg2")
    with caplog.at_level(logging.DEBUG, logger="safepg"):
        creator = safepg.sqlalchemy.psycopg2_creator(url)
    assert "psycopg2 is not used" not in caplog.text  # it is, here
    engine = sqlalchemy.create_engine("postgresql+psycopg2://", creator=creator)
    with engine.connect() as conn:
        ssl = conn.execute(
            sqlalchemy.text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        ).scalar()
        dbapi_conn = conn.connection.dbapi_connection
        assert isinstance(dbapi_conn, psycopg2.extensions.connection)
        assert dbapi_conn.get_dsn_parameters()["sslmode"] == "verify-full"
    engine.dispose()
    assert ssl is True
    bad = safepg.sqlalchemy.psycopg2_creator(url, host="wrong.example", hostaddr="127.0.0.1")
    engine = sqlalchemy.create_engine("postgresql+psycopg2://", creator=bad)
    with pytest.raises(sqlalchemy.exc.OperationalError) as info:
        engine.connect()
    assert isinstance(info.value.orig, safepg.psycopg2.HostnameMismatchError)
    engine.dispose()


def test_without_psycopg2_the_import_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "psycopg2", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "safepg.psycopg2")
    with pytest.raises(ImportError, match=r"pip install 'safepg-tls\[psycopg2\]'"):
        importlib.import_module("safepg.psycopg2")
