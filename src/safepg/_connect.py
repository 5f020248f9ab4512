"""`connect` and `connect_async`: psycopg's calls, hardened, diagnosed and checked."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, overload

import psycopg
from psycopg import AsyncConnection, AsyncCursor, Connection, Cursor
from psycopg.abc import AdaptContext, ConnParam
from psycopg.rows import AsyncRowFactory, Row, RowFactory, TupleRow

from . import _check, _diagnose, _fastpath, _fetch, _password
from ._deadline import Deadline
from ._errors import ConfigurationError, InsecureConnectionError
from ._params import Plan, as_optional_bool, build_plan
from ._password import AsyncPasswordSource, ConnectTarget, PasswordSource
from ._plans import plan_for
from ._text import shown_lines
from ._trust import TrustSource

logger = logging.getLogger("safepg")
CT = TypeVar("CT", bound="Connection[Any]")
E = TypeVar("E", bound=Exception)
ACT = TypeVar("ACT", bound="AsyncConnection[Any]")

__all__ = ["connect", "connect_async", "resolve_trust", "secure_conninfo"]


def secure_conninfo(
    conninfo: str = "",
    *,
    allow_unencrypted_unix_socket: bool = False,
    verify_as: str | None = None,
    **kwargs: ConnParam,
) -> str:
    """Return the conninfo string safepg would connect with, for any libpq client.

    Use it for psql, psycopg_pool, psycopg2 and other libpq users. The result always holds
    ``sslmode=verify-full``, ``sslrootcert`` (see `resolve_trust`), ``gssencmode=disable`` and a
    TLS minimum of 1.2; everything else is passed through untouched. It contains the password
    if you gave one.

    Args:
        conninfo: a libpq conninfo string or a ``postgresql://`` URL.
        allow_unencrypted_unix_socket: accept a Unix-domain socket host, which libpq never
            encrypts. Off by default.
        verify_as: verify the certificate for this name while dialling the host given (see
            `connect`). The alias is resolved here, so this does DNS lookups.
        **kwargs: libpq connection parameters, overriding those in *conninfo*.

    Raises:
        ConfigurationError: the parameters are invalid, or cannot give a verified session.
    """
    return build_plan(
        conninfo,
        kwargs,
        allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
        verify_as=verify_as,
    ).conninfo


def resolve_trust(
    conninfo: str = "",
    *,
    allow_unencrypted_unix_socket: bool = False,
    verify_as: str | None = None,
    **kwargs: ConnParam,
) -> TrustSource:
    """Return the trust anchors safepg would use for these parameters: a PEM path and a label.

    The order: the caller's ``sslrootcert``; ``PGSSLROOTCERT``; ``~/.postgresql/root.crt``; a
    bundled provider set chosen by host name (Amazon RDS), or the CA fetched from the
    provider's API (Cloud SQL, DigitalOcean, Aiven: an HTTPS request the first time, then
    cached); the OS trust store; certifi. A password callable is not called.

    Raises:
        ConfigurationError: as for `secure_conninfo`, or a CA file named by the caller is
            missing, empty, unreadable or not PEM, or a provider's CA could not be fetched.
    """
    return build_plan(
        conninfo,
        _password.split(kwargs)[0],
        allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
        verify_as=verify_as,
    ).trust


def _admit(
    conn: Connection[Any] | AsyncConnection[Any], plan: Plan
) -> InsecureConnectionError | None:
    """Check a new session (no round trip); the error to raise after closing it, or None."""
    problem = _check.session_problem(conn.pgconn, plan.allow_unix_socket)
    if problem is None:
        _check.remember(conn, plan)
        return None
    err = InsecureConnectionError(
        f"safepg refused the session: {problem}. Trust anchors: {plan.trust}."
    )
    err.host = (conn.pgconn.host or b"").decode("utf-8", "replace")
    err.port = _check._port(conn.pgconn)
    err.trust = plan.trust
    return err


def _with_direct_tls(plan: Plan, option: object) -> Plan:
    """Apply the caller's direct_tls choice; the caller's own sslnegotiation always wins."""
    direct_tls = as_optional_bool("direct_tls", option)
    if direct_tls is None:
        return plan
    if plan.negotiation_chosen:
        raise ConfigurationError(
            "direct_tls and sslnegotiation were both given; keep one (safepg never overrides "
            "the sslnegotiation you set)."
        )
    if not direct_tls:
        return dataclasses.replace(plan, direct_tls=False)
    if not _fastpath.libpq_has_direct():
        raise ConfigurationError(
            f"direct_tls=True needs libpq 17 or later; this is libpq {psycopg.pq.version()}. "
            "Use psycopg-binary (which bundles a newer libpq), or drop direct_tls."
        )
    params = {**plan.params, "sslnegotiation": "direct"}
    return dataclasses.replace(plan, params=params, direct_tls=True)


def _with(kwargs: Mapping[str, Any], password: object) -> Mapping[str, Any]:
    """libpq's keyword arguments with the *password* argument (a str or a callable) in them."""
    return kwargs if password is None else {**kwargs, "password": password}


def _start(
    conninfo: str,
    kwargs: Mapping[str, Any],
    allow_unencrypted_unix_socket: object,
    verify_as: str | None,
    direct_tls: object,
) -> tuple[Plan, Deadline, Callable[..., Any] | None, ConnectTarget | None]:
    """The plan and deadline, and a password callable with the target to call it for."""
    kwargs, provider = _password.split(kwargs)
    plan = plan_for(
        conninfo,
        kwargs,
        allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
        verify_as=verify_as,
    )
    target = _password.target(plan) if provider is not None else None
    return _with_direct_tls(plan, direct_tls), Deadline(plan.timeout), provider, target


def _scrubbed(ex: E) -> E:
    """libpq's error without what could leak the password: psycopg keeps a snapshot of the
    failed connection (``ex.pgconn``) whose repr and ``info`` hold the password and
    sslpassword, and its traceback's frames hold the conninfo. The message stays."""
    if isinstance(ex, psycopg.Error) and getattr(ex, "_pgconn", None) is not None:
        ex._pgconn = None  # psycopg drops it too when pickling an error
    return ex.with_traceback(None)


def failure(
    ex: Exception,
    used: Plan,
    budget: float,
    cause: Callable[[str], Exception] = psycopg.OperationalError,
) -> BaseException:
    """The error to raise for libpq's failure *ex*: safepg's diagnosis, with libpq's error as
    its cause, or libpq's own error when it is not a TLS problem; both scrubbed.

    A TLS failure's message quotes the server's certificate, so the cause is a copy of libpq's
    error with that text escaped (made by *cause*, the driver's OperationalError): a printed
    traceback shows it too."""
    err = _diagnose.diagnose(ex, used, budget=budget)
    scrubbed = _scrubbed(ex)
    if err is None:
        return scrubbed
    err.__cause__ = cause(shown_lines(str(scrubbed)))
    err.__suppress_context__ = True
    return err


def open_verified(
    opener: Callable[..., CT],
    conninfo: str,
    kwargs: Mapping[str, Any],
    *,
    allow_unencrypted_unix_socket: object,
    fast_path: object,
    verify_as: str | None = None,
    direct_tls: object = None,
    **options: Any,
) -> CT:
    """Harden, connect with *opener* (a psycopg ``Connection.connect``), diagnose and check.

    *options* are psycopg's own (autocommit, row_factory, ...), passed to *opener* untouched.
    Probes, libpq's attempts and the diagnosis share one deadline (see `_deadline`). A
    password callable is called for every attempt (a retry too): see `_password`.
    """
    plan, deadline, provider, target = _start(
        conninfo, kwargs, allow_unencrypted_unix_socket, verify_as, direct_tls
    )
    route = _fastpath.route(plan, fast_path)
    conn = route.drive(
        deadline,
        # The token goes into a temporary dict only: no local of this frame holds it.
        lambda params: opener(**_password.with_password(params, provider, target), **options),
        psycopg.OperationalError,
        lambda ex, used: _password.rejected(
            failure(ex, used, deadline.diagnosis_budget()), provider
        ),
    )
    learn = route.verified(_fastpath.PsycopgSession(conn.pgconn))
    if learn is not None:
        learn(deadline.probe_budget())
    refusal = _admit(conn, route.used)
    if refusal:
        conn.close()
        raise refusal
    return conn


async def open_verified_async(
    opener: Callable[..., Awaitable[ACT]],
    conninfo: str,
    kwargs: Mapping[str, Any],
    *,
    allow_unencrypted_unix_socket: object,
    fast_path: object,
    verify_as: str | None = None,
    direct_tls: object = None,
    **options: Any,
) -> ACT:
    """`open_verified` for asyncio; probes, DNS and diagnoses run in a thread, off the loop."""
    start = functools.partial(
        _start, conninfo, kwargs, allow_unencrypted_unix_socket, verify_as, direct_tls
    )
    # A DNS lookup (verify_as) runs in a thread; so does a CA fetch from a provider's API.
    plan, deadline, provider, target = (
        await asyncio.to_thread(start) if verify_as else await _fetch.off_loop(start)
    )
    route = _fastpath.route(plan, fast_path)

    async def attempt(params: Mapping[str, str]) -> ACT:
        # As in open_verified, the token is in a temporary only.
        return await opener(
            **(await _password.with_password_async(params, provider, target)), **options
        )

    async def fail(ex: Exception, used: Plan) -> BaseException:
        err = await asyncio.to_thread(failure, ex, used, deadline.diagnosis_budget())
        return _password.rejected(err, provider)

    conn = await route.drive_async(deadline, attempt, psycopg.OperationalError, fail)
    # The session's facts are read here, while nothing else uses the connection; parsing the
    # trust set and writing the cache run in a thread, off the event loop.
    learn = route.verified(_fastpath.PsycopgSession(conn.pgconn))
    if learn is not None:
        await asyncio.to_thread(learn, deadline.probe_budget())
    refusal = _admit(conn, route.used)
    if refusal:
        await conn.close()
        raise refusal
    return conn


@overload
def connect(
    conninfo: str = "",
    *,
    autocommit: bool = False,
    prepare_threshold: int | None = 5,
    context: AdaptContext | None = None,
    row_factory: RowFactory[Row],
    cursor_factory: type[Cursor[Row]] | None = None,
    password: str | PasswordSource | None = None,
    allow_unencrypted_unix_socket: bool = False,
    fast_path: bool | None = None,
    verify_as: str | None = None,
    direct_tls: bool | None = None,
    **kwargs: ConnParam,
) -> Connection[Row]: ...


@overload
def connect(
    conninfo: str = "",
    *,
    autocommit: bool = False,
    prepare_threshold: int | None = 5,
    context: AdaptContext | None = None,
    row_factory: None = None,
    cursor_factory: type[Cursor[TupleRow]] | None = None,
    password: str | PasswordSource | None = None,
    allow_unencrypted_unix_socket: bool = False,
    fast_path: bool | None = None,
    verify_as: str | None = None,
    direct_tls: bool | None = None,
    **kwargs: ConnParam,
) -> Connection[TupleRow]: ...


def connect(
    conninfo: str = "",
    *,
    autocommit: bool = False,
    prepare_threshold: int | None = 5,
    context: AdaptContext | None = None,
    row_factory: RowFactory[Any] | None = None,
    cursor_factory: type[Cursor[Any]] | None = None,
    password: str | PasswordSource | None = None,
    allow_unencrypted_unix_socket: bool = False,
    fast_path: bool | None = None,
    verify_as: str | None = None,
    direct_tls: bool | None = None,
    **kwargs: ConnParam,
) -> Connection[Any]:
    """Connect like `psycopg.connect`, always with a verified TLS session.

    Takes what `psycopg.connect` takes and returns a real `psycopg.Connection`. The parameters
    go through `secure_conninfo` first, and the new session is checked before it is returned.

    Args:
        conninfo: a libpq conninfo string or a ``postgresql://`` URL.
        autocommit, prepare_threshold, context, row_factory, cursor_factory: as for psycopg.
        password: the password, or a callable that returns it (a cloud IAM token: see
            `safepg.aws`, `safepg.azure`, `safepg.gcp`). A callable is called for every new
            physical connection, right before libpq gets the parameters, with a
            `ConnectTarget` when it takes one argument (a `PasswordProvider`) or with none.
            safepg keeps no token. A retry (a CA rotation, direct TLS refused) calls it again.
            With a callable, a Unix-domain socket host is refused: tokens go over verified
            TLS only.
        allow_unencrypted_unix_socket: accept a Unix-domain socket host (local, never
            encrypted); `check` then reports "local socket, not encrypted". Off by default.
        fast_path: give libpq only the trust anchors learned to verify each host (a probe
            reads the host's chain on the first connect), which makes a verified connect as fast
            as ``sslmode=require``. None (the default) follows ``SAFEPG_FAST_PATH``, which is on
            unless set to 0, off, false or no. It never widens trust: the anchors are a subset
            of the resolved set, and libpq still verifies everything.
        direct_tls: TLS straight away (PostgreSQL 17+, libpq 17+), saving the SSLRequest round
            trip. None (the default): learned per host by the fast path's probe and used when
            the host takes it, falling back (and remembering) when it stops. True: always;
            False: never. An sslnegotiation you set yourself is never overridden.
        verify_as: dial the host given (a DNS alias, such as a CNAME to a managed endpoint) but
            verify the certificate for this name instead. safepg resolves the alias and passes
            libpq ``host=<verify_as>`` with ``hostaddr=<the alias's addresses>``. Needs a single
            host and no hostaddr. Never guessed: without it, a certificate that names another
            host is refused.
        **kwargs: libpq connection parameters, overriding those in *conninfo*.

    Raises:
        ConfigurationError: bad parameters, or ones that cannot give a verified session; raised
            before any network I/O.
        HostnameMismatchError, UntrustedCertificateError, CertificateExpiredError,
        SSLNotSupportedError: the server could not be verified.
        InsecureConnectionError: the session came up below policy (defence in depth).
        TokenRejectedError: the server refused the password a callable gave, with what to
            check.
        psycopg.OperationalError: any other failure (authentication, refused, timeout), as
            psycopg raises it.
    """
    return open_verified(
        Connection.connect,
        conninfo,
        _with(kwargs, password),
        allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
        fast_path=fast_path,
        verify_as=verify_as,
        direct_tls=direct_tls,
        autocommit=autocommit,
        prepare_threshold=prepare_threshold,
        context=context,
        row_factory=row_factory,
        cursor_factory=cursor_factory,
    )


@overload
async def connect_async(
    conninfo: str = "",
    *,
    autocommit: bool = False,
    prepare_threshold: int | None = 5,
    context: AdaptContext | None = None,
    row_factory: AsyncRowFactory[Row],
    cursor_factory: type[AsyncCursor[Row]] | None = None,
    password: str | AsyncPasswordSource | None = None,
    allow_unencrypted_unix_socket: bool = False,
    fast_path: bool | None = None,
    verify_as: str | None = None,
    direct_tls: bool | None = None,
    **kwargs: ConnParam,
) -> AsyncConnection[Row]: ...


@overload
async def connect_async(
    conninfo: str = "",
    *,
    autocommit: bool = False,
    prepare_threshold: int | None = 5,
    context: AdaptContext | None = None,
    row_factory: None = None,
    cursor_factory: type[AsyncCursor[TupleRow]] | None = None,
    password: str | AsyncPasswordSource | None = None,
    allow_unencrypted_unix_socket: bool = False,
    fast_path: bool | None = None,
    verify_as: str | None = None,
    direct_tls: bool | None = None,
    **kwargs: ConnParam,
) -> AsyncConnection[TupleRow]: ...


async def connect_async(
    conninfo: str = "",
    *,
    autocommit: bool = False,
    prepare_threshold: int | None = 5,
    context: AdaptContext | None = None,
    row_factory: AsyncRowFactory[Any] | None = None,
    cursor_factory: type[AsyncCursor[Any]] | None = None,
    password: str | AsyncPasswordSource | None = None,
    allow_unencrypted_unix_socket: bool = False,
    fast_path: bool | None = None,
    verify_as: str | None = None,
    direct_tls: bool | None = None,
    **kwargs: ConnParam,
) -> AsyncConnection[Any]:
    """`connect` for asyncio: like `psycopg.AsyncConnection.connect`, always verified.

    Returns a real `psycopg.AsyncConnection`. Arguments and errors are those of `connect`;
    *password* may also be a coroutine function (awaited), and a plain callable runs in a
    thread, off the event loop.
    """
    return await open_verified_async(
        AsyncConnection.connect,
        conninfo,
        _with(kwargs, password),
        allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
        fast_path=fast_path,
        verify_as=verify_as,
        direct_tls=direct_tls,
        autocommit=autocommit,
        prepare_threshold=prepare_threshold,
        context=context,
        row_factory=row_factory,
        cursor_factory=cursor_factory,
    )
