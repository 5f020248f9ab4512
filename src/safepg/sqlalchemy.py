"""SQLAlchemy 2 engines whose every connection goes through safepg (``safepg[sqlalchemy]``).

Three ways in, from least to most code change:

1. Change only the URL's driver: ``postgresql+safepg://…`` (sync) or ``postgresql+safepg_async://…``
   (asyncio). The dialects are registered through the ``sqlalchemy.dialects`` entry point.
2. Build the engine here, from the URL you already have, in any of the forms found in
   ``DATABASE_URL``: ``postgres://`` (Heroku), ``postgresql://``, ``postgresql+psycopg://``::

       engine = safepg.sqlalchemy.create_engine(os.environ["DATABASE_URL"], pool_pre_ping=True)

3. Keep your own ``create_engine`` call and hand it a creator::

       engine = sqlalchemy.create_engine(
           "postgresql+psycopg://", creator=safepg.sqlalchemy.creator(url)
       )
       engine = create_async_engine(
           "postgresql+psycopg_async://", async_creator=safepg.sqlalchemy.async_creator(url)
       )

Each new pooled connection is hardened, verified and checked as `safepg.connect` does it.
Errors reach you wrapped by SQLAlchemy, as ``sqlalchemy.exc.OperationalError``, with safepg's
error (a `psycopg.OperationalError`) as ``.orig``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy
from psycopg import AsyncConnection, Connection
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg, PGDialectAsync_psycopg
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

from ._connect import connect, connect_async
from ._errors import ConfigurationError

__all__ = [
    "SafePGAsyncDialect",
    "SafePGDialect",
    "async_creator",
    "connect_args",
    "create_async_engine",
    "create_engine",
    "creator",
]

# Drivers whose URLs carry libpq's own parameters, which psycopg (and so safepg) understands.
_LIBPQ_DRIVERS = ("", "psycopg", "psycopg_async", "psycopg2", "safepg", "safepg_async")


def _normalize(url: str | URL) -> URL:
    """*url* as a ``postgresql+psycopg`` URL, from any libpq-style PostgreSQL URL."""
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise ConfigurationError(
            "not a database URL: expected postgresql://user:password@host:port/dbname"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in ("postgres", "postgresql"):
        raise ConfigurationError(
            f"safepg connects to PostgreSQL only; this URL is for {backend!r}."
        )
    if driver not in _LIBPQ_DRIVERS:
        raise ConfigurationError(
            f"the URL names the driver {driver!r}, whose query options differ from libpq's. "
            "safepg connects through psycopg: use postgresql:// or postgresql+psycopg://, with "
            "libpq parameters (sslmode, sslrootcert, ...) in the query string."
        )
    return parsed.set(drivername="postgresql+psycopg")


def connect_args(url: str | URL) -> dict[str, Any]:
    """The keyword arguments for `safepg.connect` that *url* stands for.

    SQLAlchemy's own psycopg dialect reads the URL, so its forms (multiple hosts as
    ``?host=a:5432&host=b:5433``, query parameters) mean what they mean there.
    """
    dialect = PGDialect_psycopg()  # type: ignore[no-untyped-call]
    cargs, cparams = dialect.create_connect_args(_normalize(url))  # type: ignore[no-untyped-call]
    if cargs and cargs != [""]:  # pragma: no cover - the dialect passes keywords only
        raise ConfigurationError("unexpected positional connection arguments")
    return dict(cparams)


def creator(url: str | URL, **kwargs: Any) -> Callable[[], Connection[Any]]:
    """A ``creator`` for `sqlalchemy.create_engine`: each call is a new `safepg.connect`.

    *kwargs* are `safepg.connect`'s (libpq parameters, ``fast_path``, ...) and override the
    URL's.
    """
    params = {**connect_args(url), **kwargs}

    def create() -> Connection[Any]:
        return connect(**params)

    return create


def async_creator(url: str | URL, **kwargs: Any) -> Callable[[], Awaitable[AsyncConnection[Any]]]:
    """An ``async_creator`` for `create_async_engine`: each call is a new `safepg.connect_async`."""
    params = {**connect_args(url), **kwargs}

    async def create() -> AsyncConnection[Any]:
        conn: AsyncConnection[Any] = await connect_async(**params)
        return conn

    return create


def _engine_url_and_kwargs(url: str | URL, kw: dict[str, Any]) -> tuple[URL, dict[str, Any]]:
    # With a creator, SQLAlchemy ignores connect_args: fold them into safepg's parameters.
    return _normalize(url), dict(kw.pop("connect_args", None) or {})


def create_engine(url: str | URL, **kw: Any) -> Engine:
    """`sqlalchemy.create_engine` with every connection opened by `safepg.connect`.

    Every engine and pool option is passed through; ``connect_args`` become safepg's
    connection parameters.
    """
    normalized, extra = _engine_url_and_kwargs(url, kw)
    return sqlalchemy.create_engine(normalized, creator=creator(url, **extra), **kw)


def create_async_engine(url: str | URL, **kw: Any) -> AsyncEngine:
    """`sqlalchemy.ext.asyncio.create_async_engine`, opening connections by `connect_async`."""
    normalized, extra = _engine_url_and_kwargs(url, kw)
    return _create_async_engine(
        normalized.set(drivername="postgresql+psycopg_async"),
        async_creator=async_creator(url, **extra),
        **kw,
    )


class SafePGDialect(PGDialect_psycopg):
    """The ``postgresql+safepg://`` dialect: SQLAlchemy's psycopg dialect, through safepg."""

    driver = "safepg"
    supports_statement_cache = True

    @classmethod
    def get_async_dialect_cls(cls, url: URL) -> type[SafePGAsyncDialect]:
        # create_async_engine("postgresql+safepg://") must not fall back to plain psycopg.
        return SafePGAsyncDialect

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        return connect(*cargs, **cparams)


class SafePGAsyncDialect(PGDialectAsync_psycopg):
    """The ``postgresql+safepg_async://`` dialect, for `create_async_engine`."""

    driver = "safepg_async"
    supports_statement_cache = True

    @classmethod
    def get_async_dialect_cls(cls, url: URL) -> type[SafePGAsyncDialect]:
        return SafePGAsyncDialect

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        cparams["async_creator_fn"] = connect_async
        return super().connect(*cargs, **cparams)
