"""SQLAlchemy 2 engines whose every connection goes through safepg (``safepg-tls[sqlalchemy]``).

Three ways in, from least to most code change:

1. Change only the URL's driver: ``postgresql+safepg://…`` (sync) or ``postgresql+safepg_async://…``
   (asyncio). The dialects are registered through the ``sqlalchemy.dialects`` entry point.
2. Build the engine here, from the URL you already have, in any of the forms found in
   ``DATABASE_URL``: ``postgres://`` (Heroku), ``postgresql://``, ``postgresql+psycopg://``::

       engine = safepg.sqlalchemy.create_engine(os.environ["DATABASE_URL"], pool_pre_ping=True)

   A ``postgresql+psycopg2://`` URL is accepted too (its query string holds libpq parameters as
   well), but connects with psycopg 3, not psycopg2; this is logged at INFO, once. To keep
   psycopg2, use `psycopg2_creator` (way 3).

3. Keep your own ``create_engine`` call and hand it a creator::

       engine = sqlalchemy.create_engine(
           "postgresql+psycopg://", creator=safepg.sqlalchemy.creator(url)
       )
       engine = create_async_engine(
           "postgresql+psycopg_async://", async_creator=safepg.sqlalchemy.async_creator(url)
       )
       engine = sqlalchemy.create_engine(  # psycopg2 connections, through safepg.psycopg2
           "postgresql+psycopg2://", creator=safepg.sqlalchemy.psycopg2_creator(url)
       )

Each new pooled connection is hardened, verified and checked as `safepg.connect` does it.

The dialects' DBAPI (``dialect.dbapi``) is safepg's: psycopg's module with ``connect`` =
`safepg.connect` (async: SQLAlchemy's psycopg adapter, opening with `safepg.connect_async`), so a
``do_connect`` hook calling ``dialect.dbapi.connect(*cargs, **cparams)`` gets a verified
connection. ``create_engine(..., module=M)`` opens with M's ``connect`` (async: its
``AsyncConnection.connect``), given the hardened parameters and checked. An engine of these
dialects refuses a connection its pool gets another way (a ``creator``, an ``async_creator``, a
hook's own connection), with `InsecureConnectionError`, unless safepg opened it or it has TLS
with ``sslmode=verify-full``.
Errors reach you wrapped by SQLAlchemy, as ``sqlalchemy.exc.OperationalError``, with safepg's
error (a `psycopg.OperationalError`) as ``.orig``.

The async dialect's ``driver`` is ``safepg``, like the sync one's, with ``is_async``: SQLAlchemy's
convention for its own async variants (``postgresql+psycopg_async`` is driver ``psycopg``).
The dialects provide SQLAlchemy's test provisioning (`safepg.sqlalchemy.provision`, which is
PostgreSQL's), so SQLAlchemy's test plugin, and its own suite, run against
``postgresql+safepg://`` and ``postgresql+safepg_async://`` URLs, with ``pytest -n`` too.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import types
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import AsyncConnection, Connection, pq
from psycopg.pq import ExecStatus

try:
    import sqlalchemy
    from sqlalchemy.dialects.postgresql.psycopg import (
        PGDialect_psycopg,
        PGDialectAsync_psycopg,
        PsycopgAdaptDBAPI,
    )
    from sqlalchemy.engine import URL, Engine, make_url
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
    from sqlalchemy.pool import Pool
except ImportError as _ex:  # pragma: no cover - the extra is missing
    raise ImportError(
        "safepg.sqlalchemy needs SQLAlchemy 2: pip install 'safepg-tls[sqlalchemy]'"
    ) from _ex

from .. import _check, _options
from .._connect import connect, connect_async, open_verified, open_verified_async
from .._errors import ConfigurationError, InsecureConnectionError
from .._libpq import ssl_attribute
from .._params import REQUIRED_SSLMODE, KeywordSource, keywords_from
from .._text import shown
from .._typos import may_hold_secret

__all__ = [
    "SafePGAsyncDialect",
    "SafePGDialect",
    "async_creator",
    "asyncpg_creator",
    "connect_args",
    "create_async_engine",
    "create_engine",
    "creator",
    "psycopg2_creator",
]

logger = logging.getLogger("safepg")

# Drivers whose URLs carry libpq's own parameters, which psycopg (and so safepg) understands.
_LIBPQ_DRIVERS = ("", "psycopg", "psycopg_async", "psycopg2", "safepg", "safepg_async")
# Whether the move of a postgresql+psycopg2:// URL to psycopg 3 was logged at INFO already.
_psycopg2_logged: set[str] = set()


def _normalize(url: str | URL, *, for_psycopg2: bool = False) -> URL:
    """*url* as a ``postgresql+psycopg`` URL, from any libpq-style PostgreSQL URL (whose libpq
    parameters *for_psycopg2*, `psycopg2_creator`, uses with psycopg2)."""
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
            "libpq parameters (sslmode, sslrootcert, ...) in the query string. For "
            "postgresql+asyncpg://, use safepg.sqlalchemy.create_async_engine."
        )
    if driver == "psycopg2" and not for_psycopg2:
        # Once at INFO, then at DEBUG: an application may make many engines from one URL.
        level = logging.DEBUG if _psycopg2_logged else logging.INFO
        _psycopg2_logged.add(driver)
        logger.log(
            level,
            "a postgresql+psycopg2:// URL: safepg connects with psycopg 3 instead (its libpq "
            "parameters mean the same there); psycopg2 is not used (to keep it, give "
            "create_engine a creator: safepg.sqlalchemy.psycopg2_creator)",
        )
    return parsed.set(drivername="postgresql+psycopg")


def connect_args(url: str | URL) -> dict[str, Any]:
    """The keyword arguments for `safepg.connect` that *url* stands for.

    SQLAlchemy's own psycopg dialect reads the URL, so its forms (multiple hosts as
    ``?host=a:5432&host=b:5433``, query parameters) mean what they mean there.
    """
    return _connect_args(_normalize(url))


def _connect_args(url: URL) -> dict[str, Any]:
    dialect = PGDialect_psycopg()  # type: ignore[no-untyped-call]
    cargs, cparams = dialect.create_connect_args(url)  # type: ignore[no-untyped-call]
    if cargs and cargs != [""]:  # pragma: no cover - the dialect passes keywords only
        raise ConfigurationError("unexpected positional connection arguments")
    return dict(cparams)


# safepg's own connection options, which libpq does not know.
_SAFEPG_KEYWORDS = frozenset(
    {"verify_as", "allow_unencrypted_unix_socket", "fast_path", "direct_tls"}
)
# Parameters a URL gives outside its query (postgresql://user:password@host:port/dbname).
_URL_PARTS = frozenset({"host", "port", "user", "password", "dbname"})


def _url_source(url: str | URL) -> KeywordSource:
    """Messages name the parameters as the user set them: in the URL's query, elsewhere in
    the URL, or in ``connect_args``."""
    parsed = make_url(url)
    query = frozenset(parsed.query)
    # A password with an unescaped "@" and "?" ("bob:p@ss?word=x@host") puts part of itself in
    # the query: a query key is named only when the URL could not hold a password.
    hidden = query if may_hold_secret(parsed.render_as_string(hide_password=False)) else frozenset()

    def origin(key: str) -> str:
        if key in query:
            return f"?{key}= in the SQLAlchemy URL"
        if key in _URL_PARTS:
            return "the SQLAlchemy URL"
        return f'connect_args["{key}"]'

    def spelling(key: str, value: str) -> str:
        if key in _SAFEPG_KEYWORDS:  # safepg's own options: not libpq's, not for the URL
            return f'connect_args={{"{key}": "{value}"}}'
        return f"?{key}={value} in the SQLAlchemy URL"

    return KeywordSource(origin, spelling, lambda key: key not in hidden)


def creator(url: str | URL, **kwargs: Any) -> Callable[[], Connection[Any]]:
    """A ``creator`` for `sqlalchemy.create_engine`: each call is a new `safepg.connect`.

    *kwargs* are `safepg.connect`'s (libpq parameters, ``fast_path``, ...) and override the
    URL's.
    """
    params = {**connect_args(url), **kwargs}
    source = _url_source(url)

    def create() -> Connection[Any]:
        with keywords_from(source):
            return connect(**params)

    return create


def psycopg2_creator(url: str | URL, **kwargs: Any) -> Callable[[], Any]:
    """A ``creator`` for a ``postgresql+psycopg2://`` engine: each call is a new
    `safepg.psycopg2.connect`, returning a psycopg2 connection (``safepg-tls[psycopg2]``)::

        engine = sqlalchemy.create_engine(
            "postgresql+psycopg2://", creator=safepg.sqlalchemy.psycopg2_creator(url)
        )

    *kwargs* are `safepg.psycopg2.connect`'s and override the URL's.
    """
    from ..psycopg2 import connect as connect_psycopg2

    params = {**_connect_args(_normalize(url, for_psycopg2=True)), **kwargs}
    source = _url_source(url)

    def create() -> Any:
        with keywords_from(source):
            return connect_psycopg2(**params)

    return create


def async_creator(url: str | URL, **kwargs: Any) -> Callable[[], Awaitable[AsyncConnection[Any]]]:
    """An ``async_creator`` for `create_async_engine`: each call is a new `safepg.connect_async`."""
    params = {**connect_args(url), **kwargs}
    source = _url_source(url)

    async def create() -> AsyncConnection[Any]:
        with keywords_from(source):
            conn: AsyncConnection[Any] = await connect_async(**params)
        return conn

    return create


def _engine_url_and_kwargs(url: str | URL, kw: dict[str, Any]) -> tuple[URL, dict[str, Any]]:
    # With a creator, SQLAlchemy ignores connect_args: fold them into safepg's parameters.
    return _normalize(url), dict(kw.pop("connect_args", None) or {})


def create_engine(url: str | URL, **kw: Any) -> Engine:
    """`sqlalchemy.create_engine` with every connection opened by `safepg.connect`.

    Every engine and pool option is passed through; ``connect_args`` become safepg's
    connection parameters. A URL cannot hold a password callable (a cloud IAM token provider):
    pass it as ``connect_args={"password": provider}``; it is called for every new connection.
    """
    normalized, extra = _engine_url_and_kwargs(url, kw)
    return sqlalchemy.create_engine(normalized, creator=creator(url, **extra), **kw)


def create_async_engine(url: str | URL, **kw: Any) -> AsyncEngine:
    """`sqlalchemy.ext.asyncio.create_async_engine`, opening connections by `connect_async`.

    A ``postgresql+asyncpg://`` URL keeps asyncpg: its connections are opened by
    `safepg.asyncpg.connect` (see `asyncpg_creator`), and need ``safepg-tls[asyncpg]``.
    """
    if _is_asyncpg(url):
        parsed = make_url(url)
        creator_fn = asyncpg_creator(parsed, **dict(kw.pop("connect_args", None) or {}))
        return _create_async_engine(parsed.set(query={}), async_creator=creator_fn, **kw)
    normalized, extra = _engine_url_and_kwargs(url, kw)
    return _create_async_engine(
        normalized.set(drivername="postgresql+psycopg_async"),
        async_creator=async_creator(url, **extra),
        **kw,
    )


# -- asyncpg -----------------------------------------------------------------------------------

# A postgresql+asyncpg:// URL's query options that safepg.asyncpg.connect takes, besides
# libpq's; sslmode and ssl weaker than verify-full are raised there. Anything else is refused.
# libpq's own options (sslmode, sslrootcert, sslcrl, ...) are taken by name, under the policy.
_ASYNCPG_URL_OPTIONS = {
    "ssl": str, "timeout": "seconds", "command_timeout": "seconds",
    "statement_cache_size": "count", "connect_timeout": "count", "application_name": str,
    "direct_tls": str,
}  # fmt: skip
# Numbers in a URL, parsed strictly: ASCII digits only (no nan, inf, signs or other scripts).
_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")
_COUNT = re.compile(r"[0-9]{1,9}")


def _is_asyncpg(url: str | URL) -> bool:
    try:
        return make_url(url).drivername in ("postgresql+asyncpg", "postgres+asyncpg")
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return False  # _normalize says what is wrong with it


def asyncpg_creator(url: str | URL, **kwargs: Any) -> Callable[[], Awaitable[Any]]:
    """An ``async_creator`` for a ``postgresql+asyncpg://`` engine: each call is a new
    `safepg.asyncpg.connect`, with the URL's parts as SQLAlchemy's asyncpg dialect reads them
    (``?host=a:5432&host=b:5433`` too).

    *kwargs* are `safepg.asyncpg.connect`'s and override the URL's. Query options other than
    libpq's (each passed on with the same meaning or refused, see the option policy), ssl,
    timeout, command_timeout, statement_cache_size and direct_tls are refused: they would go
    to the server as settings, or mean something else to asyncpg.

    Raises:
        ConfigurationError: not a postgresql+asyncpg URL, or an option safepg does not take.
    """
    from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

    import safepg.asyncpg  # the asyncpg extra, only when used

    parsed = make_url(url)
    if not _is_asyncpg(parsed):
        raise ConfigurationError("asyncpg_creator takes a postgresql+asyncpg:// URL")
    _, opts = PGDialect_asyncpg().create_connect_args(parsed)  # type: ignore[no-untyped-call]
    params: dict[str, Any] = {}
    secret_url = may_hold_secret(parsed.render_as_string(hide_password=False))
    for key, value in opts.items():
        if key in ("user", "password", "host", "port", "database"):
            params[key] = value
            continue
        # libpq's options go to safepg.asyncpg.connect by name, under the option policy.
        kind = _ASYNCPG_URL_OPTIONS.get(key) or (str if key in _options.KEYWORDS else None)
        if kind is None:
            # Part of a password with an unescaped "@" and "?" may have become a query key.
            named = " (not named: it may be part of the password)" if secret_url else f" {key!r}"
            raise ConfigurationError(
                f"the URL's query option{named} is not one safepg passes to asyncpg; it takes "
                f"libpq's options and {', '.join(sorted(_ASYNCPG_URL_OPTIONS))}. Give other "
                "asyncpg arguments as connect_args."
            )
        if not isinstance(value, str):
            raise ConfigurationError(f"the URL gives {key} more than once")
        if kind == "seconds":
            if not _SECONDS.fullmatch(value) or float(value) <= 0:
                raise ConfigurationError(
                    f"the URL's {key} must be a number of seconds above 0 (digits, and a '.')"
                )
            params[key] = float(value)
        elif kind == "count":
            if not _COUNT.fullmatch(value):
                raise ConfigurationError(f"the URL's {key} must be a whole number (digits)")
            params[key] = int(value)
        else:
            params[key] = value
    if "connect_timeout" in params:  # libpq's name; asyncpg calls it timeout
        seconds = params.pop("connect_timeout")
        if seconds > 0:  # 0 is libpq's "no timeout": asyncpg's default then
            params.setdefault("timeout", float(seconds))
    if "application_name" in params:
        settings = {"application_name": params.pop("application_name")}
        params["server_settings"] = {**settings, **(kwargs.pop("server_settings", None) or {})}
    params.update(kwargs)
    # Refused now, when the engine is made, rather than on its first connection.
    safepg.asyncpg.check_arguments(None, params)

    async def create() -> Any:
        return await safepg.asyncpg.connect(**params)

    return create


# -- the dialects' DBAPI -----------------------------------------------------------------------


def _keyword_only(fn: Callable[..., Any]) -> frozenset[str]:
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


# psycopg's own connect options go to the opener untouched; safepg's (allow_unencrypted_unix_socket,
# fast_path, ...) go to open_verified; everything else is a libpq parameter, hardened.
_PSYCOPG_OPTIONS = _keyword_only(Connection.connect) | _keyword_only(AsyncConnection.connect)
# password is a libpq parameter, which safepg.connect names only to type its callables.
_SAFEPG_OPTIONS = _keyword_only(connect) - _PSYCOPG_OPTIONS - {"password"}


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """*kwargs* as (libpq parameters, psycopg options, safepg options)."""
    options = {k: kwargs.pop(k) for k in _PSYCOPG_OPTIONS & kwargs.keys()}
    safety = {k: kwargs.pop(k) for k in _SAFEPG_OPTIONS & kwargs.keys()}
    safety.setdefault("allow_unencrypted_unix_socket", False)
    safety.setdefault("fast_path", None)
    return kwargs, options, safety


def _through_safepg(driver: Any) -> Callable[..., Connection[Any]]:
    """`safepg.connect`, with *driver*'s ``connect`` (psycopg's call shape) as the opener."""

    def connect_with(conninfo: str = "", **kwargs: Any) -> Connection[Any]:
        params, options, safety = _split(kwargs)
        return open_verified(driver.connect, conninfo, params, **safety, **options)

    return connect_with


def _unverified(conn: Any) -> str | None:
    """Why a connection that safepg did not open is below policy, or None. No round trip."""
    if isinstance(conn, (Connection, AsyncConnection)) and conn in _check._plans:
        return None  # opened by safepg, and checked then
    # A proxy of a connection (SQLAlchemy's DBAPIProxyConnection, a tracing wrapper) is judged
    # by the libpq connection it hands on. Anything else has no TLS state to read: refused as
    # such, not by the TypeError or AttributeError that a look-up in _plans or at its pgconn
    # would raise.
    pgconn = getattr(conn, "pgconn", None)
    if not isinstance(pgconn, pq.PGconn):
        return f"it is not a psycopg connection but {shown(_type_name(conn))}"
    if not pgconn.ssl_in_use:
        return "the session is not encrypted (libpq reports no TLS in use)"
    sslmode = _check._sslmode(pgconn)
    if sslmode != REQUIRED_SSLMODE:
        return f"it uses sslmode={sslmode}, which does not verify the server"
    protocol = ssl_attribute(pgconn, "protocol")  # its own ssl_min_protocol_version may be low
    if protocol is None:
        return "libpq does not say which TLS version it uses"
    if protocol not in _check.ACCEPTED_PROTOCOLS:
        return f"it uses {shown(protocol)}, below the TLS 1.2 minimum"
    return _breaks_policy(pgconn)


def _breaks_policy(pgconn: pq.abc.PGconn) -> str | None:
    """How a connection opened elsewhere breaks the option policy (an ``sslkeylogfile`` that
    writes its TLS secrets, an unchecked CRL directory), or None: as refused on safepg's paths.
    """
    options = {
        opt.keyword.decode(): opt.val.decode("utf-8", "replace")
        for opt in pgconn.info
        if opt.val is not None
    }
    try:
        _options.check(options, {}, lambda _key, _envvar: "the connection's own options")
    except ConfigurationError as ex:
        problem = str(ex)  # names the option, never its value
    else:
        return None
    return f"it breaks safepg's option policy ({problem})"


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _refuse_unverified(conn: Any) -> None:
    problem = _unverified(conn)
    if problem is not None:
        raise InsecureConnectionError(
            f"safepg refused a connection that was not opened through safepg: {problem}. Open "
            "it with safepg.connect, or let the engine open it (dialect.dbapi.connect)."
        )


class _DBAPI(types.ModuleType):
    """The sync dialect's DBAPI: a psycopg-like module's attributes, connecting through safepg.

    ``connect`` is `safepg.connect` for psycopg itself; for another module (``create_engine(...,
    module=M)``), M's ``connect`` opens each connection, with safepg's hardening and check.
    """

    def __init__(self, driver: Any) -> None:
        super().__init__(getattr(driver, "__name__", "psycopg"), getattr(driver, "__doc__", None))
        if not callable(getattr(driver, "connect", None)):
            raise ConfigurationError(
                f"{driver!r} has no connect(): postgresql+safepg needs a DBAPI module with "
                "psycopg's connect()"
            )
        self.driver = driver
        self.connect = connect if driver is psycopg else _through_safepg(driver)

    def __getattr__(self, name: str) -> Any:
        if "driver" not in self.__dict__:  # not initialised (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.__dict__["driver"], name)

    def __repr__(self) -> str:
        return f"<safepg's DBAPI for {self.driver!r}>"


def _safe_creator(kw: dict[str, Any], default_opener: Any, has_params: bool) -> Any:
    """The ``async_creator_fn`` that an adapter's ``connect`` is to use: *kw*'s (popped), made
    safe, or *default_opener* through safepg.

    A creator given with connection parameters is the opener (``AsyncConnection.connect``'s
    call shape) and gets the hardened parameters; given alone, it is called as it is, and what
    it returns is refused unless it is verified. One that is safepg's already stays as it is.
    """
    creator = kw.pop("async_creator_fn", None)
    if creator is None:
        return _through_safepg_async(default_opener)
    if creator is connect_async or creator in _HARDENING_OPENERS:
        return creator
    if has_params or kw:
        return _through_safepg_async(creator)
    return _checked(creator)


class _AsyncDBAPI(PsycopgAdaptDBAPI):
    """The async dialect's DBAPI: SQLAlchemy's psycopg adapter, connecting through safepg.

    ``connect(...)`` opens with `safepg.connect_async`; an ``async_creator_fn`` is made safe
    as `_safe_creator` says.
    """

    def connect(self, *arg: Any, **kw: Any) -> Any:
        opener = self.psycopg.AsyncConnection.connect
        kw["async_creator_fn"] = _safe_creator(kw, opener, bool(arg))
        return super().connect(*arg, **kw)  # type: ignore[no-untyped-call]


class _WrappedAsyncDBAPI(types.ModuleType):
    """The async dialect's DBAPI for ``module=W``, where W is a DBAPI in SQLAlchemy's adapted
    form that hands its calls on to another (SQLAlchemy's test ``ReconnectFixture``, a
    tracing wrapper): W's attributes, and W's ``connect``, given a safe ``async_creator_fn``.

    W's ``connect`` is expected to pass the ``async_creator_fn`` on to an adapter's, as
    SQLAlchemy's adapters take it; whatever it returns is checked by the pool all the same.
    """

    def __init__(self, wrapped: Any) -> None:
        super().__init__(type(wrapped).__name__, None)
        self.wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        if "wrapped" not in self.__dict__:  # not initialised (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.__dict__["wrapped"], name)

    def connect(self, *arg: Any, **kw: Any) -> Any:
        opener = self.wrapped.AsyncConnection.connect
        kw["async_creator_fn"] = _safe_creator(kw, opener, bool(arg))
        return self.wrapped.connect(*arg, **kw)

    def __repr__(self) -> str:
        return f"<safepg's DBAPI for {self.wrapped!r}>"


# SQLAlchemy 2.1's adapter also takes psycopg's ExecStatus; 2.0's takes the module only.
_ADAPTER_TAKES_EXEC_STATUS = (
    "ExecStatus" in inspect.signature(PsycopgAdaptDBAPI.__init__).parameters
)


def _adapted(module: Any) -> _AsyncDBAPI:
    """`_AsyncDBAPI` for a psycopg-like *module*, on SQLAlchemy 2.0 and 2.1 alike."""
    if _ADAPTER_TAKES_EXEC_STATUS:
        return _AsyncDBAPI(module, ExecStatus)
    # SQLAlchemy 2.0's async cursor reads psycopg's ExecStatus from a class attribute that only
    # its own dialect's import_dbapi sets: without this, in a process that never made a
    # postgresql+psycopg_async engine, every statement failed ('NoneType' object has no
    # attribute 'TUPLES_OK').
    PGDialectAsync_psycopg.import_dbapi()  # type: ignore[no-untyped-call,unused-ignore]
    return _AsyncDBAPI(module)  # type: ignore[call-arg,unused-ignore]


# The openers _through_safepg_async made: they harden what they are given, and check.
_HARDENING_OPENERS: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def _through_safepg_async(opener: Any) -> Callable[..., Awaitable[AsyncConnection[Any]]]:
    if opener == AsyncConnection.connect:
        return connect_async

    async def connect_with(conninfo: str = "", **kwargs: Any) -> AsyncConnection[Any]:
        params, options, safety = _split(kwargs)
        conn: AsyncConnection[Any] = await open_verified_async(
            opener, conninfo, params, **safety, **options
        )
        return conn

    _HARDENING_OPENERS.add(connect_with)
    return connect_with


def _checked(creator: Any) -> Callable[[], Awaitable[AsyncConnection[Any]]]:
    async def create() -> AsyncConnection[Any]:
        conn: AsyncConnection[Any] = await creator()
        try:
            _refuse_unverified(conn)
        except InsecureConnectionError:
            if isinstance(conn, AsyncConnection):  # anything else: not safepg's to close
                await conn.close()
            raise
        return conn

    return create


def _sync_dbapi(value: Any) -> Any:
    if value is None or isinstance(value, _DBAPI):
        return value
    return _DBAPI(value)


def _async_dbapi(value: Any) -> Any:
    if value is None or isinstance(value, (_AsyncDBAPI, _WrappedAsyncDBAPI)):
        return value
    if isinstance(value, PsycopgAdaptDBAPI):
        return _adapted(value.psycopg)
    if not callable(getattr(getattr(value, "AsyncConnection", None), "connect", None)):
        raise ConfigurationError(
            f"{value!r} has no AsyncConnection.connect(): postgresql+safepg_async needs a "
            "psycopg-like DBAPI module"
        )
    if "AsyncConnection" not in getattr(value, "__dict__", {}) and hasattr(value, "paramstyle"):
        # Not a module like psycopg's (whose attributes the adapter copies from its __dict__)
        # but a DBAPI that hands its attributes on from another, such as SQLAlchemy's
        # ReconnectFixture of the dialect's own DBAPI: adapting that as a module failed with
        # "'_AsyncDBAPI' object has no attribute 'paramstyle'".
        return _WrappedAsyncDBAPI(value)
    return _adapted(value)


def _refuse_at_connect(dbapi_conn: Any, record: Any) -> None:
    """The pool's first look at a new connection, before SQLAlchemy's own setup queries."""
    _refuse_unverified(getattr(dbapi_conn, "driver_connection", dbapi_conn))


def _watch_pool(pool: Pool) -> None:
    # A pool listener, not the dialect's on_connect: SQLAlchemy skips that one with
    # create_engine(..., _initialize=False). Inserted first, so that nothing is sent first.
    # Asked of the pool's own listeners: sqlalchemy.event.contains() goes by id(pool), and
    # answers yes for a new pool that reuses a dead one's address while its listeners linger.
    if _refuse_at_connect not in list(pool.dispatch.connect):
        sqlalchemy.event.listen(pool, "connect", _refuse_at_connect, insert=True)


_PSYCOPG_DBAPI = _DBAPI(psycopg)


def _load_provisioning() -> None:
    """Import `safepg.sqlalchemy.provision`: SQLAlchemy's test provisioning, PostgreSQL's.

    SQLAlchemy's default looks for ``provision`` in the package of the dialect's module, which
    would be ``safepg.provision``.
    """
    importlib.import_module(f"{__name__}.provision")


class _Safe:
    """What both dialects add to SQLAlchemy's: a hardened DBAPI, a watched pool, provisioning."""

    _harden_dbapi: Callable[[Any], Any]

    @classmethod
    def load_provisioning(cls) -> None:
        _load_provisioning()

    # A property, so that every DBAPI set is hardened, with a deleter: mock.patch.object(dialect,
    # "dbapi", ...) sets, then deletes and, the attribute being gone, sets the original again.
    @property
    def dbapi(self) -> Any:
        try:
            return self.__dict__["_safepg_dbapi"]
        except KeyError:
            raise AttributeError("dbapi") from None

    @dbapi.setter
    def dbapi(self, value: Any) -> None:
        self.__dict__["_safepg_dbapi"] = self._harden_dbapi(value)

    @dbapi.deleter
    def dbapi(self) -> None:
        try:
            del self.__dict__["_safepg_dbapi"]
        except KeyError:
            raise AttributeError("dbapi") from None

    @classmethod
    def get_async_dialect_cls(cls, url: URL) -> type[SafePGAsyncDialect]:
        # create_async_engine("postgresql+safepg://") must not fall back to plain psycopg.
        return SafePGAsyncDialect

    @classmethod
    def engine_created(cls, engine: Engine) -> None:
        _watch_pool(engine.pool)

    def create_connect_args(self, url: URL) -> Any:
        self.__dict__["_safepg_source"] = _url_source(url)
        return super().create_connect_args(url)  # type: ignore[misc]

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        source = self.__dict__.get("_safepg_source")
        if source is None:
            return super().connect(*cargs, **cparams)  # type: ignore[misc]
        with keywords_from(source):
            return super().connect(*cargs, **cparams)  # type: ignore[misc]


class SafePGDialect(_Safe, PGDialect_psycopg):
    """The ``postgresql+safepg://`` dialect: SQLAlchemy's psycopg dialect, through safepg.

    Its DBAPI (``dialect.dbapi``) is psycopg's module with ``connect`` = `safepg.connect`;
    with ``create_engine(..., module=M)``, M's ``connect`` opens connections, hardened and
    checked the same way. Every new pooled connection, also one from a ``creator`` or a
    ``do_connect`` hook, is refused unless safepg opened it or it is verified.
    """

    driver = "safepg"
    supports_statement_cache = True
    _harden_dbapi = staticmethod(_sync_dbapi)

    @classmethod
    def import_dbapi(cls) -> Any:
        return _PSYCOPG_DBAPI


class SafePGAsyncDialect(_Safe, PGDialectAsync_psycopg):
    """The ``postgresql+safepg_async://`` dialect, for `create_async_engine`.

    Its DBAPI is SQLAlchemy's psycopg adapter, connecting with `safepg.connect_async`; an
    ``async_creator_fn`` passed to ``dialect.dbapi.connect`` with connection parameters opens
    the connection with the hardened parameters. As for `SafePGDialect`, every new pooled
    connection is refused unless safepg opened it or it is verified.
    """

    # As SQLAlchemy's own async dialects do (postgresql+psycopg_async is driver "psycopg", with
    # is_async = True), the async variant keeps the sync driver's name: "+safepg" in SQLAlchemy's
    # test exclusions and in engine.driver means both. URLs still name it safepg_async.
    driver = "safepg"
    is_async = True
    supports_statement_cache = True

    _harden_dbapi = staticmethod(_async_dbapi)

    @classmethod
    def import_dbapi(cls) -> Any:
        return _adapted(psycopg)
