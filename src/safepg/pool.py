"""psycopg_pool pools whose every connection is opened through safepg (``safepg-tls[pool]``).

::

    from safepg.pool import ConnectionPool

    with ConnectionPool("host=db.example.com dbname=app user=app", max_size=10) as pool:
        with pool.connection() as conn:
            conn.execute("SELECT 1")

These are psycopg_pool's own classes, with one change: the connection class they open
connections with goes through safepg's hardening, diagnosis and post-connect check. That
covers every connection, including the ones the pool opens later to replace broken or expired
ones. Every psycopg_pool argument works as documented there. A password callable (a cloud IAM
token provider, see `safepg.connect`) passed as ``kwargs={"password": provider}`` is called for
every connection the pool opens, so no connection is opened with an expired token.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, overload

from psycopg import AsyncConnection, Connection
from psycopg.rows import TupleRow

try:
    from psycopg_pool import AsyncConnectionPool as _AsyncConnectionPool
    from psycopg_pool import ConnectionPool as _ConnectionPool
except ImportError as _ex:  # pragma: no cover - the extra is missing
    raise ImportError("safepg.pool needs psycopg_pool: pip install 'safepg-tls[pool]'") from _ex

from ._connect import open_verified, open_verified_async

__all__ = ["AsyncConnectionPool", "ConnectionPool", "verified_async_class", "verified_class"]

CT = TypeVar("CT", bound="Connection[Any]")
ACT = TypeVar("ACT", bound="AsyncConnection[Any]")

# psycopg's own options of Connection.connect; everything else is a libpq parameter.
_PSYCOPG_OPTIONS = ("autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory")


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    options = {k: kwargs.pop(k) for k in _PSYCOPG_OPTIONS if k in kwargs}
    return options, kwargs


def verified_class(
    base: type[CT],
    *,
    allow_unencrypted_unix_socket: bool = False,
    fast_path: bool | None = None,
    verify_as: str | None = None,
    direct_tls: bool | None = None,
) -> type[CT]:
    """A subclass of *base* whose ``connect()`` goes through safepg.

    For any code that takes a connection class, as psycopg_pool's ``connection_class`` does.
    *base*'s own ``connect()`` (psycopg's, or your override) opens the connection.
    """

    class Verified(base):  # type: ignore[valid-type,misc]
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            options, params = _split(kwargs)
            return open_verified(
                super().connect,
                conninfo,
                params,
                allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
                fast_path=fast_path,
                verify_as=verify_as,
                direct_tls=direct_tls,
                **options,
            )

    Verified.__name__ = Verified.__qualname__ = f"Verified{base.__name__}"
    Verified.__module__ = __name__
    return Verified


def verified_async_class(
    base: type[ACT],
    *,
    allow_unencrypted_unix_socket: bool = False,
    fast_path: bool | None = None,
    verify_as: str | None = None,
    direct_tls: bool | None = None,
) -> type[ACT]:
    """`verified_class` for `psycopg.AsyncConnection` and its subclasses."""

    class Verified(base):  # type: ignore[valid-type,misc]
        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            options, params = _split(kwargs)
            return await open_verified_async(
                super().connect,
                conninfo,
                params,
                allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
                fast_path=fast_path,
                verify_as=verify_as,
                direct_tls=direct_tls,
                **options,
            )

    Verified.__name__ = Verified.__qualname__ = f"Verified{base.__name__}"
    Verified.__module__ = __name__
    return Verified


class ConnectionPool(_ConnectionPool[CT], Generic[CT]):
    """`psycopg_pool.ConnectionPool`, with every connection opened through safepg.

    Takes psycopg_pool's arguments, plus safepg's *allow_unencrypted_unix_socket*,
    *fast_path*, *verify_as* and *direct_tls* (see `safepg.connect`). Connection errors are
    safepg's (for example `safepg.HostnameMismatchError`), which psycopg_pool reports and
    retries as it does any `psycopg.OperationalError`.
    """

    @overload
    def __init__(
        self: ConnectionPool[Connection[TupleRow]],
        conninfo: str = "",
        *,
        allow_unencrypted_unix_socket: bool = False,
        fast_path: bool | None = None,
        verify_as: str | None = None,
        direct_tls: bool | None = None,
        **kwargs: Any,
    ) -> None: ...

    @overload
    def __init__(
        self,
        conninfo: str = "",
        *,
        connection_class: type[CT],
        allow_unencrypted_unix_socket: bool = False,
        fast_path: bool | None = None,
        verify_as: str | None = None,
        direct_tls: bool | None = None,
        **kwargs: Any,
    ) -> None: ...

    def __init__(
        self,
        conninfo: str = "",
        *,
        connection_class: type[CT] = Connection,  # type: ignore[assignment]
        allow_unencrypted_unix_socket: bool = False,
        fast_path: bool | None = None,
        verify_as: str | None = None,
        direct_tls: bool | None = None,
        **kwargs: Any,
    ) -> None:
        cls = verified_class(
            connection_class,
            allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
            fast_path=fast_path,
            verify_as=verify_as,
            direct_tls=direct_tls,
        )
        super().__init__(conninfo, connection_class=cls, **kwargs)


class AsyncConnectionPool(_AsyncConnectionPool[ACT], Generic[ACT]):
    """`psycopg_pool.AsyncConnectionPool`, with every connection opened through safepg."""

    @overload
    def __init__(
        self: AsyncConnectionPool[AsyncConnection[TupleRow]],
        conninfo: str = "",
        *,
        allow_unencrypted_unix_socket: bool = False,
        fast_path: bool | None = None,
        verify_as: str | None = None,
        direct_tls: bool | None = None,
        **kwargs: Any,
    ) -> None: ...

    @overload
    def __init__(
        self,
        conninfo: str = "",
        *,
        connection_class: type[ACT],
        allow_unencrypted_unix_socket: bool = False,
        fast_path: bool | None = None,
        verify_as: str | None = None,
        direct_tls: bool | None = None,
        **kwargs: Any,
    ) -> None: ...

    def __init__(
        self,
        conninfo: str = "",
        *,
        connection_class: type[ACT] = AsyncConnection,  # type: ignore[assignment]
        allow_unencrypted_unix_socket: bool = False,
        fast_path: bool | None = None,
        verify_as: str | None = None,
        direct_tls: bool | None = None,
        **kwargs: Any,
    ) -> None:
        cls = verified_async_class(
            connection_class,
            allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
            fast_path=fast_path,
            verify_as=verify_as,
            direct_tls=direct_tls,
        )
        super().__init__(conninfo, connection_class=cls, **kwargs)
