"""SQLAlchemy 2 through safepg: every URL form, sync and async ORM, pre-ping, restarts, errors."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
import pytest
import sqlalchemy
from sqlalchemy import String, make_url, select, text
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


def test_a_psycopg2_url_moves_to_psycopg_3_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sp, "_psycopg2_logged", set())
    caplog.set_level(logging.DEBUG, logger="safepg")
    url = "postgresql+psycopg2://app:s3cret@db.example.com/app?sslmode=require"
    for _ in range(2):
        eng = sp.create_engine(url)
        assert eng.dialect.driver == "psycopg"
        eng.dispose()
    moved = [r for r in caplog.records if "psycopg2" in r.getMessage()]
    assert moved
    assert [r.levelno for r in moved if r.levelno >= logging.INFO] == [logging.INFO]
    assert "psycopg 3" in moved[0].getMessage()
    assert not any("s3cret" in r.getMessage() for r in caplog.records)


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


@pytest.mark.parametrize("scheme", ["postgresql+safepg", "postgresql+safepg_async"])
def test_wrapped_errors_name_the_public_class(
    server: PostgresServer, certs: CertificateShop, scheme: str
) -> None:
    # SQLAlchemy's message shows the class as module.name: the documented safepg.X, not the
    # private module that defines it.
    certs.present("other.example")

    async def connect_async() -> None:
        eng = sa_create_async_engine(server.url(scheme=scheme))
        try:
            async with eng.connect():
                pass  # pragma: no cover
        finally:
            await eng.dispose()

    def connect() -> None:
        if scheme.endswith("_async"):
            asyncio.run(connect_async())
            return
        eng = sqlalchemy.create_engine(server.url(scheme=scheme))
        try:
            with eng.connect():
                pass  # pragma: no cover
        finally:
            eng.dispose()

    with pytest.raises(OperationalError) as info:
        connect()
    assert str(info.value).startswith("(safepg.HostnameMismatchError) "), str(info.value)[:200]


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


@pytest.mark.parametrize("scheme", ["postgresql+safepg_async", "postgresql+safepg"])
def test_async_dialect_keeps_the_sync_drivers_name(scheme: str) -> None:
    # SQLAlchemy's convention: postgresql+psycopg_async is driver "psycopg", with is_async.
    eng = sa_create_async_engine(f"{scheme}://app@db.example.com/app")
    assert isinstance(eng.dialect, sp.SafePGAsyncDialect)
    assert (eng.dialect.driver, eng.dialect.is_async) == ("safepg", True)
    assert eng.url.get_driver_name() == scheme.partition("+")[2]
    sync = sqlalchemy.create_engine("postgresql+safepg://app@db.example.com/app")
    assert (sync.dialect.driver, sync.dialect.is_async) == ("safepg", False)


FRESH_ASYNC = textwrap.dedent(
    """
    import asyncio, os

    import psycopg
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main(url):
        for options in ({}, {"module": psycopg}):
            eng = create_async_engine(url, **options)
            try:
                async with eng.connect() as conn:
                    assert await conn.scalar(text("SELECT 1")) == 1
            finally:
                await eng.dispose()

    asyncio.run(main(os.environ["SAFEPG_TEST_URL"]))
    """
)


def test_async_dialect_in_a_fresh_process(server: PostgresServer) -> None:
    # SQLAlchemy 2.0's async psycopg cursor needed a class attribute that only its own
    # dialect's import_dbapi set: in a process that had made no postgresql+psycopg_async engine,
    # postgresql+safepg_async failed its first statement. Other tests here make such engines.
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_ASYNC],
        env={**os.environ, "SAFEPG_TEST_URL": server.url(scheme="postgresql+safepg_async")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output, returncode = proc.stdout + proc.stderr, proc.returncode
    assert returncode == 0, output[-3000:]


@pytest.mark.parametrize("scheme", ["postgresql+safepg", "postgresql+safepg_async"])
def test_dialects_provide_sqlalchemys_test_provisioning(
    monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    # SQLAlchemy's test plugin calls load_provisioning() on each dialect it tests with; its
    # default would look for safepg.provision. tests/test_sqlalchemy_suite.py runs the suite.
    monkeypatch.delitem(sys.modules, "safepg.sqlalchemy.provision", raising=False)
    make_url(f"{scheme}://").get_dialect().load_provisioning()
    assert "safepg.sqlalchemy.provision" in sys.modules
    from sqlalchemy.testing import provision

    assert "postgresql" in provision.create_db.fns
    assert "postgresql" in provision.temp_table_keyword_args.fns


def test_requirements_class_reads_psycopg_specs_as_safepg(monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLAlchemy's own tests key psycopg's tests and skips on the driver name ("+psycopg");
    # with safepg's requirements class they apply to safepg's dialects, and to no other driver.
    from sqlalchemy.testing import exclusions

    from safepg.sqlalchemy.requirements import Requirements

    monkeypatch.setattr(exclusions.SpecPredicate, "__call__", exclusions.SpecPredicate.__call__)
    Requirements()  # as SQLAlchemy's plugin makes it

    def on(driver: str) -> Any:
        return types.SimpleNamespace(db=types.SimpleNamespace(name="postgresql", driver=driver))

    def matches(spec: str, driver: str) -> bool:
        return bool(exclusions.SpecPredicate(spec)(on(driver)))  # type: ignore[no-untyped-call]

    for spec in ("postgresql+psycopg", "+psycopg", "postgresql+safepg", "postgresql"):
        assert matches(spec, "safepg"), spec
    for spec in ("postgresql+psycopg2", "+asyncpg", "+pg8000", "mysql+psycopg"):
        assert not matches(spec, "safepg"), spec
    assert matches("+psycopg", "psycopg")
    assert not matches("+safepg", "psycopg")  # the stock driver is not safepg
    assert not matches("+psycopg", "asyncpg")


# -- the dialects' DBAPI: hooks, module=, creators ---------------------------------------------


def sslmode(raw: Any) -> str:
    options = {o.keyword: o.val for o in raw.pgconn.info}
    return (options.get(b"sslmode") or b"").decode()


def test_do_connect_hook_gets_safepgs_dbapi(server: PostgresServer) -> None:
    # The URL carries no sslmode: psycopg's own connect would use libpq's default, prefer.
    eng = sqlalchemy.create_engine(server.url(scheme="postgresql+safepg"))
    dbapi: Any = eng.dialect.dbapi
    assert dbapi.connect is safepg.connect
    assert eng.dialect.loaded_dbapi.connect is safepg.connect
    # Everything else is psycopg's, as SQLAlchemy's psycopg dialect reads it.
    assert (dbapi.paramstyle, dbapi.Error, dbapi.adapters) == (
        "pyformat",
        psycopg.Error,
        psycopg.adapters,
    )
    assert dbapi.__version__ == psycopg.__version__
    seen: list[dict[str, Any]] = []

    @sqlalchemy.event.listens_for(eng, "do_connect")
    def hook(dialect: Any, record: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        assert "sslmode" not in cparams
        seen.append(cparams)
        return dialect.dbapi.connect(*cargs, **cparams)

    try:
        with eng.connect() as conn:
            raw = conn.connection.driver_connection
            assert seen
            assert raw is not None
            assert raw.pgconn.ssl_in_use
            assert sslmode(raw) == "verify-full"
            assert verified(raw)
    finally:
        eng.dispose()


def test_async_do_connect_hook_gets_safepgs_dbapi(server: PostgresServer) -> None:
    eng = sa_create_async_engine(server.url(scheme="postgresql+safepg_async"))
    hooked: list[str] = []
    opened: list[dict[str, Any]] = []

    async def opener(**params: Any) -> psycopg.AsyncConnection[Any]:
        opened.append(params)  # psycopg's own AsyncConnection.connect, given what safepg made
        return await psycopg.AsyncConnection.connect(**params)

    @sqlalchemy.event.listens_for(eng.sync_engine, "do_connect")
    def hook(dialect: Any, record: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        assert "sslmode" not in cparams
        if not hooked:
            hooked.append("plain")
            return dialect.dbapi.connect(*cargs, **cparams)
        hooked.append("async_creator_fn")
        return dialect.dbapi.connect(*cargs, async_creator_fn=opener, **cparams)

    async def main() -> None:
        try:
            for _ in range(2):
                async with eng.connect() as conn:
                    raw = (await conn.get_raw_connection()).driver_connection
                    assert raw is not None
                    assert raw.pgconn.ssl_in_use
                    assert sslmode(raw) == "verify-full"
                    assert (await safepg.check_async(raw)).verified
                    await conn.invalidate()  # the next one is a new connection
        finally:
            await eng.dispose()

    asyncio.run(main())
    assert hooked == ["plain", "async_creator_fn"]
    assert [p["sslmode"] for p in opened] == ["verify-full"]


def _recording_psycopg() -> tuple[types.ModuleType, list[dict[str, Any]]]:
    """A DBAPI module that is psycopg, but records each connect's arguments."""
    calls: list[dict[str, Any]] = []
    module = types.ModuleType("recording_psycopg")
    module.__dict__.update({k: v for k, v in vars(psycopg).items() if not k.startswith("__")})
    module.__dict__["__version__"] = psycopg.__version__

    def connect(conninfo: str = "", **kwargs: Any) -> psycopg.Connection[Any]:
        calls.append(dict(kwargs, conninfo=conninfo))
        return psycopg.connect(conninfo, **kwargs)

    class AsyncConnection(psycopg.AsyncConnection[Any]):
        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            calls.append(dict(kwargs, conninfo=conninfo))
            return await super().connect(conninfo, **kwargs)

    module.connect = connect  # type: ignore[attr-defined]
    module.AsyncConnection = AsyncConnection  # type: ignore[attr-defined]
    return module, calls


def test_module_is_used_and_still_hardened(server: PostgresServer) -> None:
    module, calls = _recording_psycopg()
    eng = sqlalchemy.create_engine(server.url(scheme="postgresql+safepg"), module=module)
    assert eng.dialect.dbapi is not None
    assert eng.dialect.dbapi.connect is not safepg.connect
    try:
        with eng.connect() as conn:
            assert verified(conn.connection.driver_connection)
    finally:
        eng.dispose()
    assert calls
    assert calls[-1]["sslmode"] == "verify-full"  # the module got safepg's parameters


def test_async_module_is_used_and_still_hardened(server: PostgresServer) -> None:
    module, calls = _recording_psycopg()
    eng = sa_create_async_engine(server.url(scheme="postgresql+safepg_async"), module=module)

    async def main() -> None:
        try:
            async with eng.connect() as conn:
                raw = (await conn.get_raw_connection()).driver_connection
                assert raw is not None
                assert (await safepg.check_async(raw)).verified
        finally:
            await eng.dispose()

    asyncio.run(main())
    assert calls
    assert calls[-1]["sslmode"] == "verify-full"


def test_a_module_that_weakens_the_session_is_refused(server: PostgresServer) -> None:
    module, _ = _recording_psycopg()

    def plaintext(conninfo: str = "", **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(conninfo, **{**kwargs, "sslmode": "disable"})

    module.connect = plaintext  # type: ignore[attr-defined]
    eng = sqlalchemy.create_engine(server.url(scheme="postgresql+safepg"), module=module)
    with pytest.raises(OperationalError) as info, eng.connect():
        pass  # pragma: no cover
    assert isinstance(info.value.orig, safepg.InsecureConnectionError)
    eng.dispose()


@pytest.mark.parametrize("how", ["creator", "do_connect", "async_creator", "no-initialize"])
def test_connections_made_around_safepg_are_refused(server: PostgresServer, how: str) -> None:
    conninfo = server.conninfo(sslmode="require")
    if how == "async_creator":

        async def main() -> None:
            eng = sa_create_async_engine(
                server.url(scheme="postgresql+safepg_async"),
                async_creator=lambda: psycopg.AsyncConnection.connect(conninfo),
            )
            try:
                async with eng.connect():
                    pass  # pragma: no cover
            finally:
                await eng.dispose()

        with pytest.raises(OperationalError) as info:
            asyncio.run(main())
    else:
        url = server.url(scheme="postgresql+safepg")
        if how == "creator":
            eng = sqlalchemy.create_engine(url, creator=lambda: psycopg.connect(conninfo))
        elif how == "no-initialize":  # SQLAlchemy then skips the dialect's on_connect
            eng = sqlalchemy.create_engine(
                url, creator=lambda: psycopg.connect(conninfo), _initialize=False
            )
        else:
            eng = sqlalchemy.create_engine(url)
            sqlalchemy.event.listen(eng, "do_connect", lambda *args: psycopg.connect(conninfo))
        with pytest.raises(OperationalError) as info, eng.connect():
            pass  # pragma: no cover
        eng.dispose()
    assert isinstance(info.value.orig, safepg.InsecureConnectionError)
    assert "sslmode=require" in str(info.value.orig)


def test_a_new_pool_at_a_dead_pools_address_is_still_watched() -> None:
    # CI once let a creator's sslmode=require connection through: SQLAlchemy's event registry
    # goes by id(pool), and a dead pool whose listener collection lingered (here: kept) made
    # sqlalchemy.event.contains() say yes for a new pool at the same address.
    lingering = {}
    never_called: Any = psycopg.connect
    for _ in range(20):
        pool = sqlalchemy.pool.QueuePool(never_called)
        sp._watch_pool(pool)  # what engine_created does
        assert sp._refuse_at_connect in list(pool.dispatch.connect)
        lingering[id(pool)] = pool.dispatch.connect
        del pool  # freed now, by reference count; the next pool may get its address


@pytest.mark.parametrize("scheme", ["postgresql+safepg", "postgresql+safepg_async"])
def test_safepgs_own_creators_are_accepted(server: PostgresServer, scheme: str) -> None:
    if scheme == "postgresql+safepg":
        eng = sqlalchemy.create_engine(f"{scheme}://", creator=sp.creator(server.url()))
        with eng.connect() as conn:
            assert verified(conn.connection.driver_connection)
        eng.dispose()
        return

    async def main() -> None:
        eng = sa_create_async_engine(f"{scheme}://", async_creator=sp.async_creator(server.url()))
        try:
            async with eng.connect() as conn:
                assert (await conn.scalar(text("SELECT 1"))) == 1
        finally:
            await eng.dispose()

    asyncio.run(main())


# -- boolean options in URLs -------------------------------------------------------------------

WAYS = ["create_engine", "dialect", "create_async_engine", "async_dialect"]


def _describe(raw: Any) -> dict[str, Any]:
    options = {o.keyword.decode(): (o.val or b"").decode() for o in raw.pgconn.info}
    return {
        "ssl": raw.pgconn.ssl_in_use,
        "host": (raw.pgconn.host or b"").decode(),
        "sslnegotiation": options.get("sslnegotiation"),
    }


def _open_once(way: str, url: str) -> dict[str, Any]:
    """One connection through an engine made *way* from the ``postgresql://`` *url*."""
    if way in ("create_engine", "dialect"):
        if way == "create_engine":
            eng = sp.create_engine(url)
        else:
            eng = sqlalchemy.create_engine(url.replace("postgresql:", "postgresql+safepg:", 1))
        try:
            with eng.connect() as conn:
                return _describe(conn.connection.driver_connection)
        finally:
            eng.dispose()

    async def main() -> dict[str, Any]:
        if way == "create_async_engine":
            aeng = sp.create_async_engine(url)
        else:
            aeng = sa_create_async_engine(url.replace("postgresql:", "postgresql+safepg_async:", 1))
        try:
            async with aeng.connect() as conn:
                return _describe((await conn.get_raw_connection()).driver_connection)
        finally:
            await aeng.dispose()

    return asyncio.run(main())


def _socket_url(server: PostgresServer, **query: str) -> str:
    params = {"host": str(server.socket_dir), "port": str(server.port), **query}
    return (
        f"postgresql://{server.user}:{quote(server.password, safe='')}@/{server.dbname}?"
        + urlencode(params)
    )


def _tcp_url(server: PostgresServer, **query: str) -> str:
    return f"{server.url()}&{urlencode(query)}"


@pytest.mark.parametrize("way", WAYS)
def test_url_false_keeps_the_unix_socket_refused(server: PostgresServer, way: str) -> None:
    with pytest.raises(OperationalError) as info:
        _open_once(way, _socket_url(server, allow_unencrypted_unix_socket="false"))
    assert isinstance(info.value.orig, ConfigurationError)
    assert "Unix-domain socket" in str(info.value.orig)


@pytest.mark.parametrize("way", WAYS)
def test_url_true_allows_the_unix_socket(server: PostgresServer, way: str) -> None:
    described = _open_once(way, _socket_url(server, allow_unencrypted_unix_socket="TRUE"))
    assert described["host"] == str(server.socket_dir)
    assert not described["ssl"]


@pytest.mark.parametrize("option", ["allow_unencrypted_unix_socket", "fast_path", "direct_tls"])
@pytest.mark.parametrize("way", WAYS)
def test_url_boolean_that_is_not_one_is_refused(
    server: PostgresServer, way: str, option: str
) -> None:
    with pytest.raises(OperationalError) as info:
        _open_once(way, _tcp_url(server, **{option: "maybe"}))
    assert isinstance(info.value.orig, ConfigurationError)
    assert option in str(info.value.orig)


@pytest.fixture
def two_ca_bundle(server: PostgresServer, rogue_ca: Any, tmp_path: Path) -> Path:
    """A trust set of two CAs: enough for the fast path to learn the one that verifies."""
    path = tmp_path / "two.pem"
    path.write_bytes(server.ca.cert_pem + rogue_ca.cert_pem)
    return path


@pytest.mark.parametrize("value", ["false", "true"])
@pytest.mark.parametrize("way", WAYS)
def test_url_fast_path(server: PostgresServer, two_ca_bundle: Path, way: str, value: str) -> None:
    url = (
        server.url().partition("?")[0]
        + "?"
        + urlencode({"sslrootcert": str(two_ca_bundle), "fast_path": value})
    )
    assert _open_once(way, url)["ssl"]
    cache = Path(os.environ["SAFEPG_CACHE_DIR"])
    learned = sorted(cache.glob("host-*")) if cache.exists() else []
    assert bool(learned) is (value == "true")


@pytest.mark.parametrize("way", WAYS)
def test_url_direct_tls_false(server: PostgresServer, way: str) -> None:
    for _ in range(2):  # cold, then warm (when direct TLS could have been learned)
        described = _open_once(way, _tcp_url(server, direct_tls="false"))
        assert described["ssl"]
        assert described["sslnegotiation"] != "direct"


# -- DBAPIs that hand on to another; mock.patch.object; objects that are not connections -------


class Forwarding:
    """A DBAPI that hands everything on to another, as SQLAlchemy's test ReconnectFixture does."""

    def __init__(self, dbapi: Any) -> None:
        self.dbapi = dbapi
        self.calls = 0

    def __getattr__(self, key: str) -> Any:
        return getattr(self.dbapi, key)

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.dbapi.connect(*args, **kwargs)


def _stock_async_adapter() -> Any:
    # SQLAlchemy's own adapter, as its async dialect makes it (2.1's takes psycopg's
    # ExecStatus too, 2.0's the module alone).
    from sqlalchemy.dialects.postgresql.psycopg import PGDialectAsync_psycopg

    return PGDialectAsync_psycopg.import_dbapi()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("inner", ["safepg", "sqlalchemy"])
def test_async_module_that_hands_on_to_a_dbapi(server: PostgresServer, inner: str) -> None:
    # SQLAlchemy's engines.reconnecting_engine() passes module=ReconnectFixture(dialect.dbapi);
    # it was adapted again as if it were psycopg's module, and failed: "'_AsyncDBAPI' object
    # has no attribute 'paramstyle'". Around SQLAlchemy's own adapter, the URL's parameters
    # (no sslmode: libpq's prefer) still reach libpq only hardened.
    url = server.url(scheme="postgresql+safepg_async")
    if inner == "safepg":
        dbapi = sa_create_async_engine(url).dialect.dbapi
    else:
        dbapi = _stock_async_adapter()
    module = Forwarding(dbapi)
    eng = sa_create_async_engine(url, module=module)
    shown_dbapi: Any = eng.dialect.dbapi
    assert shown_dbapi.paramstyle == "pyformat"

    async def main() -> None:
        try:
            async with eng.connect() as conn:
                raw = (await conn.get_raw_connection()).driver_connection
                assert raw is not None
                assert sslmode(raw) == "verify-full"
                assert (await safepg.check_async(raw)).verified
                assert (await conn.scalar(text("SELECT 1"))) == 1
        finally:
            await eng.dispose()

    asyncio.run(main())
    assert module.calls == 1
    assert shown_dbapi.calls == 1  # the module's own attributes, as the fixture reads them


def test_async_module_that_drops_safepgs_opener_is_refused(server: PostgresServer) -> None:
    stock = _stock_async_adapter()

    class Dropping(Forwarding):
        def connect(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.pop("async_creator_fn")  # opens with the URL's parameters: sslmode=prefer
            return stock.connect(*args, **kwargs)

    eng = sa_create_async_engine(
        server.url(scheme="postgresql+safepg_async"), module=Dropping(stock)
    )

    async def main() -> None:
        try:
            async with eng.connect():
                pass  # pragma: no cover
        finally:
            await eng.dispose()

    with pytest.raises(OperationalError) as info:
        asyncio.run(main())
    assert isinstance(info.value.orig, safepg.InsecureConnectionError)
    assert "sslmode=prefer" in str(info.value.orig)


@pytest.mark.parametrize("scheme", ["postgresql+safepg", "postgresql+safepg_async"])
def test_mock_patch_object_restores_the_dbapi(server: PostgresServer, scheme: str) -> None:
    from unittest import mock

    # SQLAlchemy's test_execute patches testing.db.dialect's dbapi this way; without a deleter
    # the patch could not be undone, and the shared dialect kept the stand-in.
    eng = sqlalchemy.create_engine(server.url(scheme=scheme.replace("_async", "")))
    if scheme.endswith("_async"):
        eng = sa_create_async_engine(server.url(scheme=scheme)).sync_engine
    dialect: Any = eng.dialect
    original = dialect.dbapi
    stand_in = Forwarding(original)
    with mock.patch.object(dialect, "dbapi", stand_in):
        patched = dialect.dbapi
        assert patched is not original
        assert patched.connect is not stand_in.connect  # hardened as any DBAPI set is
    assert dialect.dbapi is original
    del dialect.dbapi
    with pytest.raises(AttributeError):
        dialect.dbapi  # noqa: B018
    dialect.dbapi = original
    assert dialect.dbapi is original


class NotAConnection:
    """Something a creator might return that is no psycopg connection."""


@pytest.mark.parametrize("made", [NotAConnection, object, list])
def test_a_pooled_object_that_is_no_connection_is_refused(
    server: PostgresServer, made: type
) -> None:
    # Refused as documented, with InsecureConnectionError: it was an AttributeError (no pgconn)
    # or a TypeError (the weak-key lookup of an object that cannot be weakly referenced).
    eng = sqlalchemy.create_engine(server.url(scheme="postgresql+safepg"), creator=made)
    with pytest.raises(OperationalError) as info, eng.connect():
        pass  # pragma: no cover
    eng.dispose()
    assert isinstance(info.value.orig, safepg.InsecureConnectionError)
    assert "not a psycopg connection" in str(info.value.orig)
    assert made.__qualname__ in str(info.value.orig)


def test_an_async_creator_of_no_connection_is_refused(server: PostgresServer) -> None:
    async def make() -> Any:
        return NotAConnection()

    async def main() -> None:
        eng = sa_create_async_engine(
            server.url(scheme="postgresql+safepg_async"), async_creator=make
        )
        try:
            async with eng.connect():
                pass  # pragma: no cover
        finally:
            await eng.dispose()

    with pytest.raises(OperationalError) as info:
        asyncio.run(main())
    assert isinstance(info.value.orig, safepg.InsecureConnectionError)
    assert "NotAConnection" in str(info.value.orig)


class Proxy:
    """A connection proxy as SQLAlchemy's testing DBAPIProxyConnection: hands everything on."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __getattr__(self, key: str) -> Any:
        return getattr(self.conn, key)


@pytest.mark.parametrize("opened", ["safepg", "verify-full", "require"])
def test_a_proxy_of_a_connection_is_judged_by_its_connection(
    server: PostgresServer, opened: str
) -> None:
    # SQLAlchemy's own tests (test_reconnect's ping_fixture) wrap the dialect's connections so.
    if opened == "safepg":
        make = lambda: Proxy(safepg.connect(server.conninfo()))  # noqa: E731
    else:
        conninfo = server.conninfo(sslmode=opened)
        make = lambda: Proxy(psycopg.connect(conninfo))  # noqa: E731
    # As that fixture: without the dialect's first-connect setup (psycopg's type registration
    # wants a Connection itself).
    url = server.url(scheme="postgresql+safepg")
    eng = sqlalchemy.create_engine(url, creator=make, _initialize=False)
    try:
        if opened == "require":
            with pytest.raises(OperationalError) as info, eng.connect():
                pass  # pragma: no cover
            assert isinstance(info.value.orig, safepg.InsecureConnectionError)
            assert "sslmode=require" in str(info.value.orig)
        else:
            with eng.connect() as conn:
                assert conn.scalar(text("SELECT 1")) == 1
    finally:
        eng.dispose()
