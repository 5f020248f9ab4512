"""safepg.asyncpg against the real TLS server: verified, or refused with safepg's errors."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

import safepg
from safepg import (
    CertificateExpiredError,
    ConfigurationError,
    HostnameMismatchError,
    ProtocolViolationError,
    SafePGError,
    SSLNotSupportedError,
    UntrustedCertificateError,
)
from safepg.testing import CertificateAuthority, PostgresServer

from . import adversaries
from .adversaries import Adversary
from .conftest import EXPIRED_ON, CertificateShop
from .test_pgbouncer import PGBOUNCER, PgBouncer, bouncer  # noqa: F401 - the fixture

asyncpg = pytest.importorskip("asyncpg")
import safepg.asyncpg  # noqa: E402

T = TypeVar("T")
NOW = dt.datetime.now(dt.timezone.utc)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def kwargs(server: PostgresServer, **overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "password": server.password,
        "database": server.dbname,
        "sslrootcert": str(server.ca_path),
    }
    params.update(overrides)
    return params


async def _query(connect: Callable[[], Awaitable[Any]]) -> tuple[Any, str | None]:
    conn = await connect()
    try:
        value = await conn.fetchval("SELECT 1")
        ssl_row = await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        version = conn._transport.get_extra_info("ssl_object").version()
        assert ssl_row is True
        return value, version
    finally:
        await conn.close()


def test_connect_with_a_dsn_is_verified(server: PostgresServer) -> None:
    value, version = run(_query(lambda: safepg.asyncpg.connect(server.url())))
    assert value == 1
    assert version in ("TLSv1.2", "TLSv1.3")


def test_connect_with_keywords_returns_asyncpg_connection(server: PostgresServer) -> None:
    async def main() -> None:
        conn = await safepg.asyncpg.connect(**kwargs(server))
        try:
            assert isinstance(conn, asyncpg.Connection)
            assert await conn.fetchval("SELECT current_user") == server.user
        finally:
            await conn.close()

    run(main())


def test_a_password_callable_is_called_for_every_connection(server: PostgresServer) -> None:
    calls: list[safepg.ConnectTarget] = []

    async def token(target: safepg.ConnectTarget) -> str:
        calls.append(target)
        return server.password

    async def main() -> None:
        conn = await safepg.asyncpg.connect(**kwargs(server, password=token))
        await conn.close()
        async with safepg.asyncpg.create_pool(
            **kwargs(server, password=lambda: server.password), min_size=2, max_size=2
        ) as pool:
            assert await pool.fetchval("SELECT 1") == 1
        with pytest.raises(safepg.ConfigurationError, match="Unix-domain socket"):
            await safepg.asyncpg.connect(
                **kwargs(server, host=str(server.socket_dir), password=token),
                allow_unencrypted_unix_socket=True,
            )

    run(main())
    assert [t.host for t in calls] == [server.host]  # not called for the socket


@pytest.mark.parametrize("weak", ["disable", "prefer", "require", "verify-ca", False])
def test_weak_ssl_keyword_is_raised_and_logged(
    server: PostgresServer, weak: object, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="safepg"):
        value, _ = run(_query(lambda: safepg.asyncpg.connect(**kwargs(server, ssl=weak))))
    assert value == 1
    assert "raised to verify-full" in caplog.text


@pytest.mark.parametrize("where", ["dsn", "sslmode", "env"])
def test_sslmode_disable_anywhere_is_raised(
    server: PostgresServer, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = server.url()
    extra: dict[str, Any] = {}
    if where == "dsn":
        dsn += "&sslmode=disable"
    elif where == "sslmode":
        extra["sslmode"] = "disable"
    else:
        monkeypatch.setenv("PGSSLMODE", "disable")
    value, _ = run(_query(lambda: safepg.asyncpg.connect(dsn, **extra)))
    assert value == 1


def test_a_context_that_does_not_verify_is_refused(server: PostgresServer) -> None:
    import ssl

    lax = ssl.create_default_context()
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    with pytest.raises(ConfigurationError, match="does not verify"):
        run(safepg.asyncpg.connect(**kwargs(server, ssl=lax)))


def test_a_verifying_context_of_the_callers_is_used(server: PostgresServer) -> None:
    ctx = safepg.ssl_context(server.host, sslrootcert=server.ca_path)
    value, _ = run(_query(lambda: safepg.asyncpg.connect(**kwargs(server, ssl=ctx))))
    assert value == 1


@pytest.mark.parametrize("host", ["/tmp", "@abstract"])
def test_socket_host_is_refused(server: PostgresServer, host: str) -> None:
    with pytest.raises(ConfigurationError, match="Unix-domain socket"):
        run(safepg.asyncpg.connect(**kwargs(server, host=host)))


def test_socket_from_the_dsn_query_is_refused(server: PostgresServer) -> None:
    with pytest.raises(ConfigurationError, match="Unix-domain socket"):
        run(safepg.asyncpg.connect(server.url() + "&host=/tmp"))


def test_socket_opt_in(server: PostgresServer) -> None:
    async def main() -> None:
        conn = await safepg.asyncpg.connect(
            host=str(server.socket_dir),
            port=server.port,
            user="postgres",
            database="postgres",
            allow_unencrypted_unix_socket=True,
        )
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()

    run(main())


def test_session_check_refuses_a_socket_without_the_opt_in(server: PostgresServer) -> None:
    """Defence in depth: the post-connect check itself refuses an unencrypted session."""
    from safepg import _params

    async def main() -> str | None:
        conn = await safepg.asyncpg.connect(
            host=str(server.socket_dir),
            port=server.port,
            user="postgres",
            database="postgres",
            allow_unencrypted_unix_socket=True,
        )
        try:
            plan = _params.build_plan(server.conninfo(), {})  # no opt-in
            return safepg.asyncpg._session_problem(conn, plan)
        finally:
            await conn.close()

    assert run(main()) == "the session is not encrypted"


def test_unknown_dsn_option_is_refused(server: PostgresServer) -> None:
    with pytest.raises(ConfigurationError, match="hostaddr"):
        run(safepg.asyncpg.connect(server.url() + "&hostaddr=127.0.0.1"))
    with pytest.raises(ConfigurationError, match="sslcrl"):
        run(safepg.asyncpg.connect(server.url() + "&sslcrl=/nonexistent"))


def test_wrong_host_name(server: PostgresServer, certs: CertificateShop) -> None:
    certs.present("other.example")
    with pytest.raises(HostnameMismatchError) as info:
        run(safepg.asyncpg.connect(**kwargs(server)))
    err = info.value
    assert isinstance(err, psycopg.OperationalError)
    assert "other.example" in str(err)
    assert err.certificate_names == ("other.example",)
    assert str(server.ca_path) in str(err)
    assert err.__cause__ is not None


def test_rogue_ca(
    server: PostgresServer, certs: CertificateShop, rogue_ca: CertificateAuthority
) -> None:
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    with pytest.raises(UntrustedCertificateError) as info:
        run(safepg.asyncpg.connect(**kwargs(server)))
    assert type(info.value) is UntrustedCertificateError
    assert 'issuer "commonName=rogue CA" is not among them' in str(info.value)
    assert "sslrootcert from the keyword argument sslrootcert" in str(info.value)


@pytest.mark.parametrize("how", ["rogue CA", "no checks"])
def test_the_shared_context_cannot_be_weakened(
    server: PostgresServer,
    certs: CertificateShop,
    rogue_ca: CertificateAuthority,
    tmp_path: Path,
    how: str,
) -> None:
    rogue = rogue_ca.write_cert(tmp_path / "rogue.pem")
    weakenings: list[Callable[[ssl.SSLContext], object]]
    if how == "rogue CA":  # still verifies, against the attacker's CA too
        weakenings = [lambda ctx: ctx.load_verify_locations(cafile=str(rogue))]
    else:
        weakenings = [
            lambda ctx: ctx.load_default_certs(),
            lambda ctx: ctx.set_ciphers("ALL:eNULL"),
            lambda ctx: setattr(ctx, "check_hostname", False),
            lambda ctx: setattr(ctx, "verify_mode", ssl.CERT_NONE),
            lambda ctx: setattr(ctx, "keylog_filename", str(tmp_path / "keys.log")),
            lambda ctx: setattr(ctx, "__class__", ssl.SSLContext),
        ]
    refused: list[str] = []

    async def weaken() -> None:
        conn = await safepg.asyncpg.connect(**kwargs(server))
        try:
            ctx = conn._transport.get_extra_info("sslcontext")
            for weakening in weakenings:
                try:
                    weakening(ctx)
                except AttributeError as ex:
                    refused.append(str(ex))
        finally:
            await conn.close()

    run(weaken())
    # Whatever the holder did, the next connection to a rogue server is refused.
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    with pytest.raises(UntrustedCertificateError):
        run(safepg.asyncpg.connect(**kwargs(server)))
    certs.present("wrong.example")  # the right CA, another name
    with pytest.raises(HostnameMismatchError):
        run(safepg.asyncpg.connect(**kwargs(server)))
    assert len(refused) == len(weakenings)
    assert all("shared by safepg's connections" in r for r in refused)
    assert not (tmp_path / "keys.log").exists()


def test_expired_certificate(server: PostgresServer, certs: CertificateShop) -> None:
    certs.present_expired()
    with pytest.raises(CertificateExpiredError) as info:
        run(safepg.asyncpg.connect(**kwargs(server)))
    expired_on = EXPIRED_ON.strftime("%Y-%m-%d")
    assert f"expired on {expired_on}" in str(info.value)


def test_tls_off(server: PostgresServer) -> None:
    with server.ssl_disabled(), pytest.raises(SSLNotSupportedError):
        run(safepg.asyncpg.connect(**kwargs(server)))


def test_pool_verifies_every_connection(server: PostgresServer) -> None:
    async def main() -> None:
        async with safepg.asyncpg.create_pool(server.url(), min_size=3, max_size=3) as pool:
            conns = [await pool.acquire() for _ in range(3)]
            try:
                for conn in conns:
                    assert conn._con._transport.get_extra_info("ssl_object") is not None
                    assert await conn.fetchval(
                        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                    )
            finally:
                for conn in conns:
                    await pool.release(conn)

    run(main())


def test_pool_refuses_bad_arguments_at_once(server: PostgresServer) -> None:
    with pytest.raises(ConfigurationError, match="Unix-domain socket"):
        safepg.asyncpg.create_pool(host="/tmp")
    with pytest.raises(ConfigurationError, match="without safepg"):
        safepg.asyncpg.create_pool(server.url(), connect=asyncpg.connect)


def test_pool_connection_to_an_untrusted_server_fails(
    server: PostgresServer, certs: CertificateShop, rogue_ca: CertificateAuthority
) -> None:
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)

    async def main() -> None:
        async with safepg.asyncpg.create_pool(server.url(), min_size=1, max_size=1):
            pass

    with pytest.raises(UntrustedCertificateError):
        run(main())


def test_password_never_in_errors(server: PostgresServer, certs: CertificateShop) -> None:
    certs.present("other.example")
    with pytest.raises(HostnameMismatchError) as info:
        run(safepg.asyncpg.connect(server.url()))
    assert server.password not in str(info.value)
    assert server.password not in repr(info.value)


def test_direct_tls_is_learned(server: PostgresServer) -> None:
    safepg.asyncpg._direct.clear()
    run(_query(lambda: safepg.asyncpg.connect(server.url())))
    key = ((server.host, str(server.port)),)
    assert safepg.asyncpg._direct[key] is (server.major_version >= 17)
    run(_query(lambda: safepg.asyncpg.connect(server.url())))  # warm: direct when learned


def test_learned_direct_tls_refused_falls_back(
    server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A host learned to take direct TLS that no longer does (a pooler put in front, an older
    server) is retried once with the SSLRequest, and remembered."""
    if server.major_version >= 17:
        pytest.skip("this server takes direct TLS")
    key = ((server.host, str(server.port)),)
    safepg.asyncpg._direct[key] = True
    with caplog.at_level(logging.INFO, logger="safepg"):
        value, _ = run(_query(lambda: safepg.asyncpg.connect(server.url())))
    assert value == 1
    assert safepg.asyncpg._direct[key] is False
    assert "refused direct TLS" in caplog.text


# -- attackers on the network path (the adversaries of test_hostile_network.py) ----------------

CONNECT_TIMEOUT = 2
DEADLINE = CONNECT_TIMEOUT * 1.5 + 1.5
PASSWORD = "hostile-S3cret-pw"


def attack(adversary: Adversary, trust: str) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises((OSError, psycopg.OperationalError, asyncio.TimeoutError)) as info:
        run(
            safepg.asyncpg.connect(
                host="localhost",
                port=adversary.port,
                user="app",
                database="app",
                password=PASSWORD,
                timeout=CONNECT_TIMEOUT,
                sslrootcert=trust,
            )
        )
    elapsed = time.monotonic() - started
    err = info.value
    assert PASSWORD not in str(err)
    assert PASSWORD not in repr(err)
    assert elapsed < DEADLINE, f"took {elapsed:.1f}s"
    adversary.close()  # joins the handlers, so that everything received is recorded
    assert adversary.received == [], "the client sent data past the attack"
    return err, elapsed


def test_downgrade_answer_n(server: PostgresServer) -> None:
    with adversaries.running(adversaries.answer_n) as adversary:
        err, _ = attack(adversary, str(server.ca_path))
    assert isinstance(err, SSLNotSupportedError)


def test_bytes_injected_after_s(server: PostgresServer, tmp_path: Path) -> None:
    ctx = adversaries.server_context(server.default_certificate, tmp_path)
    with adversaries.running(adversaries.inject_after_s(ctx)) as adversary:
        err, _ = attack(adversary, str(server.ca_path))
    assert isinstance(err, ProtocolViolationError)
    assert "R\\x00" not in str(err)


def test_error_response_before_tls_is_not_shown(
    server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG), adversaries.running(adversaries.error_before_tls) as a:
        err, _ = attack(a, str(server.ca_path))
    assert isinstance(err, ProtocolViolationError)
    assert "evil.example" not in str(err)
    assert "evil.example" not in caplog.text


def test_self_signed_certificate(server: PostgresServer, tmp_path: Path) -> None:
    lone = CertificateAuthority("self-signed impostor")
    ctx = adversaries.server_context(lone.issue("localhost", ip_addresses=["127.0.0.1"]), tmp_path)
    with adversaries.running(adversaries.present(ctx)) as adversary:
        err, _ = attack(adversary, str(server.ca_path))
    assert isinstance(err, UntrustedCertificateError)


def test_right_name_from_a_rogue_ca(
    server: PostgresServer, tmp_path: Path, rogue_ca: CertificateAuthority
) -> None:
    cert = rogue_ca.issue("localhost", ip_addresses=["127.0.0.1"])
    with adversaries.running(adversaries.present(adversaries.server_context(cert, tmp_path))) as a:
        err, _ = attack(a, str(server.ca_path))
    assert isinstance(err, UntrustedCertificateError)
    assert "rogue CA" in str(err)


def test_valid_certificate_for_another_name(server: PostgresServer, tmp_path: Path) -> None:
    cert = server.issue_certificate("other.example")
    with adversaries.running(adversaries.present(adversaries.server_context(cert, tmp_path))) as a:
        err, _ = attack(a, str(server.ca_path))
    assert isinstance(err, HostnameMismatchError)


def test_reset_mid_handshake(server: PostgresServer) -> None:
    with adversaries.running(adversaries.reset_mid_handshake) as adversary:
        err, _ = attack(adversary, str(server.ca_path))
    assert not isinstance(err, SafePGError)  # a network failure, reported as asyncpg does


def test_stall_is_bounded_by_the_timeout(server: PostgresServer) -> None:
    with adversaries.running(adversaries.stall) as adversary:
        err, elapsed = attack(adversary, str(server.ca_path))
    assert isinstance(err, (asyncio.TimeoutError, TimeoutError))
    assert elapsed >= CONNECT_TIMEOUT - 0.5


def test_tls_terminating_proxy_is_refused(
    server: PostgresServer, rogue_ca: CertificateAuthority, tmp_path: Path
) -> None:
    cert = rogue_ca.issue("localhost", ip_addresses=["127.0.0.1"])
    proxy = adversaries.tls_proxy(
        adversaries.server_context(cert, tmp_path), server.port, server.ca_path
    )
    with adversaries.running(proxy) as middlebox:
        with pytest.raises(UntrustedCertificateError):
            run(safepg.asyncpg.connect(**kwargs(server, host="localhost", port=middlebox.port)))
        middlebox.close()
        assert middlebox.received == []


# -- PgBouncer ---------------------------------------------------------------------------------


@pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed")
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_verified_through_pgbouncer(bouncer: PgBouncer, mode: str) -> None:  # noqa: F811
    server = bouncer.server

    async def main() -> None:
        conn = await safepg.asyncpg.connect(
            **kwargs(server, port=bouncer.port, database=mode), statement_cache_size=0
        )
        try:
            assert await conn.fetchval("SELECT 1") == 1
            assert conn._transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        finally:
            await conn.close()

    run(main())


# -- SQLAlchemy: postgresql+asyncpg:// -----------------------------------------------------------


def asyncpg_url(server: PostgresServer, query: str = "") -> str:
    return server.url(scheme="postgresql+asyncpg") + query


def test_sqlalchemy_async_engine_with_an_asyncpg_url(server: PostgresServer) -> None:
    import sqlalchemy

    import safepg.sqlalchemy

    engine = safepg.sqlalchemy.create_async_engine(
        asyncpg_url(server, "&sslmode=disable&application_name=shop"), pool_size=2
    )
    assert engine.dialect.driver == "asyncpg"

    async def main() -> None:
        try:
            for _ in range(3):
                async with engine.connect() as conn:
                    row = (
                        await conn.execute(
                            sqlalchemy.text(
                                "SELECT ssl, current_setting('application_name') FROM pg_stat_ssl"
                                " WHERE pid = pg_backend_pid()"
                            )
                        )
                    ).one()
                    assert tuple(row) == (True, "shop")
                    raw = await conn.get_raw_connection()
                    assert isinstance(raw.driver_connection, asyncpg.Connection)
        finally:
            await engine.dispose()

    run(main())


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("&host=/var/run/postgresql", "Unix-domain socket"),
        # Refused; not named, as the test server's URL holds a password (a key of its query
        # may be a piece of a badly escaped one).
        ("&search_path=evil", "not one safepg passes to asyncpg"),
        ("&timeout=soon", "must be a number"),
        ("&ssl=maybe", "ssl= must be"),
        # float() and int() take these: nan or inf would disable the deadline.
        ("&timeout=nan", "timeout must be a number of seconds above 0"),
        ("&timeout=inf", "timeout must be a number of seconds above 0"),
        ("&timeout=-1", "timeout must be a number of seconds above 0"),
        ("&timeout=0", "timeout must be a number of seconds above 0"),
        ("&command_timeout=1e9", "command_timeout must be a number of seconds"),
        ("&timeout=%D9%A1%D9%A2", "timeout must be a number of seconds"),  # Arabic-Indic 12
        ("&statement_cache_size=-1", "statement_cache_size must be a whole number"),
        ("&statement_cache_size=%EF%BC%91", "statement_cache_size must be a whole number"),
        ("&direct_tls=maybe", "direct_tls"),
        ("&connect_timeout=" + "9" * 400, "connect_timeout must be a whole number"),
        ("&connect_timeout=99999999999999999999999", "connect_timeout must be a whole number"),
    ],
)
def test_sqlalchemy_asyncpg_url_refusals(server: PostgresServer, query: str, message: str) -> None:
    import safepg.sqlalchemy

    with pytest.raises(ConfigurationError, match=message):
        safepg.sqlalchemy.create_async_engine(asyncpg_url(server, query))


def test_sqlalchemy_asyncpg_engine_fails_closed(
    server: PostgresServer, certs: CertificateShop, rogue_ca: CertificateAuthority
) -> None:
    import safepg.sqlalchemy

    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)
    engine = safepg.sqlalchemy.create_async_engine(asyncpg_url(server, "&sslmode=require"))

    async def main() -> None:
        try:
            async with engine.connect():
                pass
        finally:
            await engine.dispose()

    with pytest.raises(UntrustedCertificateError):
        run(main())


def test_url_connect_timeout_0_is_libpqs_no_timeout(server: PostgresServer) -> None:
    import safepg.sqlalchemy

    engine = safepg.sqlalchemy.create_async_engine(asyncpg_url(server, "&connect_timeout=0"))

    async def main() -> None:
        try:
            async with engine.connect() as conn:
                assert (await conn.exec_driver_sql("SELECT 1")).scalar() == 1
        finally:
            await engine.dispose()

    run(main())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": float("nan")}, "timeout must be a finite number"),
        ({"command_timeout": 10**400}, "command_timeout must be a finite number"),
        ({"command_timeout": float("inf")}, "command_timeout must be a finite number"),
        ({"timeout": "5"}, "timeout must be a number of seconds; got a str"),
        ({"timeout": True}, "timeout must be a number of seconds; got a bool"),
        ({"direct_tls": "maybe"}, "direct_tls"),
        ({"host": b"localhost"}, "host must be a str or an int"),
        ({"port": True}, "port must be a str or an int"),
        ({"port": [5432, None]}, "port must be a str or an int"),
        ({"port": 70000}, "port"),
        ({"port": "5432x"}, "port"),
    ],
)
def test_bad_arguments_are_refused_before_any_io(
    server: PostgresServer, kwargs: dict[str, Any], message: str
) -> None:
    args = {"host": server.host, "port": server.port, "sslrootcert": str(server.ca_path), **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        safepg.asyncpg.check_arguments(None, args)
    with pytest.raises(ConfigurationError, match=message):
        run(safepg.asyncpg.connect(**args))
    with pytest.raises(ConfigurationError, match=message):
        safepg.asyncpg.create_pool(**args)


def test_sync_engine_still_refuses_asyncpg_urls(server: PostgresServer) -> None:
    import safepg.sqlalchemy

    with pytest.raises(ConfigurationError, match="create_async_engine"):
        safepg.sqlalchemy.create_engine(asyncpg_url(server))


@pytest.mark.matrix
def test_direct_tls_learned_and_used_against_postgresql_18() -> None:
    with PostgresServer(version=18) as pg18:
        safepg.asyncpg._direct.clear()

        async def main() -> tuple[str, str]:
            versions = []
            for _ in range(2):  # cold: the SSLRequest, and learn; warm: TLS straight away
                conn = await safepg.asyncpg.connect(pg18.url())
                try:
                    assert await conn.fetchval("SELECT 1") == 1
                    assert conn._transport.get_extra_info("ssl_object") is not None
                    versions.append(conn._params.ssl_negotiation.name)
                finally:
                    await conn.close()
            return versions[0], versions[1]

        cold, warm = run(main())
        assert safepg.asyncpg._direct[((pg18.host, str(pg18.port)),)] is True
        assert (cold, warm) == ("postgres", "direct")


def test_example(server: PostgresServer) -> None:
    import subprocess
    import sys

    example = Path(__file__).parent.parent / "examples" / "asyncpg_app.py"
    proc = subprocess.run(
        [sys.executable, str(example), server.url()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verified TLSv1." in proc.stdout
    assert "verified pool: sum = 55" in proc.stdout
    wrong = server.url().replace(f"@{server.host}:", "@db.example.com:")
    proc = subprocess.run(
        [sys.executable, str(example), wrong], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode in (1, 2)


def test_downgrade_answer_n_with_the_callers_context(server: PostgresServer) -> None:
    # The caller's own verifying context: safepg has no CA file to probe with, yet a server
    # that answers N is still "no TLS", not "plaintext injected".
    ctx = safepg.ssl_context("localhost", sslrootcert=server.ca_path)
    with adversaries.running(adversaries.answer_n) as adversary:
        with pytest.raises(SSLNotSupportedError) as info:
            run(
                safepg.asyncpg.connect(
                    host="localhost",
                    port=adversary.port,
                    user="app",
                    database="app",
                    password=PASSWORD,
                    timeout=CONNECT_TIMEOUT,
                    ssl=ctx,
                )
            )
        adversary.close()
        assert adversary.received == []
    assert PASSWORD not in str(info.value)


def test_bytes_injected_after_s_with_the_callers_context(
    server: PostgresServer, tmp_path: Path
) -> None:
    ctx = adversaries.server_context(server.default_certificate, tmp_path)
    mine = safepg.ssl_context("localhost", sslrootcert=server.ca_path)
    with adversaries.running(adversaries.inject_after_s(ctx)) as adversary:
        with pytest.raises(ProtocolViolationError):
            run(
                safepg.asyncpg.connect(
                    host="localhost",
                    port=adversary.port,
                    user="app",
                    database="app",
                    password=PASSWORD,
                    timeout=CONNECT_TIMEOUT,
                    ssl=mine,
                )
            )
        adversary.close()
        assert adversary.received == []


# -- decisions the mutation stage showed untested (mutation/RESULTS.md) -----------------------


def test_sslnegotiation_direct_and_direct_tls_false_disagree() -> None:
    from safepg.asyncpg import _direct_tls

    with pytest.raises(ConfigurationError, match="disagree"):
        _direct_tls("direct", False, ())
    assert _direct_tls("direct", None, ()) is True  # sslnegotiation=direct means direct TLS
    assert _direct_tls("direct", True, ()) is True
    assert _direct_tls("postgres", False, ()) is False
    with pytest.raises(ConfigurationError, match="must be postgres or direct"):
        _direct_tls("other", None, ())


def test_an_asyncpg_without_direct_tls_refuses_to_be_asked_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As with asyncpg before 0.30, which has no direct_tls: asked for it, refuse; else None.
    from safepg import asyncpg as safepg_asyncpg

    monkeypatch.setattr(safepg_asyncpg, "_HAS_DIRECT_TLS", False)
    with pytest.raises(ConfigurationError, match=r"needs asyncpg 0\.30"):
        safepg_asyncpg._direct_tls("direct", None, ())
    with pytest.raises(ConfigurationError, match=r"needs asyncpg 0\.30"):
        safepg_asyncpg._direct_tls("postgres", True, ())
    assert safepg_asyncpg._direct_tls("postgres", None, ()) is None


def test_a_weak_ssl_does_not_skip_the_check_of_sslmode(caplog: pytest.LogCaptureFixture) -> None:
    from safepg.asyncpg import _caller_context

    with pytest.raises(ConfigurationError, match="sslmode= must be"):
        _caller_context(False, "bogus")
    with pytest.raises(ConfigurationError, match="sslmode= must be"):
        _caller_context("disable", 42)
    # Nothing given for ssl= (or True, or verify-full): sslmode is still checked.
    for ssl_arg in (None, True, "verify-full"):
        with pytest.raises(ConfigurationError, match="sslmode= must be"):
            _caller_context(ssl_arg, "bogus")
        assert _caller_context(ssl_arg, None) is None
        assert _caller_context(ssl_arg, "verify-full") is None
