"""Hardening: the one function that builds the final libpq parameters.

It reads the caller's conninfo and keywords, asks libpq itself how it would resolve them (service
file, ``PG*`` environment variables, defaults), refuses what cannot be verified, and returns the
parameters with safepg's settings on top. Nothing here touches the network, except the DNS
lookup of an alias the caller asked to verify under another name (``verify_as``).
"""

from __future__ import annotations

import functools
import logging
import ntpath
import os
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import _environ, _options, _trust
from ._environ import getenv
from ._errors import ConfigurationError
from ._redact import redact, redact_parse_error
from ._trust import TrustSource
from ._typos import unknown_option

logger = logging.getLogger("safepg")

# The only sslmode that encrypts *and* checks that the certificate names the host dialled.
REQUIRED_SSLMODE = "verify-full"
# TLS 1.0 and 1.1 are deprecated (RFC 8996); libpq's own default minimum is TLS 1.2 since PG 13.
MIN_TLS_VERSION = "TLSv1.2"
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
# An invalid target_session_attrs makes libpq stop after resolving the options and before any
# I/O, so that PQconninfo shows what libpq would use (see _libpq_view).
_RESOLVE_ONLY = "__safepg_resolve_only__"
_DEFAULT_PORT = "5432"  # libpq's compiled-in DEF_PGPORT
# Longer than any real parameter (tokens used as passwords are a few KiB), short of abuse.
MAX_VALUE_LENGTH = 65536
_KEYWORD = re.compile(r"[a-z][a-z0-9_]*")
_PORT = re.compile(r"[0-9]{1,5}")
# DNS names (IDNs too), IPv4 and IPv6 addresses with a zone: what libpq can dial and verify.
_HOST = re.compile(r"[\w.:%-]+")
# A socket directory or abstract name that can be shown: no second '@', quote or control.
_SHOWN_SOCKET = re.compile(r"@?[\w./+ -]*")
_SECONDS = re.compile(r"-?[0-9]{1,9}")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def as_bool(name: str, value: object, *, where: str = "") -> bool:
    """*value* as a boolean: a bool, 0 or 1, or one of true/false, 1/0, yes/no, on/off.

    Strings come from URLs, the environment and ini files, where ``"false"`` must never be
    taken as true. Anything else is refused rather than guessed.

    Raises:
        ConfigurationError: naming the option (and *where* it came from).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise ConfigurationError(
        f"{name}{where} must be true or false (also accepted: 1/0, yes/no, on/off), not {shown}"
    )


def as_optional_bool(name: str, value: object) -> bool | None:
    """`as_bool`, keeping None (meaning: not chosen)."""
    return None if value is None else as_bool(name, value)


@dataclass(frozen=True)
class Target:
    """One host entry of a (possibly multi-host) connection."""

    host: str  # the name libpq verifies, or the socket directory
    hostaddr: str | None
    socket: bool
    port: str = _DEFAULT_PORT


@dataclass(frozen=True)
class Plan:
    """The outcome of hardening: what to hand to libpq, and why."""

    params: dict[str, str] = field(hash=False, repr=False)  # holds the password
    trust: TrustSource
    targets: tuple[Target, ...]
    allow_unix_socket: bool
    # Every option as libpq resolved it (service file, environment, defaults), before hardening.
    resolved: dict[str, str] = field(default_factory=dict, hash=False, repr=False)
    # The caller chose sslnegotiation (conninfo, keyword, service file or PGSSLNEGOTIATION).
    negotiation_chosen: bool = False
    # The fast path added sslnegotiation=direct, learned for these hosts.
    learned_direct: bool = False
    # The fast path does not know yet whether these hosts take direct TLS: learn it from the
    # server version once connected.
    direct_unknown: bool = False
    # The caller's direct_tls option: True, False, or None to learn it per host.
    direct_tls: bool | None = None
    # A retry with a CA fetched again from the provider's API after a rejected chain.
    rotated: bool = False
    # What is made from this plan once and used on every connect of it (a remembered plan is
    # used again and again): `libpq_params`, the fast path's narrowed plans. Neither compared
    # nor copied: `dataclasses.replace` starts a new plan with an empty one.
    derived: dict[Any, Any] = field(
        default_factory=dict, init=False, compare=False, hash=False, repr=False
    )

    def libpq_params(self, libpq: int | None = None) -> dict[str, str]:
        """The parameters for a libpq of major version *libpq* (psycopg's when None): the
        checked options pinned, since libpq resolves service files and variables again, then
        this plan's own. Made once per plan and version; the caller must not change it."""
        key = ("libpq_params", libpq)
        found: dict[str, str] | None = self.derived.get(key)
        if found is None:
            pinned = (
                _options.pins(self.resolved)
                if libpq is None
                else _options.pins(self.resolved, libpq)
            )
            found = self.derived[key] = {**pinned, **self.params}
        return found

    @property
    def conninfo(self) -> str:
        return make_conninfo("", **self.params)

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (self.params.get("password"), self.params.get("sslpassword"))

    @property
    def timeout(self) -> float | None:
        """libpq's connect_timeout for each attempt, in seconds, or None (none set): libpq
        reads 1 as 2, and 0 or less as no timeout."""
        return _timeout_of(self.resolved)


def _timeout_of(resolved: Mapping[str, str]) -> float | None:
    """connect_timeout as libpq reads it (see `Plan.timeout`)."""
    value = int(resolved.get("connect_timeout") or 0)
    return float(max(value, 2)) if value > 0 else None


_DEFAULT_ORIGIN = "libpq's default"


@dataclass(frozen=True)
class KeywordSource:
    """How an integration names the keyword arguments it passes on: where the user set them
    (Django's ``OPTIONS["sslmode"]``, a SQLAlchemy URL's ``?sslmode=``) and how to set one
    there, for messages and their fix advice.

    Attributes:
        origin: *key* -> where it was set, as in "sslmode=require (from ...)".
        spelling: (*key*, *value*) -> how to write it in that place.
        shows: *key* -> whether an unknown option of that name may be named in a message (not
            when it came from a URL whose badly quoted password it may be part of).
    """

    origin: Callable[[str], str]
    spelling: Callable[[str, str], str]
    shows: Callable[[str], bool] = lambda _key: True


_keyword_source: ContextVar[KeywordSource | None] = ContextVar(
    "safepg_keyword_source", default=None
)


@contextmanager
def keywords_from(source: KeywordSource) -> Iterator[None]:
    """Within: keyword arguments are named as *source* names them (set by an integration
    around the connect it makes for the user)."""
    token = _keyword_source.set(source)
    try:
        yield
    finally:
        _keyword_source.reset(token)


def keyword_origin(key: str) -> str:
    """Where the keyword argument *key* was set, in the words of the user's integration."""
    source = _keyword_source.get()
    return source.origin(key) if source else f"the keyword argument {key}"


def keyword_shown(key: str) -> bool:
    """Whether the unknown keyword argument *key* may be named (see `KeywordSource.shows`)."""
    source = _keyword_source.get()
    return source.shows(key) if source else True


def keyword_spelling(key: str, value: str, default: str | None = None) -> str:
    """How to set *key* to *value* where the user sets keyword arguments (*default*, or
    ``key=value``, when no integration named them)."""
    source = _keyword_source.get()
    if source is not None:
        return source.spelling(key, value)
    return f"{key}={value}" if default is None else default


# (parameter, value, origin) already warned about: a pool should not log on every connection.
_warned: set[tuple[str, str, str]] = set()


def _raise_logged(param: str, value: str, new: str, origin: str, why: str) -> None:
    """Log that a setting was raised: a warning the first time, debug after that.

    libpq's own defaults (sslmode=prefer) are raised silently: nobody chose them.
    """
    if origin == _DEFAULT_ORIGIN:
        return
    key = (param, value, origin)
    level = logging.DEBUG if key in _warned else logging.WARNING
    _warned.add(key)
    logger.log(level, "%s=%s (from %s) raised to %s: %s", param, value, origin, new, why)


_URL_SCHEMES = ("postgresql://", "postgres://")


def _reject_mangled_url(conninfo: str) -> None:
    """Refuse a URL whose password (or user name) holds an unencoded '@' or '/'.

    libpq then reads part of the password as the host, port or database name, and would look
    that "host" up in DNS and show it in messages. In a well-formed URL, the part before the
    query is ``scheme://[user[:password]@]hosts[/dbname]``: at most one '@', before any '/',
    and no '@' or '/' in the database name. The URL is never echoed.
    """
    if not conninfo.startswith(_URL_SCHEMES):
        return
    rest = conninfo.split("://", 1)[1].split("?", 1)[0]
    userinfo, _, hostpath = rest.rpartition("@")
    dbname = hostpath.partition("/")[2]
    if "@" in userinfo or "/" in userinfo or "/" in dbname:
        raise ConfigurationError(
            "the URL is malformed: it holds an unencoded '@' or '/' in the user name or password "
            "(or more than one '/' in the path), which makes libpq read part of the password as "
            "the host, port or database name. It is not shown, as it may hold a password. "
            "Percent-encode '@', ':' and '/' in the user name and password (%40, %3A, %2F)."
        )


def _reject_unsafe_text(conninfo: str, kwargs: Mapping[str, Any]) -> None:
    # libpq reads C strings: a NUL byte would silently cut a value short ("host=a\0b" -> "a").
    # Values are checked as psycopg will pass them: as str() (a Path, an int).
    for name, value in kwargs.items():
        if callable(value):  # a password callable is resolved by safepg.connect, not here
            raise ConfigurationError(
                f"{name} is a callable, which only safepg.connect and connect_async (and the "
                "pools and engines built on them) call; here, pass the value itself."
            )
    items = [("conninfo", conninfo)] + [(k, str(v)) for k, v in kwargs.items() if v is not None]
    for name, value in items:
        check_text(name, value)


def check_text(name: str, value: str) -> None:
    """Refuse a value libpq would cut short or mangle; the message never shows the value.

    Raises:
        ConfigurationError: *value* is too long, holds a NUL byte, or is not valid UTF-8.
    """
    if len(value) > MAX_VALUE_LENGTH:
        raise ConfigurationError(
            f"{name} is {len(value)} characters long; safepg accepts at most "
            f"{MAX_VALUE_LENGTH}. No real connection parameter is this long (PostgreSQL "
            "refuses startup packets over 10,000 bytes): check where the value came from."
        )
    if "\x00" in value:
        raise ConfigurationError(f"{name} contains a NUL byte, which libpq cannot take")
    if not _is_utf8(value):
        raise ConfigurationError(f"{name} is not valid UTF-8 text")


def _is_utf8(value: str) -> bool:
    # Not raised from inside the except clause: the UnicodeEncodeError holds the whole value
    # (perhaps a password), and would stay reachable as the refusal's __context__.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _join(params: Mapping[str, str]) -> str:
    """A conninfo string for *params*; libpq itself then rejects unknown keywords.

    Faster than psycopg's make_conninfo, which parses its result once more to validate it.
    """
    parts = []
    for key, value in params.items():
        if not _KEYWORD.fullmatch(key):
            raise ConfigurationError(
                f"invalid connection parameters: {unknown_option(key, show=False)}"
            )
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        parts.append(f"{key}='{quoted}'")
    return " ".join(parts)


_UNKNOWN_OPTION = re.compile(r'invalid connection option "([^"]*)"')


def _libpq_view(params: Mapping[str, str], secrets: tuple[str | None, ...]) -> dict[str, str]:
    """The options libpq would use for *params*, after service files, env vars and defaults."""
    probe = _join({**params, "target_session_attrs": _RESOLVE_ONLY})
    pgconn = pq.PGconn.connect_start(probe.encode())
    try:
        message = pgconn.error_message.decode("utf-8", "replace").strip()
        if pgconn.status != pq.ConnStatus.BAD:  # pragma: no cover - a libpq that changed
            raise RuntimeError(
                f"libpq {pq.version()} started connecting while safepg only resolved options; "
                "refusing to continue"
            )
        if _RESOLVE_ONLY not in message:
            unknown = _UNKNOWN_OPTION.fullmatch(message)
            if unknown and unknown.group(1) in params:
                # A keyword argument's name (a conninfo string's were checked when parsed), unless
                # an integration took it from a URL that may hold a password.
                name = unknown.group(1)
                message = unknown_option(name, show=keyword_shown(name))
            raise ConfigurationError(f"invalid connection parameters: {redact(message, secrets)}")
        return {
            opt.keyword.decode(): opt.val.decode("utf-8", "replace")
            for opt in pgconn.info
            if opt.val is not None
        }
    finally:
        pgconn.finish()


# What libpq resolved for recent parameter sets (see `_resolved`): a bounded LRU.
_VIEWS: OrderedDict[tuple[object, ...], dict[str, str]] = OrderedDict()
_VIEWS_MAX = 64
_VIEWS_LOCK = threading.Lock()


def _after_fork() -> None:
    global _VIEWS_LOCK
    _VIEWS_LOCK = threading.Lock()  # a thread of the parent may have held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

# Never kept: secrets do not change what libpq resolves, and a memo must not hold them. libpq
# marks them itself ("*": password, sslpassword, libpq 18's oauth_client_secret); the memo's
# key leaves out their environment variables (PGPASSWORD) too.
# PQconndefaults, read once: each option's keyword, variable, flags and compiled-in default
# (its current values, which depend on the environment, are not used from here).
_CONNDEFAULTS = tuple(pq.Conninfo.get_defaults())
_SECRET_OPTIONS = frozenset(
    {"password", "sslpassword"}
    | {o.keyword.decode() for o in _CONNDEFAULTS if o.dispchar and b"*" in o.dispchar}
)
# Every environment variable libpq's option resolution reads (PQconndefaults' list), and the
# ones behind its files (service file, password file, home directory), less those of secret
# options: a secret does not change where or how libpq connects.
_LIBPQ_ENV_NAMES = tuple(
    sorted(
        {
            o.envvar.decode()
            for o in _CONNDEFAULTS
            if o.envvar and o.keyword.decode() not in _SECRET_OPTIONS
        }
        | {"PGSERVICE", "PGSERVICEFILE", "PGSYSCONFDIR", "HOME"}
    )
)


def _resolved(params: Mapping[str, str], secrets: tuple[str | None, ...]) -> dict[str, str]:
    """`_libpq_view`, remembered per parameter set and environment, without the secrets.

    libpq's option resolution costs more than the rest of safepg's work on a warm connect.
    What it reads besides *params* is the environment (keyed here, name by name) and, for a
    service, the service files: with a service, nothing is remembered.
    """
    if "service" in params or getenv("PGSERVICE"):
        return _libpq_view(params, secrets)
    key = (
        tuple(sorted((k, v) for k, v in params.items() if k not in _SECRET_OPTIONS)),
        _environ.values(_LIBPQ_ENV_NAMES),
    )
    with _VIEWS_LOCK:
        view = _VIEWS.get(key)
        if view is not None:
            _VIEWS.move_to_end(key)
            return dict(view)
    view = {k: v for k, v in _libpq_view(params, secrets).items() if k not in _SECRET_OPTIONS}
    with _VIEWS_LOCK:
        _VIEWS[key] = view
        while len(_VIEWS) > _VIEWS_MAX:
            _VIEWS.popitem(last=False)
    return dict(view)


def _check_numbers(resolved: Mapping[str, str], origin: Any) -> None:
    """Refuse a port or connect_timeout that is not a plain number, without showing it.

    An unencoded ``@`` in a URL's password makes libpq read the rest of the password as the
    host and port, so the value may be a secret: it is never echoed.
    """
    for port in _split(resolved.get("port")):
        if port and not (_PORT.fullmatch(port) and 1 <= int(port) <= 65535):
            raise ConfigurationError(
                f"the port (from {origin('port', 'PGPORT')}) is not a number from 1 to 65535; "
                "its value is not shown, as it may hold part of a password. In a URL, "
                "percent-encode '@', ':' and '/' in the user name and password (%40, %3A, "
                "%2F): an unencoded '@' makes libpq read the rest of the password as the host "
                "and port."
            )
    timeout = resolved.get("connect_timeout")
    if timeout and not _SECONDS.fullmatch(timeout.strip()):
        raise ConfigurationError(
            f"connect_timeout (from {origin('connect_timeout', 'PGCONNECT_TIMEOUT')}) must be a "
            "whole number of seconds, such as connect_timeout=10 (0 means no timeout)"
        )


def _env_origin(envvar: str) -> str:
    return f"the {envvar} environment variable"


def _split(value: str | None) -> list[str]:
    return value.split(",") if value is not None else []


def _is_socket(host: str) -> bool:
    # libpq's is_unixsock_path(): an absolute path, or "@" for Linux's abstract namespace. An
    # empty host means libpq's default, which is a socket everywhere but Windows.
    if os.name == "nt":
        return host.startswith("@") or ntpath.isabs(host)
    return host == "" or host.startswith(("/", "@"))


# The opt-in, as the library takes it (the command line words it as its own option).
SOCKET_OPT_IN = "pass allow_unencrypted_unix_socket=True"
_SOCKET_FIX = (
    "libpq never uses TLS on a Unix-domain socket, so the session could be neither encrypted "
    "nor verified. Connect over TCP with the name in the server's certificate "
    "(host=db.example.com), or, for a server on this machine where a socket is what you want, "
    f"{SOCKET_OPT_IN}."
)


# Host names that passed the checks below (only those: a refused one may hold a password).
_GOOD_HOSTS: set[str] = set()


def is_host_name(host: str) -> bool:
    """*host* is a host name or an IP address that can be shown: nothing in it could be part
    of a password (an unencoded '@' in a URL's password puts the rest of it in the host)."""
    return bool(_HOST.fullmatch(host)) and _idna_ok(host)


def _idna_ok(host: str) -> bool:
    """*host* can be looked up: Python's resolver (the probe) and psycopg encode names with
    IDNA, which refuses empty labels and labels over 63 characters with a UnicodeError."""
    if host.isascii():
        # The codec's own rule for ASCII names, without importing it (and unicodedata): a cost
        # every fresh process would pay on its first connect.
        labels = host.split(".")
        return all(0 < len(label) < 64 for label in labels[:-1]) and len(labels[-1]) < 64
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _socket_shown(host: str) -> str:
    """A socket path for a message, unless it may hold part of a password: an unencoded '@'
    in a URL's password can make the rest of it a host that starts with '@' (Linux's abstract
    socket namespace)."""
    if _SHOWN_SOCKET.fullmatch(host):
        return repr(host)
    return "(not shown: it holds characters no socket path has, perhaps part of a password)"


def _targets(resolved: Mapping[str, str], allow_socket: bool) -> tuple[Target, ...]:
    hosts, addrs = _split(resolved.get("host")), _split(resolved.get("hostaddr"))
    ports = _split(resolved.get("port"))
    targets = []
    for i in range(max(len(hosts), len(addrs), 1)):
        host = hosts[i] if i < len(hosts) else ""
        addr = addrs[i] if i < len(addrs) else ""
        # libpq: one port for every host, or one per host; empty means the default.
        port = ports[i] if len(ports) > 1 and i < len(ports) else ports[0] if ports else ""
        port = port or _DEFAULT_PORT
        if addr:
            if not host:
                raise ConfigurationError(
                    f"hostaddr={addr} is given without a host name, so there is no name to "
                    "verify the server's certificate against. Add the name the certificate holds "
                    f"as host, next to it: host=db.example.com hostaddr={addr} (libpq then "
                    "connects to hostaddr and verifies host)."
                )
            targets.append(Target(host, addr, socket=False, port=port))
        elif _is_socket(host):
            if not allow_socket:
                where = (
                    f"host {_socket_shown(host)} is a Unix-domain socket directory"
                    if host
                    else "no host was given (conninfo, keyword, service file or PGHOST), so libpq "
                    "would use its default Unix-domain socket"
                )
                raise ConfigurationError(f"{where}. {_SOCKET_FIX}")
            targets.append(Target(host, None, socket=True, port=port))
        else:
            targets.append(Target(host or "localhost", None, socket=False, port=port))
    for target in targets:
        if target.socket or target.host in _GOOD_HOSTS:
            continue
        if not is_host_name(target.host):
            # Never echoed: an unencoded '@' in a URL's password puts the rest of it here.
            raise ConfigurationError(
                "a host name is not one: it holds characters no host name or IP address has "
                "('@', '/', '?', spaces, quotes), an empty label or a label over 63 "
                "characters; it is not shown, as it may hold part of a "
                "password. In a URL, percent-encode '@', ':' and '/' in the user name and "
                "password (%40, %3A, %2F)."
            )
        if len(_GOOD_HOSTS) >= 256:
            _GOOD_HOSTS.clear()
        _GOOD_HOSTS.add(target.host)
    return tuple(targets)


def _min_tls(resolved: Mapping[str, str], origin: str) -> str:
    value = resolved.get("ssl_min_protocol_version", "")
    if value in _TLS_VERSIONS and _TLS_VERSIONS.index(value) >= _TLS_VERSIONS.index(
        MIN_TLS_VERSION
    ):
        chosen = value
    else:
        _raise_logged(
            "ssl_min_protocol_version",
            value,
            MIN_TLS_VERSION,
            origin,
            "TLS versions before 1.2 are deprecated (RFC 8996)",
        )
        chosen = MIN_TLS_VERSION
    maximum = resolved.get("ssl_max_protocol_version", "")
    if maximum in _TLS_VERSIONS and _TLS_VERSIONS.index(maximum) < _TLS_VERSIONS.index(chosen):
        raise ConfigurationError(
            f"ssl_max_protocol_version={maximum} is below the minimum {chosen}: TLS versions "
            "before 1.2 are deprecated (RFC 8996). Remove ssl_max_protocol_version, or set it "
            "to TLSv1.2 or later."
        )
    return chosen


@functools.lru_cache(maxsize=64)
def _parse(conninfo: str) -> tuple[tuple[str, str], ...]:
    """libpq's parse of *conninfo*: a pure function, and pools parse one string again and again."""
    return tuple(conninfo_to_dict(conninfo).items())  # type: ignore[arg-type]


def _dial_alias(resolved: dict[str, str], verify_as: str) -> None:
    """Point *resolved* at the alias's addresses, with *verify_as* as the name libpq verifies."""
    name = verify_as.strip()
    if not name or any(c in name for c in ",/@ \t") or _is_socket(name):
        raise ConfigurationError(
            f"verify_as={verify_as!r} is not a host name: give the DNS name (or IP address) "
            "that the server's certificate holds."
        )
    hosts = _split(resolved.get("host"))
    if len(hosts) != 1 or _is_socket(hosts[0]):
        raise ConfigurationError(
            "verify_as needs exactly one TCP host to dial (the alias); this connection has "
            f"{len(hosts) or 'no'} host(s). For several hosts, give host= and hostaddr= lists "
            "yourself."
        )
    if resolved.get("hostaddr"):
        raise ConfigurationError(
            "verify_as resolves the alias itself and cannot be combined with hostaddr. Either "
            "drop verify_as and set host= to the certificate's name next to your hostaddr=, or "
            "drop hostaddr."
        )
    alias = hosts[0]
    port = (_split(resolved.get("port")) or [_DEFAULT_PORT])[0] or _DEFAULT_PORT
    try:
        infos = socket.getaddrinfo(alias, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as ex:
        raise psycopg.OperationalError(
            f'could not resolve the alias "{alias}" (to verify as "{name}"): {ex}'
        ) from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    logger.info(
        "safepg: dialling %s (%s) and verifying the certificate for %s, as verify_as asks",
        alias,
        ", ".join(addresses),
        name,
    )
    resolved["host"] = ",".join([name] * len(addresses))
    resolved["hostaddr"] = ",".join(addresses)


_T = TypeVar("_T")


def _refused_or(
    parse: Callable[[], _T], keywords: Iterable[str] = (), text: str = ""
) -> _T | ConfigurationError:
    """*parse*'s result, or the refusal to raise for libpq's parse error.

    The refusal is returned, to be raised outside the except clause: libpq's own error quotes
    the input (perhaps the password), and would stay reachable as the refusal's __context__.
    """
    try:
        return parse()
    except psycopg.ProgrammingError as ex:
        message = redact_parse_error(str(ex), keywords, text)
    return ConfigurationError(f"invalid connection parameters: {message}")


def build_plan(
    conninfo: str,
    kwargs: Mapping[str, Any],
    *,
    allow_unencrypted_unix_socket: object = False,
    verify_as: str | None = None,
) -> Plan:
    """Harden *conninfo* and *kwargs* into the final libpq parameters.

    With *verify_as*, the alias is resolved (the only network I/O here, a DNS lookup).

    Raises:
        ConfigurationError: the input is invalid, or cannot lead to a verified session.
    """
    allow_socket = as_bool("allow_unencrypted_unix_socket", allow_unencrypted_unix_socket)
    _reject_unsafe_text(conninfo, kwargs)
    _reject_mangled_url(conninfo)
    parsed = _refused_or(lambda: dict(_parse(conninfo)), text=conninfo)
    if isinstance(parsed, ConfigurationError):
        raise parsed
    params = parsed
    params.update((k, str(v)) for k, v in kwargs.items() if v is not None)
    secrets = (params.get("password"), params.get("sslpassword"))
    # make_conninfo validates keywords given as kwargs (conninfo_to_dict does not).
    viewed = _refused_or(lambda: _resolved(params, secrets), kwargs.keys())
    if isinstance(viewed, ConfigurationError):
        raise viewed
    resolved = viewed

    service = params.get("service") or getenv("PGSERVICE")
    defaults: dict[str, str | None] = {}

    def origin(key: str, envvar: str) -> str:
        if kwargs.get(key) is not None:
            return keyword_origin(key)
        if key in params:
            return "the conninfo string"
        if service:
            if not defaults:
                # libpq's compiled-in defaults: PQconndefaults' values would include the
                # service named by PGSERVICE, whose settings then looked like defaults.
                defaults.update(
                    (
                        o.keyword.decode(),
                        o.compiled.decode("utf-8", "replace") if o.compiled else None,
                    )
                    for o in _CONNDEFAULTS
                )
            # Without the service, libpq would take the variable, else the compiled default.
            if resolved.get(key) != (getenv(envvar) or defaults.get(key)):
                return f"service {service!r} in the service file"
        if getenv(envvar):
            return _env_origin(envvar)
        return _DEFAULT_ORIGIN

    # The option policy: an option it does not know, or one it refuses, set anywhere.
    _options.check(resolved, params, origin)
    _check_numbers(resolved, origin)
    sslmode = resolved.get("sslmode", "prefer")
    if sslmode != REQUIRED_SSLMODE:
        _raise_logged(
            "sslmode",
            sslmode,
            REQUIRED_SSLMODE,
            origin("sslmode", "PGSSLMODE"),
            "only verify-full checks that the server holds a certificate for the host dialled",
        )
    gssencmode = resolved.get("gssencmode", "disable")
    if gssencmode != "disable":
        _raise_logged(
            "gssencmode",
            gssencmode,
            "disable",
            origin("gssencmode", "PGGSSENCMODE"),
            "libpq prefers GSS encryption to TLS, and then no certificate is verified",
        )
    if verify_as is not None:
        _dial_alias(resolved, verify_as)
    targets = _targets(resolved, allow_socket)
    rootcert_origin = origin("sslrootcert", "PGSSLROOTCERT")
    trust = _trust.resolve(
        resolved.get("sslrootcert") or None,
        rootcert_origin,
        [t.host for t in targets if not t.socket],
        from_env=rootcert_origin == _env_origin("PGSSLROOTCERT"),
        timeout=_timeout_of(resolved),
    )
    final = dict(params)
    # Pin where to connect as checked above: libpq resolves service files and PG* variables
    # again when it connects, and they could differ by then (another thread, an LDAP service).
    # connect_timeout too: psycopg enforces it itself, from the conninfo and PGCONNECT_TIMEOUT
    # only, and would wait its own 130 s for one set in a service file.
    pinned = ("host", "hostaddr", "port", "connect_timeout")
    final.update({k: resolved[k] for k in pinned if resolved.get(k)})
    final.update(
        # Encrypt, verify the chain against `trust`, and check the host name: nothing less.
        sslmode=REQUIRED_SSLMODE,
        sslrootcert=trust.path,
        # Kerberos credentials would otherwise win over TLS, with no certificate check at all.
        gssencmode="disable",
        ssl_min_protocol_version=_min_tls(
            resolved, origin("ssl_min_protocol_version", "PGSSLMINPROTOCOLVERSION")
        ),
    )
    chosen = (
        "sslnegotiation" in params
        or bool(getenv("PGSSLNEGOTIATION"))
        or resolved.get("sslnegotiation", "postgres") != "postgres"
    )
    return Plan(final, trust, targets, allow_socket, resolved, chosen)
