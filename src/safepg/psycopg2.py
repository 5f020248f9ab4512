"""`connect` for psycopg2, always verified (``safepg-tls[psycopg2]``).

::

    import safepg.psycopg2

    conn = safepg.psycopg2.connect("postgresql://app:secret@db.example.com/app")

It takes what ``psycopg2.connect`` takes (a DSN string or URL, keyword arguments,
``connection_factory`` and ``cursor_factory``) and returns a real psycopg2 connection. The
parameters are hardened as `safepg.connect` hardens them (``sslmode=verify-full``, trust
anchors, ``gssencmode=disable``, TLS 1.2 or later, socket hosts refused), and the new session is
checked before it is returned.

Errors are safepg's, and psycopg2's too: each class here subclasses both the safepg error of
the same name and ``psycopg2.OperationalError``, so ``except safepg.HostnameMismatchError`` and
``except psycopg2.OperationalError`` both catch ``safepg.psycopg2.HostnameMismatchError``.
(They are psycopg 3's ``OperationalError`` as well, like every safepg connect error.)

psycopg2 takes the same route as `safepg.connect` (see `safepg._fastpath.Route`): once a host
is learned, libpq gets only the anchors that verify it, with direct TLS where the host takes it
and psycopg2's own libpq is 17 or later (``psycopg2.extensions.libpq_version()``); a CA rotation
within the trust set, or a host that stops taking direct TLS, is retried once as for psycopg.
psycopg2 cannot hand over the chain libpq verified (its ``conn.info`` has TLS attributes but no
peer chain), so a host is learned from a psycopg 3 session to it (the cache is shared, in
memory and on disk), or else, for a single host, by a probe in a background thread after the
first verified psycopg2 session: it reads the chain the server presents and verifies nothing;
libpq still verifies everything. A multi-host DSN is narrowed only once a psycopg 3 session, or
a single-host psycopg2 connect, has taught each of its hosts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

try:
    import psycopg2
    import psycopg2.extensions
except ImportError as _ex:  # pragma: no cover - the extra is missing
    raise ImportError("safepg.psycopg2 needs psycopg2: pip install 'safepg-tls[psycopg2]'") from _ex

from . import _check, _errors, _fastpath, _options, _password
from ._connect import failure
from ._deadline import Deadline
from ._params import REQUIRED_SSLMODE, Plan
from ._plans import plan_for

__all__ = [
    "CertificateExpiredError",
    "ConfigurationError",
    "ConnectionSecurityError",
    "HostnameMismatchError",
    "InsecureConnectionError",
    "ProtocolViolationError",
    "SSLNotSupportedError",
    "TokenRejectedError",
    "UntrustedCertificateError",
    "connect",
]

# psycopg 3's and psycopg2's errors both define pgcode, pgerror, diag and cursor, with different
# types: mypy reports the clash, which is harmless here (safepg's errors set none of them).


class ConfigurationError(_errors.ConfigurationError, psycopg2.OperationalError):  # type: ignore[misc]
    """`safepg.ConfigurationError`, as a ``psycopg2.OperationalError``."""


class ConnectionSecurityError(_errors.ConnectionSecurityError, psycopg2.OperationalError):  # type: ignore[misc]
    """`safepg.ConnectionSecurityError`, as a ``psycopg2.OperationalError``."""


class HostnameMismatchError(_errors.HostnameMismatchError, psycopg2.OperationalError):  # type: ignore[misc]
    """`safepg.HostnameMismatchError`, as a ``psycopg2.OperationalError``."""


class UntrustedCertificateError(_errors.UntrustedCertificateError, psycopg2.OperationalError):  # type: ignore[misc]
    """`safepg.UntrustedCertificateError`, as a ``psycopg2.OperationalError``."""


class CertificateExpiredError(_errors.CertificateExpiredError, psycopg2.OperationalError):  # type: ignore[misc]
    """`safepg.CertificateExpiredError`, as a ``psycopg2.OperationalError``."""


class SSLNotSupportedError(_errors.SSLNotSupportedError, psycopg2.OperationalError):  # type: ignore[misc]
    """`safepg.SSLNotSupportedError`, as a ``psycopg2.OperationalError``."""


class ProtocolViolationError(_errors.ProtocolViolationError, psycopg2.OperationalError):  # type: ignore[misc]
    """`safepg.ProtocolViolationError`, as a ``psycopg2.OperationalError``."""


class InsecureConnectionError(_errors.InsecureConnectionError, psycopg2.OperationalError):  # type: ignore[misc]
    """`safepg.InsecureConnectionError`, as a ``psycopg2.OperationalError``."""


class TokenRejectedError(_errors.TokenRejectedError, psycopg2.OperationalError):  # type: ignore[misc]
    """`safepg.TokenRejectedError`, as a ``psycopg2.OperationalError``."""


_FLAVOURS: dict[type[_errors.SafePGError], type[_errors.SafePGError]] = {
    base: flavour
    for flavour in (
        ConfigurationError,
        ConnectionSecurityError,
        HostnameMismatchError,
        UntrustedCertificateError,
        CertificateExpiredError,
        SSLNotSupportedError,
        ProtocolViolationError,
        InsecureConnectionError,
        TokenRejectedError,
    )
    for base in flavour.__bases__[:1]
}
E = TypeVar("E", bound=BaseException)


def as_psycopg2_error(err: E) -> E:
    """*err* as its psycopg2 flavour (same message, attributes and cause), when it is one of
    safepg's errors; anything else unchanged."""
    flavour = _FLAVOURS.get(type(err))  # type: ignore[arg-type]
    if flavour is None:
        return err
    new = flavour(*err.args)
    new.__dict__.update(err.__dict__)
    new.__cause__ = err.__cause__
    new.__suppress_context__ = err.__suppress_context__
    return new  # type: ignore[return-value]


def _session_problem(conn: psycopg2.extensions.connection, plan: Plan) -> str | None:
    """Why the new session is below policy, or None: libpq's state, no round trip."""
    info = conn.info
    problem = _check.tls_problem(bool(info.ssl_in_use), info.host or "", plan.allow_unix_socket)
    if problem is not None or not info.ssl_in_use:
        return problem
    sslmode = conn.get_dsn_parameters().get("sslmode")
    if sslmode != REQUIRED_SSLMODE:
        return f"libpq used sslmode={sslmode}, which does not verify the server"
    protocol = info.ssl_attribute("protocol")
    if protocol not in _check.ACCEPTED_PROTOCOLS:
        return f"the session uses {protocol!r}, not TLS 1.2 or later"
    return None


# The major version of psycopg2's own libpq (its wheels bundle one).
_PSYCOPG2_LIBPQ = psycopg2.__libpq_version__ // 10000


class _Session:
    """`_fastpath.Session` for a psycopg2 connection: no address, no chain (see above)."""

    def __init__(self, conn: psycopg2.extensions.connection) -> None:
        self.conn = conn

    def where(self) -> tuple[str, str | None, str]:
        info = self.conn.info
        return info.host or "", None, str(info.port)

    def server_version(self) -> int:
        return int(self.conn.server_version)

    def chain(self) -> None:
        return None


def _with_password(
    params: Mapping[str, str], provider: Any, target: _password.ConnectTarget | None
) -> Mapping[str, str]:
    """`_password.with_password`, its refusal of the callable's value as psycopg2's flavour."""
    try:
        return _password.with_password(params, provider, target)
    except _errors.SafePGError as ex:
        raise as_psycopg2_error(ex) from ex.__cause__


def connect(
    dsn: str | None = None,
    connection_factory: Any = None,
    cursor_factory: Any = None,
    *,
    allow_unencrypted_unix_socket: bool = False,
    verify_as: str | None = None,
    fast_path: bool | None = None,
    **kwargs: Any,
) -> Any:
    """Connect like ``psycopg2.connect``, always with a verified TLS session.

    Args:
        dsn: a libpq conninfo string or a ``postgresql://`` URL.
        connection_factory, cursor_factory: passed to ``psycopg2.connect`` untouched.
        allow_unencrypted_unix_socket, verify_as, fast_path: as for `safepg.connect`.
        **kwargs: libpq connection parameters (``database`` too, as psycopg2 takes it),
            overriding those in *dsn*. ``password`` may be a callable, called for this
            connection, as for `safepg.connect` (never over a Unix-domain socket).

    Returns:
        The connection ``psycopg2.connect`` returns (of *connection_factory*, if given).

    Raises:
        ConfigurationError: bad parameters, or ones that cannot give a verified session (also
            for ``async``, which psycopg2 would return before the session can be checked).
        HostnameMismatchError, UntrustedCertificateError, CertificateExpiredError,
        SSLNotSupportedError, ProtocolViolationError: the server could not be verified.
        InsecureConnectionError: the session came up below policy (defence in depth).
        psycopg2.OperationalError: any other failure (authentication, refused, timeout).
    """
    if kwargs.pop("async", None) or kwargs.pop("async_", None):
        raise ConfigurationError(
            "safepg.psycopg2.connect does not open asynchronous connections: the session "
            "must be checked before it is returned. Use a synchronous connection, or psycopg 3 "
            "with safepg.connect_async."
        )
    if "database" in kwargs:
        if "dbname" in kwargs:
            raise ConfigurationError("give dbname or database, not both")
        kwargs["dbname"] = kwargs.pop("database")
    hardened, provider = _password.split(kwargs)
    try:
        # psycopg2 has a libpq of its own, which reads the environment itself.
        _options.check_driver_libpq(psycopg2.__libpq_version__, "psycopg2")
        plan = plan_for(
            dsn or "",
            hardened,
            allow_unencrypted_unix_socket=allow_unencrypted_unix_socket,
            verify_as=verify_as,
        )
        target = _password.target(plan) if provider is not None else None
        route = _fastpath.route(plan, fast_path, libpq=psycopg2.extensions.libpq_version())
    except _errors.SafePGError as ex:
        raise as_psycopg2_error(ex) from ex.__cause__
    deadline = Deadline(plan.timeout)

    def attempt(params: Mapping[str, str]) -> Any:
        # A token from the callable goes into a temporary dict only: no local names it, and
        # psycopg2's frames (which do) are dropped from the error below.
        return psycopg2.connect(
            connection_factory=connection_factory,
            cursor_factory=cursor_factory,
            **_with_password(params, provider, target),
        )

    def fail(ex: Exception, used: Plan) -> BaseException:
        err = failure(
            _password.without_frames(ex),
            used,
            deadline.diagnosis_budget(),
            psycopg2.OperationalError,
        )
        return as_psycopg2_error(
            _password.rejected(err, provider, psycopg2.OperationalError, TokenRejectedError)
        )

    conn = route.drive(deadline, attempt, psycopg2.OperationalError, fail, _PSYCOPG2_LIBPQ)
    learn = route.verified(_Session(conn))
    if learn is not None:
        learn(deadline.probe_budget())
    plan = route.used
    problem = _session_problem(conn, plan)
    if problem is not None:
        refusal = InsecureConnectionError(
            f"safepg refused the session: {problem}. Trust anchors: {plan.trust}."
        )
        refusal.host, refusal.port, refusal.trust = conn.info.host, conn.info.port, plan.trust
        conn.close()
        raise refusal
    return conn
