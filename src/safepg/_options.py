"""The option policy: what safepg does with every libpq connection option and variable.

One static table, modelled on libpq's own ``PQconninfoOptions`` (``fe-connect.c``): each
connection option of libpq 14 through 18 (which are also the keys a service file may hold),
with its environment variable, libpq's compiled-in default, and a disposition for each way
safepg opens a connection:

- ``libpq``: every path that hands the options to libpq: `safepg.connect` and
  `connect_async`, the pools, SQLAlchemy's psycopg engines, Django (and ``dbshell``, whose psql
  gets the hardened conninfo), `safepg.psycopg2`, and the command line's ``env`` and ``check``.
  All of them go through `_params.build_plan`, which calls `check`.
- ``asyncpg``: `safepg.asyncpg` and ``postgresql+asyncpg://`` engines. asyncpg does not use
  libpq: each option is translated to what asyncpg takes with the same meaning (`translate`),
  hardened by safepg, or refused. Nothing is dropped.

`ENVIRONMENT` does the same for the variables libpq reads that are not an option's (service
files, settings sent at start-up, libpq 18's OAuth debugging).

Two paths read no conninfo: `ssl_context` takes its settings as arguments, and of the
variables reads ``PGSSLROOTCERT`` (trust anchors) and ``PGSSLCRL`` (checked as for asyncpg,
with libpq's default ``~/.postgresql/root.crl``), and refuses ``PGSSLCRLDIR``; ``safepg
inspect`` reads none (it takes a host and port, and trusts nothing).

An option the running libpq resolves (``PQconninfo``) that is not in the table, such as one a
newer libpq adds, is refused by name: it may change what libpq sends, writes or trusts, and
nobody has decided yet whether that is safe. A refused option is refused whatever set it (the
conninfo, a URL query, a keyword, its environment variable, a service file named by
``PGSERVICE``/``PGSERVICEFILE``): the check reads libpq's own resolution of them all.
"""

from __future__ import annotations

import enum
import functools
import os
import re
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from psycopg import pq

from . import _trust
from ._environ import getenv
from ._errors import ConfigurationError


class Disposition(enum.Enum):
    """What safepg does with an option or variable on one path."""

    PASS = "passed through"  # noqa: S105 - not a password; given to libpq as the caller set it
    HARDEN = "hardened"  # safepg sets it, or raises a weaker value
    REFUSE = "refused"  # a value other than the default is refused, with the reason
    TRANSLATE = "translated"  # given to a driver that is not libpq, with the same meaning
    NOT_READ = "not read"  # no libpq 14-18 (or driver) on this path reads it


@dataclass(frozen=True)
class Rule:
    """One disposition, why, and for REFUSE the values that mean the default."""

    disposition: Disposition
    why: str = ""
    accepts: tuple[str, ...] = ()
    to: str = ""  # for TRANSLATE: the driver's keyword argument, when it has one


@dataclass(frozen=True)
class Option:
    """One libpq connection option (and service-file key)."""

    keyword: str
    envvar: str | None
    since: int  # the first libpq major version that has it
    default: str | None  # libpq's compiled-in default
    libpq: Rule
    asyncpg: Rule
    until: int = 99  # the last libpq major version that has it

    def refuses(self, value: str | None, rule: Rule) -> bool:
        """Whether *rule* refuses *value* (set, and neither the default nor an accepted one).

        An empty value is libpq's default when that is empty too; otherwise libpq reads it as
        something else (``sslcompression=`` is not ``0``: libpq compresses unless the value
        starts with 0), so it is refused as any other value."""
        return (
            rule.disposition is Disposition.REFUSE
            and value is not None
            and (value != "" or bool(self.default))
            and value != self.default
            and value not in rule.accepts
        )


_P = Rule(Disposition.PASS)


def _h(why: str) -> Rule:
    return Rule(Disposition.HARDEN, why)


def _t(why: str, to: str = "") -> Rule:
    return Rule(Disposition.TRANSLATE, why, to=to)


def _r(why: str, *accepts: str) -> Rule:
    return Rule(Disposition.REFUSE, why, accepts)


_NO_ASYNCPG = "asyncpg has no such setting"
_KEYLOG = (
    "libpq appends the TLS secrets of every session to that file: anyone who can read it and "
    "capture the traffic reads the session, the password or token included"
)
_OAUTH = (
    "libpq 18's OAuth flow fetches a bearer token from an issuer over HTTPS with trust anchors "
    "safepg does not choose (the OS store, PGOAUTHCAFILE); give a token provider as the "
    "password instead (safepg.providers, safepg.aws, safepg.azure, safepg.gcp)"
)
_SCRAM_KEYS = (
    "SCRAM keys passed through by postgres_fdw and dblink (use_scram_passthrough) are secrets "
    "that libpq does not mark as such, so safepg could not keep them out of messages and memos"
)
_REMOVED = "no libpq from 14 on has it"
_TLS_BY_SAFEPG = "the TLS session is safepg's: verify-full with the trust anchors it resolves"

# fmt: off
OPTIONS: tuple[Option, ...] = (
    # -- who and where ---------------------------------------------------------------------
    Option("service", "PGSERVICE", 14, None, _P,
           _t("read through libpq by safepg, which passes on what the service sets")),
    Option("user", "PGUSER", 14, None, _P, _t("asyncpg's user", "user")),
    Option("password", "PGPASSWORD", 14, None, _P, _t("asyncpg's password", "password")),
    Option("passfile", "PGPASSFILE", 14, None, _P, _t("asyncpg's passfile", "passfile")),
    Option("dbname", "PGDATABASE", 14, None, _P, _t("asyncpg's database", "database")),
    Option("host", "PGHOST", 14, None,
           _h("pinned as checked: a TCP host name to verify; a socket only when allowed"),
           _h("asyncpg gets the checked host list")),
    Option("hostaddr", "PGHOSTADDR", 14, None, _h("pinned as checked, with a host name beside it"),
           _r("asyncpg has no hostaddr: give the name in the certificate as host")),
    Option("port", "PGPORT", 14, "5432", _h("pinned as checked"), _h("asyncpg gets the ports")),
    Option("connect_timeout", "PGCONNECT_TIMEOUT", 14, None,
           _h("pinned as checked, so that psycopg enforces it"), _t("asyncpg's timeout")),
    Option("target_session_attrs", "PGTARGETSESSIONATTRS", 14, "any", _P,
           _t("asyncpg's target_session_attrs", "target_session_attrs")),
    Option("load_balance_hosts", "PGLOADBALANCEHOSTS", 16, "disable", _P,
           _r("asyncpg tries the hosts in order only", "disable")),
    # -- what the session starts with --------------------------------------------------------
    Option("client_encoding", "PGCLIENTENCODING", 14, None, _P,
           _r("asyncpg always uses UTF8", "UTF8", "utf8", "UTF-8", "utf-8", "unicode")),
    Option("options", "PGOPTIONS", 14, "", _P,
           _r("asyncpg has no command-line options string; give server_settings=")),
    Option("application_name", "PGAPPNAME", 14, None, _P,
           _t("asyncpg's server_settings['application_name']")),
    Option("fallback_application_name", None, 14, None, _P,
           _t("asyncpg's server_settings['application_name'], unless one is set")),
    Option("replication", None, 14, None, _P, _r("asyncpg cannot open a replication session")),
    # -- TCP -------------------------------------------------------------------------------
    Option("keepalives", None, 14, None, _P, _r(_NO_ASYNCPG, "1")),
    Option("keepalives_idle", None, 14, None, _P, _r(_NO_ASYNCPG)),
    Option("keepalives_interval", None, 14, None, _P, _r(_NO_ASYNCPG)),
    Option("keepalives_count", None, 14, None, _P, _r(_NO_ASYNCPG)),
    Option("tcp_user_timeout", None, 14, None, _P, _r(_NO_ASYNCPG, "0")),
    # -- TLS ---------------------------------------------------------------------------------
    Option("sslmode", "PGSSLMODE", 14, "prefer",
           _h("always verify-full: the only mode that checks the host name"),
           _h("always a verify-full context")),
    Option("sslnegotiation", "PGSSLNEGOTIATION", 17, "postgres", _P,
           _t("asyncpg's direct_tls (asyncpg 0.30+)")),
    Option("sslrootcert", "PGSSLROOTCERT", 14, None,
           _h("resolved by safepg into the trust anchors it names"),
           _h("the context trusts exactly safepg's resolved anchors")),
    Option("ssl_min_protocol_version", "PGSSLMINPROTOCOLVERSION", 14, "TLSv1.2",
           _h("raised to TLS 1.2 at least (RFC 8996)"), _h("the context's minimum_version")),
    Option("ssl_max_protocol_version", "PGSSLMAXPROTOCOLVERSION", 14, None,
           _h("refused below the minimum"),
           _r("safepg's shared asyncpg contexts have no maximum version")),
    Option("sslcompression", "PGSSLCOMPRESSION", 14, "0",
           _r("TLS compression leaks secrets through the length of what is sent (CRIME)", "0"),
           _r("TLS compression leaks secrets through the length of what is sent (CRIME)", "0")),
    Option("sslsni", "PGSSLSNI", 14, "1", _P,
           # sslsni=0 only keeps the host name out of the ClientHello: libpq still verifies
           # the certificate against it (verify-full), so it narrows nothing that is checked.
           _r("Python's ssl module always sends the host name it verifies (SNI)", "1")),
    Option("sslcert", "PGSSLCERT", 14, None, _P, _t("loaded into the context")),
    Option("sslkey", "PGSSLKEY", 14, None, _P, _t("loaded into the context")),
    Option("sslpassword", None, 14, None, _P, _t("decrypts sslkey")),
    Option("sslcertmode", "PGSSLCERTMODE", 16, None, _P,
           _t("disable: no client certificate is loaded; require is refused")),
    Option("sslcrl", "PGSSLCRL", 14, None,
           _h("checked to hold CRLs only: OpenSSL takes a certificate in it as a trust anchor"),
           _t("its CRLs checked by the context (VERIFY_CRL_CHECK_CHAIN); a file that holds a "
              "certificate is refused")),
    Option("sslcrldir", "PGSSLCRLDIR", 14, None,
           _h("checked to hold no certificate (hash.N): OpenSSL would trust one"),
           _r("safepg.asyncpg cannot check a CRL directory as libpq does: put the CRLs in one "
              "file and name it with sslcrl")),
    Option("sslkeylogfile", None, 18, None, _r(_KEYLOG), _r(_KEYLOG)),
    # -- authentication ----------------------------------------------------------------------
    Option("channel_binding", "PGCHANNELBINDING", 14, "prefer", _P,
           _r("asyncpg has no SCRAM channel binding", "prefer", "disable")),
    Option("require_auth", "PGREQUIREAUTH", 16, None, _P,
           _r("asyncpg cannot restrict the authentication methods it accepts")),
    Option("requirepeer", "PGREQUIREPEER", 14, None, _P,
           _r("asyncpg cannot check a Unix-domain socket's peer")),
    Option("min_protocol_version", "PGMINPROTOCOLVERSION", 18, None, _P,
           _r("asyncpg speaks protocol 3.0", "3.0")),
    Option("max_protocol_version", "PGMAXPROTOCOLVERSION", 18, None, _P,
           _r("asyncpg speaks protocol 3.0", "3.0", "3.2", "latest")),
    Option("scram_client_key", None, 18, None, _r(_SCRAM_KEYS), _r(_SCRAM_KEYS)),
    Option("scram_server_key", None, 18, None, _r(_SCRAM_KEYS), _r(_SCRAM_KEYS)),
    Option("oauth_issuer", None, 18, None, _r(_OAUTH), _r(_OAUTH)),
    Option("oauth_client_id", None, 18, None, _r(_OAUTH), _r(_OAUTH)),
    Option("oauth_client_secret", None, 18, None, _r(_OAUTH), _r(_OAUTH)),
    Option("oauth_scope", None, 18, None, _r(_OAUTH), _r(_OAUTH)),
    # -- GSSAPI ------------------------------------------------------------------------------
    Option("gssencmode", "PGGSSENCMODE", 14, "prefer",
           _h("always disable: GSS encryption would replace TLS, with no certificate check"),
           _h("asyncpg has no GSS encryption")),
    Option("krbsrvname", "PGKRBSRVNAME", 14, "postgres", _P,
           _t("asyncpg's krbsrvname", "krbsrvname")),
    Option("gsslib", "PGGSSLIB", 14, None, _P, _t("asyncpg's gsslib", "gsslib")),
    Option("gssdelegation", "PGGSSDELEGATION", 16, "0", _P, _r(_NO_ASYNCPG, "0")),
    # -- gone before libpq 14 (kept so that a service file or code written for them is told) --
    Option("requiressl", "PGREQUIRESSL", 7, None, _r(_REMOVED), _r(_REMOVED), until=13),
    Option("tty", "PGTTY", 7, None, _r(_REMOVED), _r(_REMOVED), until=13),
    Option("authtype", "PGAUTHTYPE", 7, None, _r(_REMOVED), _r(_REMOVED), until=13),
)


@dataclass(frozen=True)
class Variable:
    """An environment variable libpq (or Python's ssl) reads that is not an option's."""

    name: str
    libpq: Rule
    asyncpg: Rule


_SERVICE = _t("read through libpq by safepg, which passes on what the service sets")
ENVIRONMENT: tuple[Variable, ...] = (
    Variable("PGSERVICEFILE", _P, _SERVICE),
    Variable("PGSYSCONFDIR", _P, _SERVICE),
    # libpq sends these as settings at start-up.
    Variable("PGDATESTYLE", _P, _t("asyncpg's server_settings['datestyle']")),
    Variable("PGTZ", _P, _t("asyncpg's server_settings['timezone']")),
    Variable("PGGEQO", _P, _t("asyncpg's server_settings['geqo']")),
    Variable("PGLOCALEDIR", _P,
             Rule(Disposition.NOT_READ, "the language of libpq's own messages")),
    # libpq 18's OAuth flow (libpq-oauth): UNSAFE allows plain HTTP and prints secrets.
    Variable("PGOAUTHDEBUG", _r(_OAUTH), Rule(Disposition.NOT_READ, "asyncpg has no OAuth")),
    Variable("PGOAUTHCAFILE", _r(_OAUTH), Rule(Disposition.NOT_READ, "asyncpg has no OAuth")),
    # Python's ssl.create_default_context() writes TLS secrets to it; safepg's contexts are
    # made with ssl.SSLContext(), which does not read it, and libpq never does.
    Variable("SSLKEYLOGFILE", Rule(Disposition.NOT_READ, "libpq never reads it"),
             Rule(Disposition.NOT_READ, "safepg's contexts do not read it")),
)
# fmt: on

# The newest libpq whose options the table holds: a driver on a newer one is refused.
NEWEST_LIBPQ = 18
BY_KEYWORD: dict[str, Option] = {o.keyword: o for o in OPTIONS}
# Options of the table whose variable the running libpq does not read (libpq 15 has no
# PGREQUIREAUTH): for asyncpg, which reads no variable itself, safepg reads them.
_RUNNING = frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())
UNSEEN_VARIABLES = tuple(
    (o.keyword, o.envvar)
    for o in OPTIONS
    if o.envvar and o.keyword not in _RUNNING and o.until >= 14  # PGREQUIRESSL: read by none
)
# keyword -> (libpq's default, asyncpg's rule, the option): asyncpg_settings' look-up.
_ASYNCPG_RULES = {o.keyword: (o.default, o.asyncpg, o) for o in OPTIONS}
# libpq's options that asyncpg takes under a keyword of its own, by that keyword.
ASYNCPG_KEYWORDS = {o.keyword: o.asyncpg.to for o in OPTIONS if o.asyncpg.to}
# Every keyword of libpq 14-18: what Django's OPTIONS may hand to libpq (dbshell too).
KEYWORDS = frozenset(o.keyword for o in OPTIONS if o.until >= 14)
# What each path refuses, read once: the check is a few dict look-ups per connect.
_KNOWN = frozenset(BY_KEYWORD)
_REFUSED_LIBPQ = tuple((o.keyword, o) for o in OPTIONS if o.libpq.disposition is Disposition.REFUSE)
_REFUSED_ENV_LIBPQ = tuple(v.name for v in ENVIRONMENT if v.libpq.disposition is Disposition.REFUSE)

Origin = Callable[[str, str], str]

# Options a policy decision is made on that libpq reads again when it connects: a service
# file or variable changed since the check (another process or thread, an LDAP service that
# answers otherwise the second time) would set them unexamined. They are handed to libpq as
# checked, or empty (libpq's default), which its second resolution does not override. Not the
# SCRAM keys: libpq refuses an empty one, and one set late goes to a server already verified.
_PINNED = tuple(
    o
    for o in OPTIONS
    if o.keyword in ("sslcrl", "sslcrldir")
    or (
        o.libpq.disposition is Disposition.REFUSE
        and o.keyword not in ("scram_client_key", "scram_server_key")
    )
)
_RUNNING_MAJOR = pq.version() // 10000


def pins(resolved: Mapping[str, str], libpq: int = _RUNNING_MAJOR) -> dict[str, str]:
    """The checked options to hand to a libpq of major version *libpq* explicitly, so that it
    cannot take other values for them from a service file or variable when it connects."""
    return {
        o.keyword: resolved.get(o.keyword, o.default or "")
        for o in _PINNED
        if o.since <= libpq <= o.until
    }


def _no_origin(key: str, envvar: str) -> str:
    return "the conninfo, a keyword, the environment or a service file"


def check_driver_libpq(version: int, driver: str) -> None:
    """Refuse a driver's own libpq (psycopg2's wheels bundle one) newer than the table: its
    new options, set in the environment, would go unexamined.

    Raises:
        ConfigurationError: *version* (libpq's PQlibVersion) is past `NEWEST_LIBPQ`.
    """
    if version // 10000 > NEWEST_LIBPQ:
        raise ConfigurationError(
            f"{driver} uses libpq {version // 10000}, newer than the libpq {NEWEST_LIBPQ} whose "
            "options safepg's option policy knows: options it added could change what libpq "
            "sends, writes or trusts unexamined. Upgrade safepg, or use a build of the driver "
            f"with libpq {NEWEST_LIBPQ} or older."
        )


def unknown_option(names: list[str] | set[str]) -> ConfigurationError:
    """The refusal of options the policy table does not hold."""
    shown = ", ".join(sorted(names))
    return ConfigurationError(
        f"libpq resolves the connection option(s) {shown}, which safepg's option policy does "
        "not know (a newer libpq than this safepg was reviewed with): an unknown option may "
        "change what libpq sends, writes or trusts, so it is refused. Remove it (from the "
        "conninfo, keywords, environment or service file), or upgrade safepg."
    )


def check(
    resolved: Mapping[str, str],
    params: Mapping[str, str],
    origin: Origin = _no_origin,
) -> None:
    """Refuse what the ``libpq`` paths refuse: an option not in the table, or a refused one set
    anywhere (*resolved* is libpq's own resolution: conninfo, keywords, service file,
    environment; *params* adds the secrets the resolution memo leaves out).

    Raises:
        ConfigurationError: naming the option and where it came from, never its value.
    """
    if not resolved.keys() <= _KNOWN:
        raise unknown_option(resolved.keys() - _KNOWN)
    for keyword, option in _REFUSED_LIBPQ:
        value = resolved[keyword] if keyword in resolved else params.get(keyword)
        if option.refuses(value, option.libpq):
            raise refusal(option, option.libpq, origin)
    check_crl_files(resolved, origin)
    if any(map(getenv, _REFUSED_ENV_LIBPQ)):
        name = next(filter(getenv, _REFUSED_ENV_LIBPQ))
        rule = next(v.libpq for v in ENVIRONMENT if v.name == name)
        raise ConfigurationError(
            f"the {name} environment variable is set, and safepg refuses it: {rule.why}. "
            f"Unset {name}."
        )


def refusal(option: Option, rule: Rule, origin: Origin, what: str = "safepg") -> ConfigurationError:
    """The refusal of *option* under *rule*; the value is never shown."""
    where = origin(option.keyword, option.envvar or "")
    if where == "libpq's default":
        # A refused value is never libpq's default: a service named by PGSERVICE, which
        # PQconndefaults (the comparison `origin` makes) reads too.
        where = "a service file (PGSERVICE, PGSERVICEFILE)"
    accepted = sorted({*rule.accepts, *filter(None, [option.default])})
    allowed = f" (accepted: {', '.join(accepted)})" if rule.accepts else ""
    return ConfigurationError(
        f"{what} refuses the connection option {option.keyword} (from {where}): {rule.why}"
        f"{allowed}. Remove it from there."
    )


def asyncpg_settings(
    resolved: Mapping[str, str], params: Mapping[str, str], origin: Origin = _no_origin
) -> dict[str, str]:
    """The options set to other than their default that asyncpg must be given (disposition
    TRANSLATE), after refusing those it cannot honour. The variables of options the running
    libpq does not know (``PGREQUIREAUTH`` with libpq 15) are read too: asyncpg must not
    drop what a newer libpq would honour.

    Raises:
        ConfigurationError: an option asyncpg cannot honour, named with where it came from.
    """
    out: dict[str, str] = {}
    unseen = {k: v for k, name in UNSEEN_VARIABLES if k not in params and (v := getenv(name))}
    for key, value in {**resolved, **unseen, **params}.items():
        entry = _ASYNCPG_RULES.get(key)
        if entry is None:
            raise unknown_option({key})
        default, rule, option = entry
        if not value or value == default:
            continue
        if rule.disposition is Disposition.REFUSE:
            if value not in rule.accepts:
                raise refusal(option, rule, origin, "safepg.asyncpg")
        elif rule.disposition is Disposition.TRANSLATE:
            out[key] = value
    return out


def asyncpg_environment() -> dict[str, str]:
    """The variables asyncpg gets translated (PGTZ, PGDATESTYLE, PGGEQO), as set."""
    names = {"PGDATESTYLE": "datestyle", "PGTZ": "timezone", "PGGEQO": "geqo"}
    return {setting: value for name, setting in names.items() if (value := getenv(name))}


# -- revocation lists: OpenSSL loads certificates from them too, as trust anchors ----------------

# A PEM block's label: a CRL file must hold CRLs and nothing else.
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_MAX_CRL_FILE = 64 * 1024 * 1024
# A file X509_LOOKUP_hash_dir reads as a certificate ("<hash>.<n>"; CRLs are "<hash>.r<n>").
_HASHED_CERT = re.compile(r"[0-9a-f]{8}\.[0-9]+")
# (path, inode/size/mtime) of a file or directory checked and found clean.
_CLEAN: set[tuple[str, tuple[int, int, int]]] = set()
_CLEAN_LOCK = threading.Lock()


def read_crl(path: str, origin: str) -> bytes:
    """The CRLs of *path*, checked to be PEM CRLs only, as libpq reads them (``sslcrl``).

    OpenSSL loads certificates from a CRL file too, as more trust anchors: libpq would (its
    ``X509_STORE_load_locations``), and ``load_verify_locations`` would. A file that holds
    anything but CRLs is refused; asyncpg's context loads the bytes checked here.

    Raises:
        ConfigurationError: the file cannot be read, or holds no CRL, or something else.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_CRL_FILE + 1)
    except OSError as ex:
        raise ConfigurationError(
            f"the certificate revocation list {path!r} (sslcrl, from {origin}) cannot be read: "
            f"{ex.strerror or ex}"
        ) from None
    labels = set(_PEM_LABEL.findall(data))
    if len(data) > _MAX_CRL_FILE or labels != {b"X509 CRL"}:
        found = ", ".join(sorted(label.decode() for label in labels)) or "no PEM block"
        raise ConfigurationError(
            f"the certificate revocation list {path!r} (sslcrl, from {origin}) must hold PEM "
            f"CRLs (-----BEGIN X509 CRL-----) and nothing else; it holds {found}. OpenSSL "
            "would take a certificate in it as one more trust anchor, beside sslrootcert."
        )
    return data


def _default_crl() -> str | None:
    """libpq's default CRL file, beside its default root.crt (for this HOME and user)."""
    root = _trust.libpq_default_root()
    return _beside(root) if root is not None else None


def _default_crls() -> list[str]:
    """libpq's default CRL file in each home a libpq 14-18 may read it from."""
    return [_beside(home / "root.crt") for home in _trust.libpq_homes()]


@functools.lru_cache(maxsize=8)
def _beside(root: Path) -> str:
    return str(root.with_name("root.crl"))


def crls(path: str | None, origin: str) -> bytes:
    """The CRLs to check for a context that is not libpq's: *path*'s (set by *origin*), else
    libpq's default ``~/.postgresql/root.crl`` when it exists; none otherwise.

    Raises:
        ConfigurationError: as `read_crl`.
    """
    if path is None:
        path = _default_crl()
        if path is None or not os.path.exists(path):  # as the effective user, as libpq
            return b""
        origin = "libpq's default file"
    return read_crl(path, origin)


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        return _trust.stat_key(os.stat(path))
    except OSError:
        return None


def check_crl_files(resolved: Mapping[str, str], origin: Origin = _no_origin) -> None:
    """Refuse a CRL file or directory that holds a certificate (libpq would trust it): the one
    named by sslcrl, else libpq's default ``~/.postgresql/root.crl``, and sslcrldir. Each is
    read once per version on disk (inode, size, mtime).

    Raises:
        ConfigurationError: naming the file and where it was set.
    """
    crl = resolved.get("sslcrl")
    if crl:
        files = [(crl, origin("sslcrl", "PGSSLCRL"))]
    else:
        # libpq's default file, in each home a libpq 14-18 may take (`_trust.libpq_homes`).
        # As libpq reads it: as the effective user (os.access would ask as the real one).
        files = [(f, "libpq's default file") for f in _default_crls() if os.path.exists(f)]
    for path, where in files:
        key = _stat(path)
        if key is not None and (path, key) not in _CLEAN:
            read_crl(path, where)
            _remember(path, key)
    crldir = resolved.get("sslcrldir")
    if crldir:
        where = origin("sslcrldir", "PGSSLCRLDIR")
        # OpenSSL's directory lookup takes a list of directories, separated as PATH is, and
        # trusts the certificates of each: every one is checked.
        for directory in crldir.split(os.pathsep):
            if directory:
                _check_crl_dir(directory, where)


def _check_crl_dir(crldir: str, where: str) -> None:
    """Refuse a directory of *sslcrldir* where OpenSSL would find a certificate (hash.N).

    Raises:
        ConfigurationError: it holds one, or it cannot be listed (OpenSSL opens the files by
            name, so a directory it may search but nobody may list would go unchecked).
    """
    try:
        st = os.stat(crldir)
    except OSError:
        return  # OpenSSL finds nothing under it either
    if not stat.S_ISDIR(st.st_mode):
        return
    key = _trust.stat_key(st)
    if (crldir, key) in _CLEAN:
        return
    try:
        names = os.listdir(crldir)
    except OSError as ex:
        raise ConfigurationError(
            f"the revocation list directory {crldir!r} (sslcrldir, from {where}) cannot be "
            f"listed ({ex.strerror or ex}), so safepg cannot check that it holds no certificate, "
            "which OpenSSL would open by name and trust beside sslrootcert. Make it readable, "
            "or put the CRLs in one file and name it with sslcrl."
        ) from None
    certs = sorted(n for n in names if _HASHED_CERT.fullmatch(n))
    if certs:
        raise ConfigurationError(
            f"the revocation list directory {crldir!r} (sslcrldir, from {where}) holds "
            f"{', '.join(certs[:3])}{', ...' if len(certs) > 3 else ''}, which OpenSSL reads "
            "as certificates and would trust beside sslrootcert. Keep only CRLs there (named "
            "hash.rN)."
        )
    _remember(crldir, key)


def _after_fork() -> None:
    global _CLEAN_LOCK
    _CLEAN_LOCK = threading.Lock()  # a thread of the parent may have held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _remember(path: str, key: tuple[int, int, int]) -> None:
    with _CLEAN_LOCK:
        if len(_CLEAN) >= 256:
            _CLEAN.clear()
        _CLEAN.add((path, key))
