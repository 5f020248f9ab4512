"""asyncpg's ``connect`` and ``create_pool``, always with a verified TLS session.

``pip install 'safepg-tls[asyncpg]'``::

    import safepg.asyncpg

    conn = await safepg.asyncpg.connect("postgresql://app@mydb.abc123.eu-west-1.rds.amazonaws.com/app")
    pool = await safepg.asyncpg.create_pool(dsn, min_size=2)

They take asyncpg's arguments and return asyncpg's own objects. The DSN and the keywords are read
by libpq's rules, as for `safepg.connect` (service files, ``PGHOST``, ``PGSSLMODE``, ...); asyncpg
then gets explicit hosts and ports and ``ssl=`` a verify-full context (see `safepg.ssl_context`),
never the DSN. Every new session is checked: TLS 1.2 or later, the peer certificate verified.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import socket
import ssl
from collections.abc import Mapping
from typing import Any

try:
    import asyncpg
except ImportError as _ex:  # pragma: no cover - the extra is missing
    raise ImportError("safepg.asyncpg needs asyncpg: pip install 'safepg-tls[asyncpg]'") from _ex

from . import _diagnose, _errors, _fetch, _options, _password, _sslcontext, _stdssl, _trust
from ._deadline import Deadline
from ._environ import getenv
from ._errors import ConfigurationError, InsecureConnectionError, SafePGError
from ._params import Plan, _raise_logged, as_optional_bool, build_plan, keyword_origin
from ._plans import plan_for
from ._trust import TrustSource
from ._typos import unknown_option

__all__ = ["TokenRejectedError", "connect", "create_pool"]

logger = logging.getLogger("safepg")

# asyncpg's keywords that say where to connect and whom to trust, as libpq names them: safepg
# reads these (with the DSN) by libpq's rules, and hands asyncpg the result.
_AS_LIBPQ = {
    "host": "host",
    "port": "port",
    "user": "user",
    "database": "dbname",
    "passfile": "passfile",
    "sslrootcert": "sslrootcert",
    "sslcert": "sslcert",
    "sslkey": "sslkey",
    "target_session_attrs": "target_session_attrs",
    "krbsrvname": "krbsrvname",
    "service": "service",
}
# ssl= strings that verify less than verify-full (asyncpg's own modes).
_WEAK_MODES = ("disable", "allow", "prefer", "require", "verify-ca")
_CALLER_CONTEXT = TrustSource(
    "(your ssl.SSLContext)", "the ssl.SSLContext you passed", "sslrootcert"
)
# asyncpg.create_pool's own arguments; the rest are connect()'s.
_POOL_OPTIONS = (
    "init_size", "min_size", "max_size", "max_queries", "max_inactive_connection_lifetime",
    "setup", "init", "reset", "loop", "connection_class", "record_class",
)  # fmt: skip
_HAS_DIRECT_TLS = "direct_tls" in inspect.signature(asyncpg.connect).parameters
_HAS_GSSLIB = "gsslib" in inspect.signature(asyncpg.connect).parameters
# libpq's options that asyncpg does not take as keywords (sslcrl, application_name, ...): read
# as libpq options, under the option policy, rather than handed to asyncpg, which has no
# such argument.
_LIBPQ_ONLY = (
    _options.KEYWORDS
    - set(inspect.signature(asyncpg.connect).parameters)
    - {"sslmode", "sslpassword", "password"}
)


def _libpq_keywords(kwargs: dict[str, Any], *, pop: bool) -> dict[str, str]:
    """The keywords that are libpq's options, by their libpq names, as libpq takes them."""
    out = {
        libpq: _libpq_form(name, kwargs[name])
        for name, libpq in _AS_LIBPQ.items()
        if kwargs.get(name) is not None
    }
    out.update(
        (name, _libpq_form(name, kwargs[name]))
        for name in _LIBPQ_ONLY
        if kwargs.get(name) is not None
    )
    if pop:
        for name in (*_AS_LIBPQ, *_LIBPQ_ONLY):
            kwargs.pop(name, None)
    return out


_DIRECT_TLS_SERVER = 17
# The hosts (and ports) of a connection -> whether they take direct TLS (PostgreSQL 17+).
_direct: dict[tuple[tuple[str, str], ...], bool] = {}


def _libpq_form(name: str, value: object) -> str:
    """asyncpg takes hosts and ports as lists too; libpq as a comma-separated string.

    Raises:
        ConfigurationError: not a str, an int, or a list or tuple of them (bytes, a bool, ...).
    """
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or not all(
        isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in items
    ):
        raise ConfigurationError(
            f"{name} must be a str or an int, or a list of them; got a {type(value).__name__}"
            + (" holding something else" if isinstance(value, (list, tuple)) else "")
        )
    return ",".join(str(v) for v in items)


def _seconds(name: str, value: object) -> float | None:
    """A timeout in seconds: a finite number above 0, or None.

    Raises:
        ConfigurationError: anything else (nan and inf would disable the deadline).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"{name} must be a number of seconds; got a {type(value).__name__}"
        )
    try:
        finite = math.isfinite(value) and value > 0
    except OverflowError:  # an int too big for a float
        finite = False
    if not finite:
        raise ConfigurationError(
            f"{name} must be a finite number of seconds above 0; got {value!r}"
        )
    return float(value)


_TIMEOUTS = ("timeout", "command_timeout")


def _caller_context(ssl_arg: object, sslmode: object) -> ssl.SSLContext | None:
    """The caller's own verifying ssl.SSLContext, or None after raising a weaker setting.

    A context that does not verify the chain and the host name is refused rather than replaced:
    it may carry a client certificate or anchors safepg cannot see.
    """
    for name, value in (("ssl", ssl_arg), ("sslmode", sslmode)):
        if value is None or value is True or value == "verify-full":
            continue
        if isinstance(value, _stdssl.SSLContext) and name == "ssl":
            if value.verify_mode != ssl.CERT_REQUIRED or not value.check_hostname:
                raise ConfigurationError(
                    "the ssl.SSLContext passed as ssl= does not verify the server (it needs "
                    "verify_mode=CERT_REQUIRED and check_hostname=True). Drop ssl= to let "
                    "safepg verify with the right trust anchors, or pass "
                    "safepg.ssl_context(host, sslrootcert=...)."
                )
            return value
        if value is False or value in _WEAK_MODES:
            _raise_logged(
                name,
                str(value),
                "verify-full",
                keyword_origin(name),
                "only verify-full checks that the server holds a certificate for the host dialled",
            )
            continue
        raise ConfigurationError(
            f"{name}= must be an ssl.SSLContext that verifies, True, or an sslmode such as "
            f"verify-full, not {type(value).__name__} {str(value)[:40]!r}"
        )
    return None


# The keyword arguments connect takes besides asyncpg.connect's own.
_OWN_KEYWORDS = frozenset(
    {"sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword", "allow_unencrypted_unix_socket"}
)


def _refuse_unknown(kwargs: Mapping[str, Any]) -> None:
    """Refuse a keyword argument neither asyncpg.connect nor safepg takes, naming a near miss
    as for the other drivers (asyncpg itself would raise a TypeError without one)."""
    known = {
        *inspect.signature(asyncpg.connect).parameters,
        *_OWN_KEYWORDS,
        *_AS_LIBPQ,
        *_LIBPQ_ONLY,
    }
    for name in kwargs:
        if name not in known:
            raise ConfigurationError(
                f"invalid connection parameters: {unknown_option(name, show=True, known=known)}"
            )


def _origin(plan: Plan) -> _options.Origin:
    """Where an option of *plan* came from, for a refusal (the value is never shown)."""

    def origin(key: str, envvar: str) -> str:
        if key in plan.params and plan.resolved.get(key) == plan.params[key]:
            return "the DSN or the keyword arguments"
        if envvar and getenv(envvar):
            return f"the {envvar} environment variable"
        return "a service file (PGSERVICE, PGSERVICEFILE)"

    return origin


def _asyncpg_kwargs(plan: Plan, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """What asyncpg gets besides ssl=: explicit hosts and ports, and every option set in the
    DSN, the keywords, the environment or a service file, as asyncpg names it; and the TLS
    settings the context must honour (sslcert, sslkey, sslpassword, sslcertmode, sslcrl).

    Raises:
        ConfigurationError: an option asyncpg cannot honour as libpq would, by name.
    """
    if any(t.hostaddr for t in plan.targets):
        raise ConfigurationError(
            "asyncpg has no hostaddr: give the name in the server's certificate as host, and "
            "let DNS (or /etc/hosts) resolve it."
        )
    resolved = dict(plan.resolved)
    # safepg's resolution sets target_session_attrs itself (see _params._libpq_view): the
    # caller's is the DSN's or keyword's, else PGTARGETSESSIONATTRS.
    attrs = plan.params.get("target_session_attrs") or getenv("PGTARGETSESSIONATTRS")
    resolved.pop("target_session_attrs", None)
    if attrs:
        resolved["target_session_attrs"] = attrs
    settings = _options.asyncpg_settings(resolved, plan.params, _origin(plan))
    if "gsslib" in settings and not _HAS_GSSLIB:
        raise ConfigurationError("gsslib needs asyncpg 0.29 or later")
    out: dict[str, Any] = {
        name: settings[key]
        for key, name in _options.ASYNCPG_KEYWORDS.items()
        if key in settings and kwargs.get(name) is None
    }
    out.update(
        host=[t.host for t in plan.targets],
        port=[int(t.port) for t in plan.targets],
    )
    if "connect_timeout" in plan.resolved and "timeout" not in kwargs and plan.timeout:
        out["timeout"] = plan.timeout
    startup = _options.asyncpg_environment()
    name = settings.get("application_name") or settings.get("fallback_application_name")
    if name:
        startup["application_name"] = name
    if startup:
        out["server_settings"] = {**startup, **dict(kwargs.get("server_settings") or {})}
    if settings.get("sslcertmode", "allow") not in ("allow", "disable"):
        raise ConfigurationError(
            "safepg.asyncpg refuses sslcertmode=require: Python's ssl module cannot require "
            "the server to ask for the client certificate. Remove it."
        )
    tls: dict[str, str] = {
        k: settings[k]
        for k in ("sslcert", "sslkey", "sslpassword", "sslcertmode", "sslcrl", "sslnegotiation")
        if k in settings
    }
    return out, tls


def _refuse_beside_caller_context(tls: dict[str, str], ctx: ssl.SSLContext, plan: Plan) -> None:
    """Your own ssl.SSLContext is used as it is: settings it would have to carry are refused.
    The CRLs libpq would check (sslcrl, else ``~/.postgresql/root.crl``) only when your
    context is `safepg.ssl_context`'s, made with those very CRLs: a context that checks other
    CRLs would let a certificate they revoke through."""
    given: list[str] = sorted(k for k in ("sslcert", "sslkey", "sslpassword") if k in tls)
    crl = _crl(tls, plan)
    if crl and not _sslcontext.checks_crls(ctx, crl):
        if "sslcrl" not in tls:
            raise ConfigurationError(
                "libpq's default revocation list ~/.postgresql/root.crl exists, and your own "
                "ssl.SSLContext, which safepg uses as it is, does not check it. Pass "
                "ssl=safepg.ssl_context(host) (which loads it), or drop ssl=."
            )
        given.append("sslcrl")
    if given:
        raise ConfigurationError(
            f"{', '.join(given)} is set (DSN, keywords, environment or service file) beside "
            "your own ssl.SSLContext, which safepg uses as it is and cannot add it to. Load it "
            "into your context (load_cert_chain) and unset it; for sslcrl, pass "
            "ssl=safepg.ssl_context(host, sslcrl=...) made with that file; or drop ssl=."
        )


def _client_files(tls: dict[str, str]) -> tuple[str | None, str | None]:
    """The client certificate and key libpq would send: those named, else libpq's default
    ``~/.postgresql/postgresql.crt`` and ``.key`` when the certificate exists; none with
    sslcertmode=disable."""
    if tls.get("sslcertmode") == "disable":
        return None, None
    cert, key = tls.get("sslcert"), tls.get("sslkey")
    root = _trust.libpq_default_root()
    if cert is None and root is not None:
        default = root.with_name("postgresql.crt")
        if default.is_file():
            cert = str(default)
            key = key or str(root.with_name("postgresql.key"))
    return cert, key


def _crl(tls: dict[str, str], plan: Plan) -> bytes:
    """The CRLs libpq would check: sslcrl, else libpq's default ``~/.postgresql/root.crl``
    when it exists; checked by `_options.read_crl`."""
    return _options.crls(tls.get("sslcrl"), _origin(plan)("sslcrl", "PGSSLCRL"))


def _direct_tls(negotiation: str, option: object, key: tuple[tuple[str, str], ...]) -> bool | None:
    """asyncpg's direct_tls for this connect: the caller's choice, a sslnegotiation=direct
    (DSN, keyword, PGSSLNEGOTIATION, service file), or what was learned for these hosts; None
    when this asyncpg lacks it."""
    chosen = as_optional_bool("direct_tls", option)
    if negotiation not in ("postgres", "direct"):
        raise ConfigurationError("sslnegotiation must be postgres or direct")
    if negotiation == "direct":
        if chosen is False:
            raise ConfigurationError("direct_tls=False and sslnegotiation=direct disagree")
        chosen = True
    if not _HAS_DIRECT_TLS:
        if chosen:
            raise ConfigurationError("direct TLS needs asyncpg 0.30 or later")
        return None
    return chosen if chosen is not None else _direct.get(key, False)


def _session_problem(conn: asyncpg.Connection, plan: Plan) -> str | None:
    """Why the new session is below policy, or None. No round trip."""
    transport = conn._transport  # asyncpg's own transport for this connection
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if ssl_object is None:
        sock = transport.get_extra_info("socket") if transport else None
        if plan.allow_unix_socket and sock is not None and sock.family == socket.AF_UNIX:
            return None
        return "the session is not encrypted"
    if ssl_object.version() not in ("TLSv1.2", "TLSv1.3"):
        return f"it uses {ssl_object.version()}, below TLS 1.2"
    context = ssl_object.context
    if context.verify_mode != ssl.CERT_REQUIRED or not context.check_hostname:
        return "the server's certificate was not verified"
    if not ssl_object.getpeercert():
        return "the server presented no verified certificate"
    return None


class TokenRejectedError(_errors.TokenRejectedError, asyncpg.InvalidPasswordError):  # type: ignore[misc]
    """`safepg.TokenRejectedError`, as asyncpg's ``InvalidPasswordError``: the server refused
    the token a password callable gave. asyncpg's fields (``detail``, ``hint``, ...) are the
    server's; the message adds what to check."""


def _rejected(ex: asyncpg.PostgresError, provider: Any) -> BaseException:
    new = _password.rejected(ex, provider, asyncpg.PostgresError, TokenRejectedError)
    if new is not ex:
        new.__dict__.update({k: v for k, v in vars(ex).items() if k != "message"})
        new.sqlstate = ex.sqlstate  # type: ignore[attr-defined]
    return new


async def _open(
    ctx: ssl.SSLContext,
    direct: bool | None,
    kwargs: dict[str, Any],
    provider: Any,
    target: _password.ConnectTarget | None,
) -> asyncpg.Connection:
    """asyncpg's connect, with a fresh token from *provider* when there is one.

    The token goes into a temporary dict only, and asyncpg's frames, whose locals hold it,
    are dropped from any error, with those of the errors it was raised from or during.
    """
    options = {**kwargs, "ssl": ctx}
    if direct is not None:
        options["direct_tls"] = direct
    try:
        return await asyncpg.connect(
            None, **options, **(await _password.with_password_async({}, provider, target))
        )
    except SafePGError:  # the callable's ConfigurationError: no token was made
        raise
    except BaseException as ex:
        if provider is None:
            raise
        raise _password.without_frames(ex)  # noqa: B904 - the same error, its context kept


async def connect(
    dsn: str | None = None,
    *,
    allow_unencrypted_unix_socket: bool = False,
    **kwargs: Any,
) -> asyncpg.Connection:
    """Connect like `asyncpg.connect`, always with a verified TLS session.

    Takes asyncpg's arguments and returns asyncpg's connection. The DSN and the keywords host,
    port, user, database, passfile, sslrootcert, sslcert and sslkey are read by libpq's rules
    (service file, ``PG*`` variables), hardened as `safepg.connect` hardens them, and handed to
    asyncpg as explicit keywords, with ``ssl=`` a verify-full context from `safepg.ssl_context`'s
    trust anchors. ``ssl=`` or ``sslmode`` weaker than verify-full (``False``, ``"require"``,
    ...) is raised, and logged. Your own ``ssl.SSLContext`` is used only if it verifies the
    chain and the host name; one that does not is refused. ``direct_tls`` (asyncpg 0.30+) is
    learned per host: after a first connect to PostgreSQL 17+, later ones use it.

    Args:
        dsn: a ``postgresql://`` URL (or a libpq conninfo string).
        allow_unencrypted_unix_socket: accept a Unix-domain socket host, never encrypted.
        **kwargs: asyncpg's keyword arguments; also sslmode, sslpassword and libpq's other
            options by their libpq names (sslcrl, application_name, ...), each passed on with
            the same meaning or refused (see the option policy).

    Raises:
        ConfigurationError: bad input, a socket host, an option asyncpg cannot honour, an
            ssl.SSLContext that does not verify; before any network I/O.
        HostnameMismatchError, UntrustedCertificateError, CertificateExpiredError,
        SSLNotSupportedError, ProtocolViolationError: the server could not be verified.
        InsecureConnectionError: the session is below policy (defence in depth).
    """
    kwargs = dict(kwargs)
    _refuse_unknown(kwargs)
    if kwargs.get("servicefile") is not None:
        raise ConfigurationError(
            "servicefile= is asyncpg's alone: safepg reads service files as libpq does. Set "
            "PGSERVICEFILE instead."
        )
    caller_ctx = _caller_context(kwargs.pop("ssl", None), kwargs.pop("sslmode", None))
    direct_option = kwargs.pop("direct_tls", None)
    sslpassword = kwargs.pop("sslpassword", None)
    provider = kwargs.pop("password") if callable(kwargs.get("password")) else None
    libpq_kwargs = _libpq_keywords(kwargs, pop=True)
    for name in _TIMEOUTS:
        if kwargs.get(name) is not None:
            kwargs[name] = _seconds(name, kwargs[name])
    # A CA fetch from a provider's API (rare: then cached) runs in a thread, off the loop.
    plan = await _fetch.off_loop(
        lambda: plan_for(
            dsn or "", libpq_kwargs, allow_unencrypted_unix_socket=allow_unencrypted_unix_socket
        )
    )
    translated, tls = _asyncpg_kwargs(plan, kwargs)
    options = {**kwargs, **translated}
    # A token provider: never over a socket; called for each attempt, in _open.
    target = _password.target(plan) if provider is not None else None
    key = tuple((t.host, t.port) for t in plan.targets)
    negotiation = tls.get("sslnegotiation") or plan.resolved.get("sslnegotiation", "postgres")
    direct = _direct_tls(negotiation, direct_option, key)
    if caller_ctx is not None:
        _refuse_beside_caller_context(tls, caller_ctx, plan)
        ctx, plan = caller_ctx, dataclasses.replace(plan, trust=_CALLER_CONTEXT)
    else:
        tls13 = plan.params.get("ssl_min_protocol_version") == "TLSv1.3"
        cert, keyfile = _client_files(tls)
        crl = _crl(tls, plan)
        if cert:
            ctx = _sslcontext.new_context(plan.trust, tls13=tls13, crl=crl)
            _sslcontext.load_client_cert(ctx, cert, keyfile, sslpassword or tls.get("sslpassword"))
        else:
            if keyfile is not None:
                raise ConfigurationError("sslkey was given without sslcert; give both, or neither")
            ctx = _sslcontext.cached_context(plan.trust, tls13=tls13, crl=crl)
    if not isinstance(ctx, ssl.SSLContext):
        # asyncpg (and asyncio's start_tls) test the name as bound now: a context of a class
        # that something has put in its place since would be taken for no TLS at all.
        raise ConfigurationError(
            f"ssl.SSLContext is now {ssl.SSLContext.__module__}.{ssl.SSLContext.__qualname__}, "
            "which asyncpg would not take this context for: it would connect without TLS. Make "
            "the context after that replacement, or leave ssl= to safepg."
        )
    deadline = Deadline(plan.timeout)
    try:
        try:
            conn = await _open(ctx, direct, options, provider, target)
        except (
            ssl.SSLCertVerificationError,
            asyncpg.PostgresError,
            TimeoutError,
            asyncio.TimeoutError,
        ):
            raise  # the certificate, the server's answer, a stall: not direct TLS's doing
        except (OSError, ssl.SSLError):
            if not (direct and direct_option is None and _direct.get(key)):
                raise
            # Learned direct TLS, and the handshake failed: a pooler in front, an older server.
            logger.info("safepg: %s refused direct TLS; using the SSLRequest from now on", key)
            _direct[key] = False
            direct = False
            conn = await _open(ctx, direct, options, provider, target)
    except asyncpg.PostgresError as ex:
        raise _rejected(ex, provider)  # noqa: B904 - the cause is set, without its frames
    except (OSError, ssl.SSLError) as ex:
        last = plan.targets[-1]  # asyncpg tries the hosts in turn and raises the last error
        probe = caller_ctx is None
        err = await asyncio.to_thread(
            _diagnose.from_python_tls, ex, plan, last, probe=probe,
            budget=deadline.diagnosis_budget(),
        )  # fmt: skip
        if err is None:
            raise
        # The cause without its frames, whose locals hold the password.
        raise err from ex.with_traceback(None)
    if direct is not None and direct_option is None and key not in _direct:
        _direct[key] = conn.get_server_version().major >= _DIRECT_TLS_SERVER
    problem = _session_problem(conn, plan)
    if problem is not None:
        conn.terminate()
        err = InsecureConnectionError(
            f"safepg refused the session: {problem}. Trust anchors: {plan.trust}."
        )
        last = plan.targets[-1]
        err.host, err.port, err.trust = last.host, int(last.port), plan.trust
        raise err
    return conn


def create_pool(
    dsn: str | None = None,
    *,
    allow_unencrypted_unix_socket: bool = False,
    **kwargs: Any,
) -> asyncpg.Pool:
    """Create a pool like `asyncpg.create_pool`, whose every connection goes through `connect`.

    Takes asyncpg's arguments (min_size, max_size, setup, init, ...) and returns asyncpg's
    pool; each connection it opens, now or later, is hardened and checked as by `connect`.
    The arguments are checked at once, before any connection is opened.

    Raises:
        ConfigurationError: as for `connect`; or a ``connect=`` of your own, which would bypass
            safepg.
    """
    if kwargs.get("connect") is not None:
        raise ConfigurationError(
            "create_pool(connect=...) would open connections without safepg; wrap your "
            "function around safepg.asyncpg.connect and call asyncpg.create_pool yourself"
        )
    kwargs.pop("connect", None)
    pool_only = {k: kwargs.pop(k) for k in _POOL_OPTIONS if k in kwargs}
    check_arguments(dsn, kwargs, allow_unencrypted_unix_socket=allow_unencrypted_unix_socket)

    async def _connect(dsn_arg: str | None, **options: Any) -> asyncpg.Connection:
        options.pop("loop", None)
        return await connect(
            dsn_arg, allow_unencrypted_unix_socket=allow_unencrypted_unix_socket, **options
        )

    return asyncpg.create_pool(dsn, connect=_connect, **pool_only, **kwargs)


def check_arguments(
    dsn: str | None, kwargs: Mapping[str, Any], *, allow_unencrypted_unix_socket: bool = False
) -> None:
    """Refuse what `connect` would refuse before any I/O, without connecting: for pools and
    engines, when they are made rather than on their first connection.

    Raises:
        ConfigurationError: as `connect` would.
    """
    rest = dict(kwargs)
    _refuse_unknown(rest)
    allow_socket = (
        as_optional_bool(
            "allow_unencrypted_unix_socket", rest.pop("allow_unencrypted_unix_socket", None)
        )
        or allow_unencrypted_unix_socket
    )
    caller_ctx = _caller_context(rest.pop("ssl", None), rest.pop("sslmode", None))
    as_optional_bool("direct_tls", rest.pop("direct_tls", None))
    for name in _TIMEOUTS:
        _seconds(name, rest.get(name))
    libpq_kwargs = _libpq_keywords(rest, pop=False)
    plan = build_plan(dsn or "", libpq_kwargs, allow_unencrypted_unix_socket=allow_socket)
    _, tls = _asyncpg_kwargs(plan, rest)
    if caller_ctx is not None:
        _refuse_beside_caller_context(tls, caller_ctx, plan)
    else:
        _crl(tls, plan)
