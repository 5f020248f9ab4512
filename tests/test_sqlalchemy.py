"""SQLAlchemy 2 through safepg: every URL form, sync and async ORM, pre-ping, restarts, errors."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import String, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import safepg
import safepg.sqlalchemy as sp
from safepg import ConfigurationError, HostnameMismatchError
from safepg.testing import PostgresServer

from .conftest import CertificateShop


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "safepg_notes_" + secrets.token_hex(4)
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(100))


def verified(dbapi_conn: Any) -> bool:
    return safepg.check(dbapi_conn).verified


@pytest.fixture
def engine(server: PostgresServer) -> Iterator[sqlalchemy.Engine]:
    eng = sp.create_engine(server.url(scheme="postgres"), pool_size=2, pool_pre_ping=True)
    yield eng
    eng.dispose()


# -- URL forms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgres://app:p%40ss@db.example.com:6432/app?sslmode=require",
        "postgresql://app:p%40ss@db.example.com:6432/app?sslmode=require",
        "postgresql+psycopg://app:p%40ss@db.example.com:6432/app?sslmode=require",
        "postgresql+safepg://app:p%40ss@db.example.com:6432/app?sslmode=require",
    ],
)
def test_database_url_forms(url: str) -> None:
    assert sp.connect_args(url) == {
        "host": "db.example.com",
        "port": 6432,
        "user": "app",
        "password": "p@ss",
        "dbname": "app",
        "sslmode": "require",  # raised to verify-full when connecting
    }


def test_multi_host_url() -> None:
    args = sp.connect_args("postgresql://app@/app?host=a.example:5432&host=b.example:5433")
    assert (args["host"], args["port"]) == ("a.example,b.example", "5432,5433")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u@h/db", "PostgreSQL only"),
        ("postgresql+asyncpg://u@h/db", "query options differ"),
        ("not a url", "not a database URL"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        sp.create_engine(url)


# -- sync --------------------------------------------------------------------------------------


def test_orm_round_trip(engine: sqlalchemy.Engine) -> None:
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as session:
            session.add(Note(body="hello"))
            session.commit()
            assert session.scalars(select(Note.body)).all() == ["hello"]
            assert verified(session.connection().connection.driver_connection)
    finally:
        Base.metadata.drop_all(engine)


@pytest.mark.parametrize("how", ["creator", "dialect"])
def test_bare_hook_and_dialect(server: PostgresServer, how: str) -> None:
    if how == "creator":
        eng = sqlalchemy.create_engine("postgresql+psycopg://", creator=sp.creator(server.url()))
    else:
        eng = sqlalchemy.create_engine(server.url(scheme="postgresql+safepg"))
        assert eng.dialect.driver == "safepg"
    with eng.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
        assert verified(conn.connection.driver_connection)
    eng.dispose()


def test_connect_args_become_safepg_parameters(server: PostgresServer) -> None:
    eng = sp.create_engine(server.url(), connect_args={"application_name": "safepg-sa"})
    with eng.connect() as conn:
        assert conn.execute(text("SHOW application_name")).scalar() == "safepg-sa"
    eng.dispose()


def test_pool_pre_ping_replaces_a_dead_connection(
    server: PostgresServer, engine: sqlalchemy.Engine
) -> None:
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    with server.admin_connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    with engine.connect() as conn:  # pre-ping finds it dead and opens a new, verified one
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
        assert verified(conn.connection.driver_connection)


def test_reconnect_after_server_restart(server: PostgresServer, engine: sqlalchemy.Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    server.restart()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
        assert verified(conn.connection.driver_connection)


def test_every_new_connection_is_verified(
    server: PostgresServer, certs: CertificateShop, engine: sqlalchemy.Engine
) -> None:
    certs.present("other.example")
    with pytest.raises(OperationalError) as info, engine.connect():
        pass  # pragma: no cover
    assert isinstance(info.value.orig, HostnameMismatchError)
    assert "other.example" in str(info.value.orig)
    assert server.password not in str(info.value)


# -- async -------------------------------------------------------------------------------------


async def _orm_round_trip(eng: AsyncEngine) -> list[str]:
    async with eng.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    try:
        async with AsyncSession(eng) as session:
            session.add(Note(body="async hello"))
            await session.commit()
            bodies = list((await session.scalars(select(Note.body))).all())
            conn = await session.connection()
            raw = await conn.get_raw_connection()
            assert raw.driver_connection is not None
            assert (await safepg.check_async(raw.driver_connection)).verified
        return bodies
    finally:
        async with eng.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
        await eng.dispose()


@pytest.mark.parametrize("how", ["create_async_engine", "async_creator", "dialect", "sync-name"])
def test_async_orm_round_trip(server: PostgresServer, how: str) -> None:
    url = server.url()
    if how == "create_async_engine":
        eng = sp.create_async_engine(url)
    elif how == "async_creator":
        eng = sa_create_async_engine(
            "postgresql+psycopg_async://", async_creator=sp.async_creator(url)
        )
    elif how == "dialect":
        eng = sa_create_async_engine(server.url(scheme="postgresql+safepg_async"))
    else:  # the sync dialect's name must not fall back to plain psycopg's async dialect
        eng = sa_create_async_engine(server.url(scheme="postgresql+safepg"))
        assert isinstance(eng.dialect, sp.SafePGAsyncDialect)
    assert asyncio.run(_orm_round_trip(eng)) == ["async hello"]


def test_async_engine_fails_closed(server: PostgresServer, certs: CertificateShop) -> None:
    certs.present("other.example")

    async def main() -> None:
        eng = sp.create_async_engine(server.url())
        try:
            async with eng.connect():
                pass  # pragma: no cover
        finally:
            await eng.dispose()

    with pytest.raises(OperationalError) as info:
        asyncio.run(main())
    assert isinstance(info.value.orig, HostnameMismatchError)
