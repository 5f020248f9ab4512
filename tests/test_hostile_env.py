"""A hostile environment and bad input: each case ends verified, or is refused clearly before
any connection is made."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import safepg
from safepg import ConfigurationError, UntrustedCertificateError
from safepg._cli import main
from safepg.testing import CertificateAuthority, PostgresServer

from . import adversaries

PASSWORD = "env-S3cret-pw"
SSLPASSWORD = "sslkey-S3cret-pw"


def verified(conninfo: str) -> safepg.SSLReport:
    with safepg.connect(conninfo) as conn:
        report = safepg.check(conn)
    assert report.verified
    assert report.sslmode == "verify-full"
    return report


# -- the environment ---------------------------------------------------------------------------


def test_pgsslmode_disable(server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSSLMODE", "disable")
    verified(server.conninfo())


@pytest.mark.parametrize("problem", ["missing", "empty", "garbage", "directory"])
def test_pgsslrootcert_bad_file(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, problem: str
) -> None:
    path = tmp_path / "root.pem"
    if problem == "empty":
        path.write_bytes(b"")
    elif problem == "garbage":
        path.write_bytes(os.urandom(512))
    elif problem == "directory":
        path.mkdir()
    monkeypatch.setenv("PGSSLROOTCERT", str(path))
    with pytest.raises(ConfigurationError, match="PGSSLROOTCERT") as info:
        safepg.connect(server.conninfo(sslrootcert=None))
    assert str(path) in str(info.value)
    assert "does not fall back" in str(info.value)


def test_service_file_with_sslmode_disable(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    service = tmp_path / "pg_service.conf"
    service.write_text(
        f"[app]\nhost=localhost\nhostaddr=127.0.0.1\nport={server.port}\nsslmode=disable\n"
        f"sslrootcert={server.ca_path}\n"
    )
    monkeypatch.setenv("PGSERVICEFILE", str(service))
    verified(f"service=app user={server.user} password={server.password} dbname={server.dbname}")


def test_pggssencmode_require(server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGGSSENCMODE", "require")
    report = verified(server.conninfo())
    assert report.encrypted  # TLS, not GSS: gssencmode is always disable


def test_rogue_root_crt(
    server: PostgresServer,
    clean_env: Path,
    rogue_ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    """libpq's default root.crt is trusted, as libpq trusts it: documented in the README.

    An attacker who can write to ~/.postgresql can make safepg (and psql) trust their CA. With
    the real server the result is a refusal naming that file; with the attacker's own server
    the connection succeeds, because that is what the file says to trust.
    """
    (clean_env / ".postgresql").mkdir()
    rogue_ca.write_cert(clean_env / ".postgresql" / "root.crt")
    with pytest.raises(UntrustedCertificateError, match=r"root\.crt"):
        safepg.connect(server.conninfo(sslrootcert=None))
    cert = rogue_ca.issue("localhost", ip_addresses=["127.0.0.1"])
    ctx = adversaries.server_context(cert, tmp_path)
    with adversaries.running(adversaries.present(ctx)) as mitm:
        conninfo = f"host=localhost hostaddr=127.0.0.1 port={mitm.port} connect_timeout=2"
        trust = safepg.resolve_trust(conninfo)
        assert trust.origin == "libpq-default"
        assert trust.path.endswith(".postgresql/root.crt")


def test_home_unset(server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOME")
    verified(server.conninfo())


def test_pghost_socket_directory(server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", str(server.socket_dir))
    monkeypatch.setenv("PGPORT", str(server.port))
    with pytest.raises(ConfigurationError, match="Unix-domain socket"):
        safepg.connect(f"user={server.user} password={server.password} dbname={server.dbname}")


# -- bad input: a clear error, and never a connection ------------------------------------------


@pytest.fixture
def listener() -> Iterator[adversaries.Adversary]:
    """Counts connections: bad input must never reach it."""
    with adversaries.running(adversaries.stall) as adversary:
        yield adversary


@pytest.mark.parametrize(
    ("extra", "kwargs", "message"),
    [
        ("garbage with no equals sign", {}, "invalid connection parameters"),
        ("bogus_keyword=1", {}, "unknown option"),
        ("", {"bogus_keyword": "1"}, "unknown option"),
        ("", {"bad key": "1"}, "unknown option"),
        ("", {"application_name": "x" * 100_000}, "at most 65536"),
        ("dbname=" + "y" * 100_000, {}, "at most 65536"),
        ("", {"dbname": "app\udcff"}, "not valid UTF-8"),
        ("", {"host": "localhost\x00evil.example"}, "NUL byte"),
        ("dbname='unterminated", {}, "invalid connection parameters"),
    ],
)
def test_bad_input_never_connects(
    listener: adversaries.Adversary, extra: str, kwargs: dict[str, str], message: str
) -> None:
    conninfo = f"host=localhost hostaddr=127.0.0.1 port={listener.port} connect_timeout=2 {extra}"
    connect: Any = safepg.connect  # arbitrary keywords, on purpose
    with pytest.raises(ConfigurationError, match=message) as info:
        connect(conninfo, **kwargs)
    assert listener.connections == 0
    assert "evil.example" not in str(info.value)


# -- secrets never leak ------------------------------------------------------------------------


FAILURES = [
    "wrong-name",
    "untrusted",
    "no-tls",
    "socket",
    "bad-ca-file",
    "bad-conninfo",
    "auth",
    "refused",
]


@pytest.mark.parametrize("case", FAILURES)
def test_secrets_never_appear(
    server: PostgresServer,
    certs: object,
    rogue_ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    base = {"password": PASSWORD, "sslpassword": SSLPASSWORD}
    conninfo = server.conninfo(**base)
    if case == "wrong-name":
        conninfo = server.conninfo(host="db.example.com", hostaddr="127.0.0.1", **base)
    elif case == "untrusted":
        conninfo = server.conninfo(sslrootcert=_rogue_file(rogue_ca, server), **base)
    elif case == "socket":
        conninfo = server.conninfo(host=str(server.socket_dir), **base)
    elif case == "bad-ca-file":
        conninfo = server.conninfo(sslrootcert="/nonexistent/ca.pem", **base)
    elif case == "bad-conninfo":
        conninfo = f"password='{PASSWORD} sslpassword={SSLPASSWORD} host=%%%"
    elif case == "refused":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        conninfo = server.conninfo(port=port, **base)
    with caplog.at_level(logging.DEBUG):
        if case == "no-tls":
            with server.ssl_disabled():
                err = _failure(conninfo)
                cli = main(["check", conninfo, "--json"])
        else:
            err = _failure(conninfo)
            cli = main(["check", conninfo])
    assert cli != 0
    out = capsys.readouterr()
    for secret in (PASSWORD, SSLPASSWORD):
        assert secret not in str(err)
        assert secret not in repr(err)
        assert secret not in repr(err.args)
        assert secret not in caplog.text
        assert secret not in out.out + out.err
        # Security review item 9: libpq's error is kept as the cause, but not psycopg's
        # snapshot of the failed connection, whose repr and info held both secrets.
        chained: BaseException | None = err
        while chained is not None:
            for text in (str(chained), repr(chained), repr(getattr(chained, "pgconn", None))):
                assert secret not in text
            chained = chained.__cause__ or chained.__context__
    assert err.pgconn is None
    assert err.__cause__ is None or err.__cause__.__traceback__ is None  # no frames, no locals
    tb = err.__traceback__
    while tb is not None:  # no frame the error passed through keeps the failed connection
        for value in tb.tb_frame.f_locals.values():
            assert not (isinstance(value, psycopg.Error) and value.pgconn is not None)
            assert type(value).__name__ not in ("PGconn", "FinishedPGconn")
        tb = tb.tb_next


def _failure(conninfo: str) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        safepg.connect(conninfo)
    return info.value


def _rogue_file(ca: CertificateAuthority, server: PostgresServer) -> str:
    path = server.directory / "rogue-for-secrets.pem"
    if not path.exists():
        ca.write_cert(path)
    return str(path)
