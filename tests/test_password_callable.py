"""password= as a callable: a fresh token for every physical connection, over verified TLS only.

The tokens here are real passwords of a real role: each call of `Rotating` sets a new password
for the role on the server, so a token that was frozen (reused by a pool, or cached) fails.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import safepg
import safepg.sqlalchemy as sp
from safepg import ConfigurationError, ConnectTarget, TokenRejectedError
from safepg.pool import AsyncConnectionPool, ConnectionPool
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop
from .test_fastpath import big_bundle, second_ca

__all__ = ["big_bundle", "second_ca"]  # fixtures, shared

TESTS = str(Path(__file__).parent)


class Rotating:
    """A password provider backed by a real role: every call gives the role a new password."""

    def __init__(self, server: PostgresServer, role: str) -> None:
        self.server = server
        self.role = role
        self.targets: list[ConnectTarget] = []
        self.tokens: list[str] = []

    def __call__(self, target: ConnectTarget) -> str:
        token = "tok-" + secrets.token_urlsafe(24)
        set_password(self.server, self.role, token)
        self.targets.append(target)
        self.tokens.append(token)
        return token


def set_password(server: PostgresServer, role: str, password: str) -> None:
    with server.admin_connect() as admin:
        admin.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
        )


@pytest.fixture
def role(server: PostgresServer) -> Iterator[str]:
    """A login role of its own, allowed into the test database."""
    name = "tok_" + secrets.token_hex(4)
    with server.admin_connect() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        admin.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(server.dbname), sql.Identifier(name)
            )
        )
    yield name
    with server.admin_connect() as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [name]
        )
        admin.execute(
            sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(
                sql.Identifier(server.dbname), sql.Identifier(name)
            )
        )
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def rotating(server: PostgresServer, role: str) -> Rotating:
    return Rotating(server, role)


def conninfo(server: PostgresServer, role: str) -> str:
    """The server's conninfo for *role*, with no password in it."""
    return server.conninfo(user=role, password=None)


def url(server: PostgresServer, role: str) -> str:
    return server.url().replace(f"{server.user}:{server.password}@", f"{role}@")


def current_user(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT current_user").fetchone()
    assert row is not None
    return str(row[0])


def all_text(err: BaseException) -> str:
    """Everything an error report could show: the traceback, reprs, and the locals of every
    frame but the tests' own (whose test functions hold the token they made)."""
    parts = ["".join(traceback.format_exception(type(err), err, err.__traceback__)), repr(err)]
    seen: BaseException | None = err
    while seen is not None:
        tb = seen.__traceback__
        while tb is not None:
            if not tb.tb_frame.f_code.co_filename.startswith(TESTS):
                parts.extend(repr(v) for v in tb.tb_frame.f_locals.values())
            tb = tb.tb_next
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


# -- safepg.connect ----------------------------------------------------------------------------


def test_a_fresh_token_for_every_connection(server: PostgresServer, rotating: Rotating) -> None:
    for _ in range(3):
        with safepg.connect(conninfo(server, rotating.role), password=rotating) as conn:
            assert current_user(conn) == rotating.role
            assert safepg.check(conn).verified
    assert len(set(rotating.tokens)) == 3  # each token worked, and only the newest is valid
    assert set(rotating.targets) == {
        ConnectTarget(server.host, server.port, rotating.role, server.dbname, (server.host,))
    }


def test_a_retried_attempt_calls_the_callable_again(
    server: PostgresServer,
    certs: CertificateShop,
    rotating: Rotating,
    big_bundle: Path,
    second_ca: CertificateAuthority,
) -> None:
    info = server.conninfo(user=rotating.role, password=None, sslrootcert=str(big_bundle))
    safepg.connect(info, password=rotating).close()  # the fast path learns the anchor
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=second_ca)  # a CA rotation
    with safepg.connect(info, password=rotating) as conn:  # the small file fails: one retry
        assert current_user(conn) == rotating.role
    assert len(rotating.tokens) == 3  # one per physical attempt


def test_a_callable_with_no_arguments(server: PostgresServer) -> None:
    calls: list[None] = []

    def password() -> str:
        calls.append(None)
        return server.password

    with safepg.connect(server.conninfo(password=None), password=password) as conn:
        assert current_user(conn) == server.user
    with safepg.connect(server.conninfo(password=None), password=password, fast_path=False):
        pass
    assert len(calls) == 2


def test_a_callable_overrides_the_urls_password(server: PostgresServer) -> None:
    with safepg.connect(server.url(), password=lambda: server.password) as conn:
        assert current_user(conn) == server.user
    with pytest.raises(psycopg.OperationalError):
        safepg.connect(server.url(), password=lambda: "not-" + server.password)


def test_a_rejected_token_says_what_to_check(
    server: PostgresServer, role: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    set_password(server, role, "something-else-" + secrets.token_hex(8))
    with caplog.at_level(logging.DEBUG), pytest.raises(TokenRejectedError) as info:
        safepg.connect(conninfo(server, role), password=lambda: token)
    err = info.value
    assert isinstance(err, psycopg.OperationalError)
    assert "password authentication failed" in str(err)
    assert "this host, port and user" in str(err)
    assert token not in all_text(err)
    assert token not in caplog.text


def test_a_socket_host_is_refused_before_the_callable_is_called(server: PostgresServer) -> None:
    calls: list[ConnectTarget] = []

    def provider(target: ConnectTarget) -> str:
        calls.append(target)
        return server.password

    with pytest.raises(ConfigurationError, match="Unix-domain socket"):
        safepg.connect(
            server.conninfo(host=str(server.socket_dir), password=None),
            password=provider,
            allow_unencrypted_unix_socket=True,
        )
    with pytest.raises(ConfigurationError, match="Unix-domain socket"):
        safepg.connect(
            host=f"{server.host},{server.socket_dir}",
            port=server.port,
            password=provider,
            allow_unencrypted_unix_socket=True,
        )
    assert calls == []
    # A plain password over the socket, as opted in, still works.
    with safepg.connect(
        server.conninfo(host=str(server.socket_dir)), allow_unencrypted_unix_socket=True
    ):
        pass


@pytest.mark.parametrize("value", [None, "", b"bytes-Secret-Token", 12345678])
def test_a_callable_must_return_a_str(server: PostgresServer, value: object) -> None:
    with pytest.raises(ConfigurationError, match="non-empty str") as info:
        safepg.connect(server.conninfo(password=None), password=lambda: value)  # type: ignore[arg-type]
    assert "Secret" not in str(info.value)
    assert "12345678" not in str(info.value)


def test_a_providers_error_is_not_retried(server: PostgresServer) -> None:
    calls: list[None] = []

    def provider() -> str:
        calls.append(None)
        raise ConfigurationError("no credentials here")

    with pytest.raises(ConfigurationError, match="no credentials here"):
        safepg.connect(server.conninfo(password=None), password=provider)
    assert len(calls) == 1


def test_an_async_callable_needs_connect_async(server: PostgresServer) -> None:
    async def provider() -> str:
        return server.password  # pragma: no cover

    with pytest.raises(ConfigurationError, match="connect_async"):
        safepg.connect(server.conninfo(password=None), password=provider)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="connect_async"):
        safepg.connect(server.conninfo(password=None), password=lambda: provider())  # type: ignore[arg-type]


# -- connect_async -----------------------------------------------------------------------------


def test_connect_async_takes_sync_and_async_callables(
    server: PostgresServer, rotating: Rotating
) -> None:
    async def provider(target: ConnectTarget) -> str:
        return await asyncio.to_thread(rotating, target)

    async def main() -> None:
        for password in (rotating, provider):
            conn = await safepg.connect_async(conninfo(server, rotating.role), password=password)
            async with conn:
                cur = await conn.execute("SELECT current_user")
                assert await cur.fetchone() == (rotating.role,)

    asyncio.run(main())
    assert len(rotating.tokens) == 2


# -- pools -------------------------------------------------------------------------------------


def test_every_pooled_connection_gets_a_fresh_token(
    server: PostgresServer, rotating: Rotating
) -> None:
    # One connection at a time: a Rotating token replaces the role's previous password.
    with ConnectionPool(
        conninfo(server, rotating.role),
        kwargs={"password": rotating},
        min_size=1,
        max_size=1,
        open=True,
    ) as pool:
        pool.wait()
        assert len(rotating.tokens) == 1
        for replaced in (2, 3):
            with pool.connection() as conn:
                assert current_user(conn) == rotating.role
                conn.close()  # broken: the pool opens a replacement, with a new token
            with pool.connection() as conn:
                assert current_user(conn) == rotating.role
            assert len(rotating.tokens) == replaced
    assert len(set(rotating.tokens)) == 3


def test_async_pool_with_an_async_callable(server: PostgresServer, rotating: Rotating) -> None:
    async def provider(target: ConnectTarget) -> str:
        return await asyncio.to_thread(rotating, target)

    async def main() -> None:
        async with (
            AsyncConnectionPool(
                conninfo(server, rotating.role),
                kwargs={"password": provider},
                min_size=1,
                open=False,
            ) as pool,
            pool.connection() as conn,
        ):
            cur = await conn.execute("SELECT current_user")
            assert await cur.fetchone() == (rotating.role,)

    asyncio.run(main())
    assert len(rotating.tokens) == 1


# -- SQLAlchemy --------------------------------------------------------------------------------


def _reconnects_with_a_fresh_token(
    server: PostgresServer, engine: sqlalchemy.Engine, rotating: Rotating
) -> None:
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        assert conn.execute(text("SELECT current_user")).scalar() == rotating.role
    assert len(rotating.tokens) == 1
    with server.admin_connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    with engine.connect() as conn:  # pre-ping finds it dead: a new connection, a new token
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
        assert conn.execute(text("SELECT current_user")).scalar() == rotating.role
    assert len(set(rotating.tokens)) == 2
    engine.dispose()


def test_sqlalchemy_engine_reconnects_with_a_fresh_token(
    server: PostgresServer, rotating: Rotating
) -> None:
    engine = sp.create_engine(
        url(server, rotating.role), connect_args={"password": rotating}, pool_pre_ping=True
    )
    _reconnects_with_a_fresh_token(server, engine, rotating)


def test_sqlalchemy_dialect_reconnects_with_a_fresh_token(
    server: PostgresServer, rotating: Rotating
) -> None:
    engine = sqlalchemy.create_engine(
        url(server, rotating.role).replace("postgresql://", "postgresql+safepg://"),
        connect_args={"password": rotating},
        pool_pre_ping=True,
    )
    _reconnects_with_a_fresh_token(server, engine, rotating)


def test_sqlalchemy_async_engine_with_an_async_callable(
    server: PostgresServer, rotating: Rotating
) -> None:
    async def provider(target: ConnectTarget) -> str:
        return await asyncio.to_thread(rotating, target)

    async def main() -> None:
        for engine in (
            sp.create_async_engine(url(server, rotating.role), connect_args={"password": provider}),
            create_async_engine(
                url(server, rotating.role).replace("postgresql://", "postgresql+safepg_async://"),
                connect_args={"password": provider},
            ),
        ):
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT current_user"))).scalar() == rotating.role
            await engine.dispose()

    asyncio.run(main())
    assert len(set(rotating.tokens)) == 2


def test_sqlalchemy_never_shows_the_token(server: PostgresServer, role: str) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    engine = sp.create_engine(url(server, role), connect_args={"password": lambda: token})
    with pytest.raises(sqlalchemy.exc.OperationalError) as info, engine.connect():
        pass  # pragma: no cover
    assert isinstance(info.value.orig, TokenRejectedError)
    assert token not in all_text(info.value)
    assert token not in repr(engine)
    engine.dispose()


def test_where_a_callable_is_not_called(server: PostgresServer) -> None:
    def provider() -> str:
        raise AssertionError("not to be called")  # pragma: no cover

    # secure_conninfo makes a string for other clients: a callable cannot go into it.
    with pytest.raises(ConfigurationError, match="password is a callable"):
        safepg.secure_conninfo(server.conninfo(password=None), password=provider)  # type: ignore[arg-type]
    trust = safepg.resolve_trust(server.conninfo(password=None), password=provider)  # type: ignore[arg-type]
    assert trust.path == str(server.ca_path)


def test_a_token_libpq_cannot_take_is_refused(server: PostgresServer) -> None:
    with pytest.raises(ConfigurationError, match="NUL byte") as info:
        safepg.connect(server.conninfo(password=None), password=lambda: "Secret\x00Token")
    assert "Secret" not in str(info.value)
