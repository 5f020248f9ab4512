"""Passwords given as callables: a token fetched for every new physical connection.

Managed PostgreSQL authenticates with short-lived tokens (Amazon RDS IAM, Microsoft Entra ID,
Google Cloud SQL IAM). ``password=`` may be a callable; safepg calls it right before libpq gets
the parameters, for each attempt, so a pool never reuses a frozen, expired token. The token is
sent only over a verify-full session: a callable with a Unix-domain socket host is refused.

Nothing here keeps the token: it lives in a temporary dict handed to libpq (psycopg's
connection then holds it, as it holds any password), never in a frame local of the connect
loop (frame locals end up in error reports), a log line, a repr or an error message.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar

import psycopg

from ._errors import ConfigurationError, SafePGError, TokenRejectedError
from ._params import Plan, check_text

__all__ = [
    "AsyncPasswordSource",
    "ConnectTarget",
    "PasswordProvider",
    "PasswordSource",
]


@dataclass(frozen=True)
class ConnectTarget:
    """What a password callable is asked for: the connection being made.

    Attributes:
        host: the host name libpq verifies (with ``verify_as``, that name). With several
            hosts, the first one: a token bound to one host (RDS IAM) fits that host only.
        port: the port.
        user: the user name libpq will log in as (conninfo, ``PGUSER`` or the OS user).
        dbname: the database name.
        hosts: every host name libpq may send the password to, in order (*host* first): with
            several hosts, libpq tries the next one when a host fails, with the same password.
            A provider that limits where its token goes checks all of them.
    """

    host: str
    port: int
    user: str
    dbname: str
    hosts: tuple[str, ...] = ()

    @property
    def all_hosts(self) -> tuple[str, ...]:
        """*hosts*, or (*host*,) when a target was made without them."""
        return self.hosts or (self.host,)


class PasswordProvider(Protocol):
    """A callable that returns the password (a token) for the connection being made."""

    def __call__(self, target: ConnectTarget, /) -> str: ...


E = TypeVar("E", bound=BaseException)

# What password= takes besides a string: a provider, or a callable with no arguments.
PasswordSource: TypeAlias = PasswordProvider | Callable[[], str]
# connect_async also takes coroutine functions.
AsyncPasswordSource: TypeAlias = (
    PasswordSource | Callable[[ConnectTarget], Awaitable[str]] | Callable[[], Awaitable[str]]
)

# What the server says when it refuses a password: libpq's "password authentication failed
# for user", and "PAM authentication failed" (the method RDS IAM uses).
_REFUSED = re.compile(r"(password|PAM) authentication failed")


def split(kwargs: Mapping[str, Any]) -> tuple[Mapping[str, Any], Callable[..., Any] | None]:
    """*kwargs* without a callable password, and that callable (or None)."""
    password = kwargs.get("password")
    if not callable(password):
        return kwargs, None
    return {k: v for k, v in kwargs.items() if k != "password"}, password


def target(plan: Plan) -> ConnectTarget:
    """The target a password callable is called with; refuses what is not verify-full.

    Raises:
        ConfigurationError: a host is a Unix-domain socket (never encrypted), so a token
            would travel without TLS; raised before the callable is called.
    """
    if any(t.socket for t in plan.targets):
        raise ConfigurationError(
            "password is a callable (a token provider), and a host is a Unix-domain socket, "
            "which libpq never encrypts: safepg sends tokens only over verified TLS. Connect "
            "to a TCP host name, or give a plain password for the socket."
        )
    first = plan.targets[0]
    user = plan.resolved.get("user") or plan.params.get("user") or ""
    dbname = plan.resolved.get("dbname") or plan.params.get("dbname") or user
    hosts = tuple(dict.fromkeys(t.host for t in plan.targets))
    return ConnectTarget(first.host, int(first.port), user, dbname, hosts)


def _name(provider: object) -> str:
    # The type only: a repr could hold a secret (a lambda's closure does not show, an object's
    # repr might).
    return getattr(provider, "__qualname__", None) or type(provider).__qualname__


def _call(provider: Callable[..., Any], target: ConnectTarget) -> Any:
    """Call *provider* with *target* when it takes one argument, else with none."""
    try:
        signature = inspect.signature(provider)
    except (TypeError, ValueError):  # builtins without a signature: assume the protocol
        return provider(target)
    try:
        signature.bind(target)
    except TypeError:
        return provider()
    return provider(target)


def _checked(value: object, provider: object) -> str:
    if isinstance(value, str) and value:
        check_text(f"the password from the callable {_name(provider)}", value)
        return value
    got = "an empty string" if value == "" else f"a {type(value).__name__}"
    raise ConfigurationError(
        f"the password callable {_name(provider)} returned {got}; it must return the password "
        "(the token) as a non-empty str."
    )


def _is_async(provider: Callable[..., Any]) -> bool:
    call = getattr(provider, "__call__", None)  # noqa: B004 - an object's async __call__
    return inspect.iscoroutinefunction(provider) or inspect.iscoroutinefunction(call)


def with_password(
    params: Mapping[str, str], provider: Callable[..., Any] | None, target: ConnectTarget | None
) -> Mapping[str, str]:
    """*params* with ``password`` from *provider* (called now), or *params* when None.

    Raises:
        ConfigurationError: the callable returned no str, or is a coroutine function.
    """
    if provider is None or target is None:
        return params
    if _is_async(provider):
        raise ConfigurationError(
            f"the password callable {_name(provider)} is async: use safepg.connect_async "
            "(or safepg.pool.AsyncConnectionPool), or give a plain function."
        )
    value = _call(provider, target)
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited: close it, without a "never awaited" warning
        raise ConfigurationError(
            f"the password callable {_name(provider)} returned an awaitable: use "
            "safepg.connect_async, or return the token as a str."
        )
    box = [value]
    del value  # only in the box, which a refusal empties
    return {**params, "password": _accepted(box, provider)}


def _accepted(box: list[object], provider: object) -> str:
    """`_checked` for the value in *box*. A refused value (it may be a token with one bad
    character) is dropped from *box*, and the error has no frames that could hold it."""
    try:
        return _checked(box[0], provider)
    except ConfigurationError as ex:
        refusal = ex
    box.clear()
    raise refusal.with_traceback(None)


async def with_password_async(
    params: Mapping[str, str], provider: Callable[..., Any] | None, target: ConnectTarget | None
) -> Mapping[str, str]:
    """`with_password` for asyncio: a coroutine function is awaited; a plain function runs in
    a thread, since a cloud SDK may do network I/O to find its credentials."""
    if provider is None or target is None:
        return params
    if _is_async(provider):
        value = await _call(provider, target)
    else:
        value = await asyncio.to_thread(_call, provider, target)
        if inspect.isawaitable(value):
            value = await value
    box = [value]
    del value  # only in the box, which a refusal empties
    return {**params, "password": _accepted(box, provider)}


def without_frames(err: E) -> E:
    """*err*, and every exception it was raised from or during, without their tracebacks.

    A driver's frames hold the password it was given (a token from a callable) in their
    locals, and error reporters (Sentry, rich tracebacks) show frame locals; the messages stay.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        ex = todo.pop()
        if ex is None or id(ex) in seen:
            continue
        seen.add(id(ex))
        ex.with_traceback(None)
        todo += [ex.__cause__, ex.__context__]
    return err


def rejected(
    err: BaseException,
    provider: Callable[..., Any] | None,
    driver_error: type[BaseException] = psycopg.OperationalError,
    flavour: Callable[[str], BaseException] = TokenRejectedError,
) -> BaseException:
    """*err*, or a `TokenRejectedError` that says what to check when the server refused the
    token a callable gave. The token is not in libpq's message, and not in the hint.

    *driver_error* is the driver's class of such failures, and *flavour* makes the error to
    raise (a `TokenRejectedError` that is also the driver's error)."""
    if provider is None or not isinstance(err, driver_error):
        return err
    message = str(err)
    if isinstance(err, SafePGError) or not _REFUSED.search(message):
        return err
    hint = getattr(provider, "rejected_hint", None)
    if not isinstance(hint, str):
        hint = (
            f"The password came from the callable {_name(provider)}: check that it returns a "
            "token for this host, port and user, that the token has not expired, and that the "
            "role may log in with it."
        )
    new = flavour(f"{message.rstrip()}\n{hint}")
    new.__cause__ = without_frames(err)
    new.__suppress_context__ = True
    return new


# Public: shown as safepg.X (tracebacks, reprs, SQLAlchemy's messages), where it is documented,
# however this module was imported. Pickle finds it there.
ConnectTarget.__module__ = "safepg"
PasswordProvider.__module__ = "safepg"
