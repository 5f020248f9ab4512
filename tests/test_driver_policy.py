"""A driver that cannot honour a setting refuses it: asyncpg (which does not use libpq) gets
every setting of the DSN, keywords, environment or a service file with the same meaning, or
safepg refuses it by name. Against the real server: a certificate revocation list that revokes
the server's certificate makes both safepg.connect and safepg.asyncpg refuse it."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from psycopg import pq

import safepg
from safepg import ConfigurationError
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop

asyncpg = pytest.importorskip("asyncpg")
import safepg.asyncpg  # noqa: E402

LIBPQ = {o.keyword.decode() for o in pq.Conninfo.get_defaults()}


def write_crl(path: Path, ca: CertificateAuthority, *revoked: x509.Certificate) -> Path:
    """A PEM CRL signed by *ca* that revokes *revoked*."""
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - dt.timedelta(hours=1))
        .next_update(now + dt.timedelta(days=1))
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - dt.timedelta(hours=1))
            .build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _asyncpg_connect(server: PostgresServer, **kwargs: Any) -> Callable[[], Any]:
    async def go() -> Any:
        conn = await safepg.asyncpg.connect(server.url(), **kwargs)
        try:
            return await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()

    return lambda: run(go())


def _set_crl(
    origin: str, crl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, dict[str, Any]]:
    """Name *crl* by *origin*: the (extra) URL query and the keywords to connect with."""
    if origin == "env":
        monkeypatch.setenv("PGSSLCRL", str(crl))
    elif origin == "service":
        services = tmp_path / "pg_service.conf"
        services.write_text(f"[app]\nsslcrl={crl}\n")
        monkeypatch.setenv("PGSERVICEFILE", str(services))
        monkeypatch.setenv("PGSERVICE", "app")
    elif origin == "url":
        return "&sslcrl=" + quote(str(crl), safe=""), {}
    else:
        return "", {"sslcrl": str(crl)}
    return "", {}


@pytest.mark.parametrize("origin", ["env", "service", "url", "keyword"])
def test_a_crl_that_revokes_the_server_is_honoured_by_asyncpg(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, origin: str
) -> None:
    crl = write_crl(tmp_path / "revoked.crl", server.ca, server.server_cert.cert)
    query, kwargs = _set_crl(origin, crl, tmp_path, monkeypatch)
    url = server.url() + query
    # libpq refuses the revoked certificate...
    with pytest.raises(psycopg.OperationalError, match="revoked"):
        safepg.connect(url, **kwargs).close()

    # ...and so does safepg.asyncpg, before any password is sent.
    async def go() -> None:
        conn = await safepg.asyncpg.connect(url, **kwargs)
        await conn.close()  # pragma: no cover - the bug

    with pytest.raises(safepg.UntrustedCertificateError, match="revoked"):
        run(go())


def test_a_crl_that_revokes_another_certificate_lets_asyncpg_connect(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = server.ca.issue("other.example")
    monkeypatch.setenv("PGSSLCRL", str(write_crl(tmp_path / "other.crl", server.ca, other.cert)))
    assert _asyncpg_connect(server)() == server.user
    # The shared context is cached per CRL content: a CRL that now revokes the server is read.
    write_crl(tmp_path / "other.crl", server.ca, other.cert, server.server_cert.cert)
    with pytest.raises(safepg.UntrustedCertificateError, match="revoked"):
        _asyncpg_connect(server)()


def test_a_crl_file_that_holds_a_certificate_is_refused(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rogue_ca: Any
) -> None:
    # OpenSSL would load the certificate as one more trust anchor.
    crl = write_crl(tmp_path / "mixed.crl", server.ca)
    crl.write_bytes(crl.read_bytes() + rogue_ca.cert_pem)
    monkeypatch.setenv("PGSSLCRL", str(crl))
    with pytest.raises(ConfigurationError, match=r"must hold PEM CRLs .* and nothing else"):
        _asyncpg_connect(server)()


def test_an_asyncpg_engine_honours_the_crl(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safepg.sqlalchemy import create_async_engine

    crl = write_crl(tmp_path / "revoked.crl", server.ca, server.server_cert.cert)

    async def go(url: str) -> None:
        engine = create_async_engine(url)
        try:
            async with engine.connect():
                pass  # pragma: no cover - the bug
        finally:
            await engine.dispose()

    url = server.url(scheme="postgresql+asyncpg")
    for query, env in ((f"&sslcrl={quote(str(crl), safe='')}", None), ("", str(crl))):
        if env:
            monkeypatch.setenv("PGSSLCRL", env)
        with pytest.raises(Exception, match="revoked") as info:
            run(go(url + query))
        assert isinstance(
            getattr(info.value, "orig", None) or info.value, safepg.UntrustedCertificateError
        ), repr(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "option"),
    [
        ("PGSSLCRLDIR", "{tmp}", "sslcrldir"),
        ("PGCHANNELBINDING", "require", "channel_binding"),
        ("PGSSLSNI", "0", "sslsni"),
        ("PGSSLMAXPROTOCOLVERSION", "TLSv1.3", "ssl_max_protocol_version"),
        ("PGOPTIONS", "-c work_mem=64MB", "options"),
        ("PGREQUIREPEER", "postgres", "requirepeer"),
        ("PGREQUIREAUTH", "scram-sha-256", "require_auth"),
        ("PGSSLCERTMODE", "require", "sslcertmode"),
    ],
)
def test_asyncpg_refuses_what_it_cannot_honour_by_name(
    server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    option: str,
) -> None:
    # Refused even where the running libpq does not read the variable (libpq 15 has no
    # PGREQUIREAUTH): a newer libpq would honour it, so asyncpg must not drop it.
    monkeypatch.setenv(variable, value.format(tmp=tmp_path))
    with pytest.raises(ConfigurationError, match=rf"\b{option}\b") as info:
        _asyncpg_connect(server)()
    assert f"the {variable} environment variable" in str(info.value) or option == "sslcertmode"
    if option not in LIBPQ:
        return  # libpq itself refuses a service-file key it does not know
    # The same from a service file, which only libpq's resolution shows.
    monkeypatch.delenv(variable)
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[app]\n{option}={value.format(tmp=tmp_path)}\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    with pytest.raises(ConfigurationError, match=rf"\b{option}\b"):
        _asyncpg_connect(server, service="app")()


@pytest.mark.parametrize("origin", ["env", "service"])
def test_asyncpg_sends_the_client_certificate_from_the_environment_or_a_service(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, origin: str
) -> None:
    client = server.ca.issue(common_name=server.cert_user, client=True)
    crt, key = client.write(tmp_path / "client.crt", tmp_path / "client.key")
    if origin == "env":
        monkeypatch.setenv("PGSSLCERT", str(crt))
        monkeypatch.setenv("PGSSLKEY", str(key))
    else:
        services = tmp_path / "pg_service.conf"
        services.write_text(f"[app]\nsslcert={crt}\nsslkey={key}\n")
        monkeypatch.setenv("PGSERVICEFILE", str(services))
        monkeypatch.setenv("PGSERVICE", "app")

    async def go() -> Any:
        conn = await safepg.asyncpg.connect(
            host=server.host,
            port=server.port,
            user=server.cert_user,
            database=server.dbname,
            sslrootcert=str(server.ca_path),
        )
        try:
            return await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()

    assert run(go()) == server.cert_user


def test_asyncpg_passes_start_up_settings_from_the_environment(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGAPPNAME", "from-env")
    monkeypatch.setenv("PGTZ", "Asia/Tokyo")

    async def go() -> Any:
        conn = await safepg.asyncpg.connect(server.url())
        try:
            return await conn.fetchrow(
                "SELECT current_setting('application_name') AS a, current_setting('TimeZone') AS t"
            )
        finally:
            await conn.close()

    row = run(go())
    assert (row["a"], row["t"]) == ("from-env", "Asia/Tokyo")


def test_settings_beside_your_own_context_are_refused(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crl = write_crl(tmp_path / "revoked.crl", server.ca, server.server_cert.cert)
    monkeypatch.setenv("PGSSLCRL", str(crl))
    # A context of your own that checks no CRL: asyncpg would use it as it is.
    ctx = ssl.create_default_context(cafile=str(server.ca_path))
    with pytest.raises(ConfigurationError, match=r"sslcrl is set .* beside your own"):
        _asyncpg_connect(server, ssl=ctx)()
    client = server.ca.issue(common_name=server.cert_user, client=True)
    crt, key = client.write(tmp_path / "client.crt", tmp_path / "client.key")
    monkeypatch.delenv("PGSSLCRL")
    monkeypatch.setenv("PGSSLCERT", str(crt))
    monkeypatch.setenv("PGSSLKEY", str(key))
    with pytest.raises(ConfigurationError, match=r"sslcert, sslkey is set .* beside your own"):
        _asyncpg_connect(server, ssl=ctx)()


@pytest.mark.parametrize("origin", ["argument", "env"])
def test_ssl_context_checks_the_crl(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, origin: str
) -> None:
    crl = write_crl(tmp_path / "revoked.crl", server.ca, server.server_cert.cert)
    if origin == "env":
        monkeypatch.setenv("PGSSLCRL", str(crl))
        ctx = safepg.ssl_context(server.host, sslrootcert=server.ca_path)
    else:
        ctx = safepg.ssl_context(server.host, sslrootcert=server.ca_path, sslcrl=crl)
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN == ssl.VERIFY_CRL_CHECK_CHAIN
    # Your context checks CRLs: safepg.asyncpg uses it, and the revoked server is refused.
    with pytest.raises(safepg.UntrustedCertificateError, match="revoked"):
        _asyncpg_connect(server, ssl=ctx)()


def test_your_context_must_check_the_very_crls_libpq_would(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safepg import _sslcontext

    revoking = write_crl(tmp_path / "revoked.crl", server.ca, server.server_cert.cert)
    other = write_crl(tmp_path / "other.crl", server.ca, server.ca.issue("x").cert)
    ctx = safepg.ssl_context(server.host, sslrootcert=server.ca_path, sslcrl=other)
    assert _sslcontext.checks_crls(ctx, other.read_bytes())
    # Made with other CRLs, or by anyone else, or no longer checking the chain: not enough.
    assert not _sslcontext.checks_crls(ctx, revoking.read_bytes())
    plain = safepg.ssl_context(server.host, sslrootcert=server.ca_path)
    assert not _sslcontext.checks_crls(plain, other.read_bytes())
    assert not _sslcontext.checks_crls(ssl.create_default_context(), other.read_bytes())
    # A context made with the CRLs the environment names: asyncpg uses it, and refuses the
    # server they revoke.
    monkeypatch.setenv("PGSSLCRL", str(revoking))
    with pytest.raises(ConfigurationError, match=r"sslcrl is set .* beside your own"):
        _asyncpg_connect(server, ssl=ctx)()
    cleared = safepg.ssl_context(server.host, sslrootcert=server.ca_path, sslcrl=revoking)
    assert _sslcontext.checks_crls(cleared, revoking.read_bytes())
    cleared.verify_flags &= ~ssl.VERIFY_CRL_CHECK_CHAIN
    assert not _sslcontext.checks_crls(cleared, revoking.read_bytes())
    with pytest.raises(ConfigurationError, match=r"sslcrl is set .* beside your own"):
        _asyncpg_connect(server, ssl=cleared)()


def test_ssl_context_refuses_a_crl_directory(
    server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSSLCRLDIR", str(tmp_path))
    with pytest.raises(ConfigurationError, match="PGSSLCRLDIR is set"):
        safepg.ssl_context(server.host, sslrootcert=server.ca_path)


# -- libpq paths: a revocation list must not add trust anchors -----------------------------------


@pytest.mark.parametrize("origin", ["url", "env", "service", "default"])
def test_a_crl_file_holding_a_certificate_is_refused_before_libpq_trusts_it(
    server: PostgresServer,
    certs: Any,
    rogue_ca: CertificateAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clean_env: Path,
    origin: str,
) -> None:
    # OpenSSL loads certificates from libpq's CRL file as trust anchors: with the rogue CA in
    # it, libpq verified a rogue certificate while safepg reported "trusting sslrootcert".
    certs.present("localhost", ca=rogue_ca, ip_addresses=["127.0.0.1"])
    crl = tmp_path / "mixed.crl"
    crl.write_bytes(
        write_crl(tmp_path / "a.crl", server.ca).read_bytes()
        + write_crl(tmp_path / "b.crl", rogue_ca).read_bytes()
        + rogue_ca.cert_pem
    )
    url = server.url()
    if origin == "url":
        url += "&sslcrl=" + quote(str(crl), safe="")
    elif origin == "default":  # libpq reads ~/.postgresql/root.crl when sslcrl is not set
        (clean_env / ".postgresql").mkdir()
        (clean_env / ".postgresql" / "root.crl").write_bytes(crl.read_bytes())
    else:
        _set_crl(origin, crl, tmp_path, monkeypatch)
    with pytest.raises(ConfigurationError, match=r"must hold PEM CRLs .* and nothing else"):
        safepg.connect(url).close()


def test_a_crl_directory_holding_a_certificate_is_refused(
    server: PostgresServer,
    certs: Any,
    rogue_ca: CertificateAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command for certificate hashes")
    certs.present("localhost", ca=rogue_ca, ip_addresses=["127.0.0.1"])
    crldir = tmp_path / "crls"
    crldir.mkdir()
    # How c_rehash names a CA certificate (subject hash .0): OpenSSL's directory lookup
    # finds the issuer there, and libpq verified a rogue certificate with it.

    def subject_hash(ca: CertificateAuthority) -> str:
        return (
            subprocess.run(
                ["openssl", "x509", "-noout", "-subject_hash"],
                input=ca.cert_pem,
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .strip()
        )

    # The rogue CA's certificate, and a CRL of each CA (libpq checks the whole chain).
    (crldir / f"{subject_hash(rogue_ca)}.0").write_bytes(rogue_ca.cert_pem)
    write_crl(crldir / f"{subject_hash(rogue_ca)}.r0", rogue_ca)
    write_crl(crldir / f"{subject_hash(server.ca)}.r0", server.ca)
    rogue = subject_hash(rogue_ca)
    monkeypatch.setenv("PGSSLCRLDIR", str(crldir))
    with pytest.raises(ConfigurationError, match=rf"holds {rogue}\.0, which OpenSSL"):
        safepg.connect(server.url()).close()


def test_asyncpg_reads_pgsslnegotiation_whatever_libpq_runs(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libpq 15 has no PGSSLNEGOTIATION; asyncpg gets it all the same.
    monkeypatch.setenv("PGSSLNEGOTIATION", "direct")
    monkeypatch.setenv("PGSSLMODE", "verify-full")  # libpq 17+ refuses direct with prefer
    with pytest.raises(ConfigurationError, match="direct_tls=False and sslnegotiation=direct"):
        _asyncpg_connect(server, direct_tls=False)()


def test_variables_no_supported_libpq_reads_are_left_alone(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PGREQUIRESSL, PGTTY, PGAUTHTYPE: gone before libpq 14; a leftover in a shell profile.
    for name in ("PGREQUIRESSL", "PGTTY", "PGAUTHTYPE"):
        monkeypatch.setenv(name, "1")
    assert _asyncpg_connect(server)() == server.user
    safepg.connect(server.url()).close()


def connect_in_child(conninfo: str, swap: bool) -> str:
    from .test_guarantees import NOBODY, in_child

    def run() -> str:
        if swap:
            # real user nobody, effective user root (a setuid-root launcher, or a service
            # that swapped its ids with setreuid to act for a user)
            os.setreuid(NOBODY, 0)
        try:
            with safepg.connect(conninfo, fast_path=False) as conn:
                return "connected: " + str(conn.execute("select 1").fetchone())
        except Exception as ex:  # reported to the parent
            return f"{type(ex).__name__}: {str(ex)[:160]}"

    return str(in_child(run))


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing user needs root"
)
def test_the_default_root_crl_is_checked_as_the_effective_user_reads_it(
    server: PostgresServer,
    clean_env: Path,
    rogue_ca: CertificateAuthority,
    certs: CertificateShop,
    tmp_path: Path,
) -> None:
    home = clean_env  # HOME, root's, mode 0700 (like /root)
    os.chmod(home, 0o700)
    pg = home / ".postgresql"
    pg.mkdir()
    crl = write_crl(tmp_path / "r.crl", rogue_ca)
    (pg / "root.crl").write_bytes(crl.read_bytes() + rogue_ca.cert_pem)  # a CA in root.crl
    conninfo = server.conninfo(sslrootcert=str(server.ca_path))
    # Control: as root/root, safepg refuses the file (docs/security.md row).
    assert connect_in_child(conninfo, swap=False).startswith("ConfigurationError")
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)  # a man in the middle
    try:
        got = connect_in_child(conninfo, swap=True)
    finally:
        certs.present("localhost", ip_addresses=["127.0.0.1"])
    assert not got.startswith("connected"), got
