"""Turning libpq's connection failures (and Python ssl's, for asyncpg) into safepg's error
classes, with advice.

libpq reports TLS failures as text. The tests check the phrases matched here against both
psycopg-binary's libpq (18) and the system's (15 on Debian 12).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import psycopg

from . import providers
from ._errors import (
    CertificateExpiredError,
    ConfigurationError,
    ConnectionSecurityError,
    HostnameMismatchError,
    ProtocolViolationError,
    SafePGError,
    SSLNotSupportedError,
    UntrustedCertificateError,
)
from ._params import Plan, Target, keyword_spelling
from ._redact import redact
from ._text import shown

if TYPE_CHECKING:
    from . import _probe

# libpq quotes the certificate's first name raw: it may hold quotes, line breaks and any of the
# phrases matched here. The host name (the caller's) ends libpq's line.
_MISMATCH = re.compile(
    r'server certificate for "(?P<name>.*?)"(?: \(and (?P<more>\d+) other names?\))? '
    r'does not match host name "(?P<host>[^"\n]*)"(?=\n|\Z)',
    re.DOTALL,
)
_NO_NAMES = "could not get server's host name from server certificate"
_VERIFY_FAILED = "certificate verify failed"
_NO_SSL = "server does not support SSL"
# libpq refuses these before TLS starts; the server's text, if any, is never shown.
_ERROR_INSTEAD_OF_TLS = "server sent an error response during SSL exchange"
_INJECTED = "received unencrypted data after SSL"  # "... response" (libpq 15, 18)
# libpq, when the answer to the SSLRequest is neither 'S' nor 'N' (nor 'E'): an HTTP server
# answers 'H'. The byte is shown only by libpq's own text, escaped.
_NOT_POSTGRES = "received invalid response to SSL negotiation"
POSTGRES_PORT_HINT = (
    "Is this a PostgreSQL port? PostgreSQL listens on 5432 unless configured otherwise; a web "
    "server, another database or a proxy for another protocol may be listening here."
)
_ROOT_FILE = re.compile(r'root certificate file "(?P<path>[^"]*)"')
_AT = re.compile(r'connection to server at "(?P<addr>[^"]*)"(?:.*?), port (?P<port>\d+) failed')
# X509_V_ERR_CERT_NOT_YET_VALID and X509_V_ERR_CERT_HAS_EXPIRED.
_EXPIRY_CODES = (9, 10)
# X509_V_ERR_ codes meaning "no trusted issuer": UNABLE_TO_GET_ISSUER_CERT,
# DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN, UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
# UNABLE_TO_VERIFY_LEAF_SIGNATURE.
_NO_TRUSTED_ISSUER_CODES = (2, 18, 19, 20, 21)
_DEFAULT_PROBE_TIMEOUT = 5.0
_MIN_PROBE_TIME = 0.2

# How to fix each failure: shared by connect errors and the CLI's inspect command.
FIX_MISMATCH = (
    "To fix: connect with a name the certificate holds. If you dial a DNS alias (a CNAME such as "
    "db.internal -> the real endpoint), connect to the endpoint's own name, or give that name as "
    "host= and the alias's address as hostaddr= (or let safepg resolve the alias: "
    "connect(..., verify_as='the.name.in.the.certificate')). If the name is right and the "
    "certificate is not, the server's operator must reissue it for this name."
)
FIX_UNTRUSTED = (
    "To fix: if this is the server you meant, give safepg the CA that issued its certificate: "
    "sslrootcert=/path/to/ca.pem, or PGSSLROOTCERT. Managed services publish theirs (for "
    "example Amazon RDS's global-bundle.pem). If you did not expect a new certificate here, "
    "something may be intercepting the connection."
)
FIX_EXPIRED = (
    "To fix: the server's operator must renew the certificate (or the expired CA in its "
    "chain). Check this machine's clock too."
)
FIX_NO_TLS = (
    "To fix: the server's operator turns TLS on with ssl = on, ssl_cert_file and ssl_key_file "
    "in postgresql.conf. If the server should have TLS, something between you and it may be "
    "stripping it."
)


def _find_target(plan: Plan, host: str | None, addr: str | None) -> Target | None:
    for t in plan.targets:
        if host is not None and t.host == host:
            return t
    for t in plan.targets:
        if addr is not None and addr in (t.host, t.hostaddr):
            return t
    return plan.targets[0] if len(plan.targets) == 1 else None


def _run_probe(
    plan: Plan, target: Target | None, addr: str | None, port: str | None, budget: float
) -> _probe.ProbeResult | None:
    address = (target.hostaddr if target else None) or addr or (target.host if target else None)
    # Too little time left on the connect's deadline: diagnose from libpq's text alone.
    if not address or not port or not port.isdigit() or budget < _MIN_PROBE_TIME:
        return None
    from . import _probe  # ssl and socket, only on a failure path

    return _probe.probe(
        address,
        int(port),
        plan.trust.path,
        server_hostname=target.host if target else None,
        timeout=budget,
    )


def _offers_tls(target: Target, port: str | None, budget: float) -> bool | None:
    """Whether *target* answers the SSLRequest with 'S' (the answer byte only); None: unknown."""
    address = target.hostaddr or target.host
    if not address or not port or not port.isdigit() or budget < _MIN_PROBE_TIME:
        return None
    from . import _probe  # socket, only on a failure path

    return _probe.offers_tls(address, int(port), timeout=budget)


def _out_of_date(chain: Sequence[_probe.CertificateInfo]) -> str:
    """Which certificate of *chain* is expired or not yet valid, and since or until when."""
    now = dt.datetime.now(dt.timezone.utc)
    for i, cert in enumerate(chain):
        who = "the server's certificate" if i == 0 else f"the CA certificate {shown(cert.subject)}"
        if cert.not_after and cert.not_after < now:
            return f": {who} expired on {cert.not_after:%Y-%m-%d %H:%M} UTC"
        if cert.not_before and cert.not_before > now:
            return f": {who} is valid only from {cert.not_before:%Y-%m-%d %H:%M} UTC"
    return ""


def _without_names(text: str) -> str:
    """*text* with the certificate names libpq quoted blanked out (same length, same offsets).

    Those names are the server's text: they are never searched for libpq's phrases."""
    for m in _MISMATCH.finditer(text):
        start, end = m.span("name")
        text = text[:start] + "_" * (end - start) + text[end:]
    return text


def _failure_line(text: str, needles: Sequence[str]) -> str | None:
    """The first of libpq's lines that holds one of *needles*, whole (with a quoted certificate
    name, even one that holds line breaks)."""
    for m in re.finditer(r"[^\n]+", _without_names(text)):
        if any(n in m.group() for n in needles):
            return text[m.start() : m.end()]
    return None


def _untrusted_fix(host: str | None) -> str:
    profile = providers.profile_for_host(host) if host else None
    # In the words of the place the user sets options (Django's OPTIONS["sslrootcert"], ...).
    fix = FIX_UNTRUSTED.replace(
        "sslrootcert=/path/to/ca.pem", keyword_spelling("sslrootcert", "/path/to/ca.pem")
    )
    return f"{profile.untrusted_hint(host)}\n{fix}" if profile and host else fix


def _mismatch_fix(host: str | None) -> str:
    profile = providers.profile_for_host(host) if host else None
    hint = profile.mismatch_hint(host) if profile and host else None
    call = "connect(..., verify_as='the.name.in.the.certificate')"
    fix = FIX_MISMATCH.replace(
        call, keyword_spelling("verify_as", "the.name.in.the.certificate", default=call)
    )
    return f"{hint}\n{fix}" if hint else fix


def _number(port: str | None) -> int | None:
    return int(port) if port and port.isascii() and port.isdigit() else None


def _host_port(ex: Exception) -> tuple[str | None, str | None]:
    # psycopg keeps the failed connection (host and port); psycopg2 keeps only libpq's text.
    pg = getattr(ex, "pgconn", None)
    if pg is None:
        return None, None
    host = pg.host.decode("utf-8", "replace") if pg.host else None
    return host, (pg.port or b"").decode("utf-8", "replace") or None


def rejected_chain(ex: Exception) -> bool:
    """libpq could not verify the chain, or read the CA file: the only failures the fast path
    retries with the full trust set (never authentication, refusals or timeouts)."""
    return _failure_line(str(ex), (_VERIFY_FAILED, "root certificate")) is not None


# Failures of the TLS handshake itself, as a server or pooler without direct TLS gives them.
_HANDSHAKE = ("SSL error", "SSL SYSCALL", "server closed the connection unexpectedly", "ALPN",
              "direct SSL", "unexpected eof")  # fmt: skip


def handshake_failed(ex: psycopg.OperationalError) -> bool:
    """The TLS handshake failed for a reason other than the certificate (see _connect._retry)."""
    text = str(ex)
    if rejected_chain(ex) or _MISMATCH.search(text) or _NO_NAMES in text:
        return False
    return any(needle in text for needle in _HANDSHAKE)


def diagnose(
    ex: Exception,
    plan: Plan,
    *,
    probe: bool = True,
    budget: float = _DEFAULT_PROBE_TIMEOUT,
) -> SafePGError | None:
    """The safepg error for libpq's failure *ex* (psycopg's or psycopg2's OperationalError),
    or None when it is not a TLS problem.

    Args:
        probe: on a certificate failure, connect once more with Python's ``ssl`` to read the
            chain and tell an expired certificate from an untrusted one.
        budget: the longest that probe may take, in all (what is left of the connect's
            deadline); with too little, the error is built from libpq's message alone.
    """
    text = str(ex)
    line = _failure_line(
        text,
        (
            "server certificate for",
            _NO_NAMES,
            _VERIFY_FAILED,
            _NO_SSL,
            "root certificate",
            _ERROR_INSTEAD_OF_TLS,
            _INJECTED,
            _NOT_POSTGRES,
        ),
    )
    if line is None:
        return None
    # What libpq said, and the same with the certificate's quoted name blanked out: only the
    # latter is searched for libpq's phrases (the name is the server's text).
    said, line = line, _without_names(line)
    at = _AT.search(line)
    addr, port = (at["addr"], at["port"]) if at else (None, None)
    # Only the host and port of libpq's failed connection: the rest of it holds the password,
    # and nothing here may keep a reference to it (frame locals end up in error reports).
    pg_host, pg_port = _host_port(ex)
    port = port or pg_port
    trust = f"Trust anchors: {plan.trust.label} ({plan.trust.path})."
    libpq = f"libpq said: {shown(redact(said.strip(), plan.secrets))}"

    root = _ROOT_FILE.search(line)
    if root:
        return ConfigurationError(
            f"libpq could not use the CA file {root['path']!r}. {trust}\n{libpq}"
        )

    if _NOT_POSTGRES in line:
        host = pg_host or addr
        stranger = ProtocolViolationError(
            f"The server at {host}:{port} answered PostgreSQL's TLS request with something no "
            f"PostgreSQL server sends; safepg sent it nothing more. {POSTGRES_PORT_HINT}\n"
            f"{trust}\n{libpq}"
        )
        stranger.host, stranger.port, stranger.trust = host, _number(port), plan.trust
        return stranger

    if _ERROR_INSTEAD_OF_TLS in line or _INJECTED in line:
        host = pg_host or addr
        what = (
            "answered the TLS request with an error message instead of TLS"
            if _ERROR_INSTEAD_OF_TLS in line
            else "sent unencrypted bytes after agreeing to TLS (CVE-2021-23222)"
        )
        violation = _violation(str(host), str(port), what, trust, libpq)
        violation.host, violation.port, violation.trust = host, _number(port), plan.trust
        return violation

    mismatch = _MISMATCH.search(said)
    if mismatch or _NO_NAMES in line:
        host = mismatch["host"] if mismatch else pg_host
        if host not in {t.host for t in plan.targets}:
            # The certificate's name can hold a forged '" does not match host name "X"': the
            # host named is always one of those dialled, never the server's text.
            host = pg_host if pg_host in {t.host for t in plan.targets} else plan.targets[0].host
        target = _find_target(plan, host, addr)
        result = _run_probe(plan, target, addr, port, budget) if probe else None
        leaf = result.chain[0] if result and result.chain else None
        if mismatch:
            more = int(mismatch["more"] or 0)
            holds = f'"{shown(mismatch["name"])}"' + (f" and {more} other name(s)" if more else "")
        else:
            holds = "no host name at all (no subjectAltName and no common name)"
        listing = (
            f" The certificate lists (read by a second handshake, unverified): "
            f"{', '.join(map(shown, leaf.names))}."
            if leaf and leaf.names
            else ""
        )
        named = shown(str(host))  # one of the hosts dialled, never the certificate's text
        # The certificate's name may hold line breaks and forged words: libpq's message is shown
        # whole from its failure line on, line breaks escaped, so a forgery is visible as such.
        whole = text[max(text.find(said), 0) :].strip()
        mismatch_err = HostnameMismatchError(
            f"The server at {shown(str(addr or host))}:{port} presented a certificate that does "
            f'not name "{named}": it holds {holds}.{listing}\n{trust}\n{_mismatch_fix(named)}\n'
            f"libpq said: {shown(redact(whole, plan.secrets))}"
        )
        mismatch_err.certificate_names = (
            leaf.names if leaf else ((mismatch["name"],) if mismatch else ())
        )
        err: ConnectionSecurityError = mismatch_err
    elif _VERIFY_FAILED in line:
        host = pg_host or addr
        target = _find_target(plan, host, addr)
        result = _run_probe(plan, target, addr, port, budget) if probe else None
        leaf = result.chain[0] if result and result.chain else None
        presented = f"\nThe server presented (unverified): {leaf.describe()}." if leaf else ""
        if result and result.verify_code in _EXPIRY_CODES:
            expired = result.verify_message or "certificate has expired"
            err = CertificateExpiredError(
                f"The certificate of the server at {host}:{port} is outside its validity period "
                f"({expired}{_out_of_date(result.chain)}).{presented}\n{trust}\n{FIX_EXPIRED}\n"
                f"{libpq}"
            )
        else:
            reason = f" ({result.verify_message})" if result and result.verify_message else ""
            if result and result.chain and result.verify_code is None:
                reason = (
                    ". The chain does verify against these anchors without revocation checks, "
                    "so a certificate revocation list (sslcrl, sslcrldir or "
                    "~/.postgresql/root.crl) has probably revoked it"
                )
            issuer = (
                f' The issuer "{shown(leaf.issuer)}" is not among them (as presented, unverified).'
                if leaf and result and result.verify_code in _NO_TRUSTED_ISSUER_CODES
                else ""
            )
            err = UntrustedCertificateError(
                f"The certificate of the server at {host}:{port} does not chain to a trusted "
                f"root{reason}.{presented}\n{trust}{issuer}\n{_untrusted_fix(host)}\n{libpq}"
            )
    else:
        host = pg_host or addr
        err = SSLNotSupportedError(
            f"The server at {host}:{port} does not offer TLS, and safepg never connects without "
            f"it.\n{FIX_NO_TLS}\n{libpq}"
        )
    err.host = host
    err.port = _number(port)
    err.trust = plan.trust
    return err


def from_python_tls(
    ex: BaseException,
    plan: Plan,
    target: Target,
    *,
    probe: bool = True,
    budget: float = _DEFAULT_PROBE_TIMEOUT,
) -> ConnectionSecurityError | None:
    """The safepg error for a failure of a driver that does TLS with Python's ``ssl`` (asyncpg),
    or None when it is not a TLS problem. *target* is the host that failed.

    Certificate failures come as `ssl.SSLCertVerificationError`; a server that declines TLS, or
    answers the SSLRequest with anything but ``S``, as asyncpg's `ConnectionError`.
    """
    import ssl  # only on a failure path

    host, port = target.host, target.port
    trust = f"Trust anchors: {plan.trust.label} ({plan.trust.path})."
    err: ConnectionSecurityError
    if isinstance(ex, ssl.SSLCertVerificationError):
        result = _run_probe(plan, target, None, port, budget) if probe else None
        leaf = result.chain[0] if result and result.chain else None
        presented = f"\nThe server presented (unverified): {leaf.describe()}." if leaf else ""
        said = f"Python's ssl said: {shown(str(ex.verify_message or ex))}"
        if ex.verify_code in _MISMATCH_CODES:
            names = leaf.names if leaf else ()
            listing = f" It holds: {', '.join(map(shown, names))}." if names else ""
            mismatch = HostnameMismatchError(
                f"The server at {shown(host)}:{port} presented a certificate that does not name "
                f'"{shown(host)}".{listing}{presented}\n{trust}\n{_mismatch_fix(host)}\n{said}'
            )
            mismatch.certificate_names = names
            err = mismatch
        elif ex.verify_code in _EXPIRY_CODES:
            dates = _out_of_date(result.chain) if result else ""
            err = CertificateExpiredError(
                f"The certificate of the server at {host}:{port} is outside its validity period "
                f"({ex.verify_message}{dates}).{presented}\n{trust}\n{FIX_EXPIRED}\n{said}"
            )
        else:
            issuer = (
                f' The issuer "{shown(leaf.issuer)}" is not among them (as presented, unverified).'
                if leaf and ex.verify_code in _NO_TRUSTED_ISSUER_CODES
                else ""
            )
            err = UntrustedCertificateError(
                f"The certificate of the server at {host}:{port} does not chain to a trusted "
                f"root ({ex.verify_message}).{presented}\n{trust}{issuer}\n"
                f"{_untrusted_fix(host)}\n{said}"
            )
    elif isinstance(ex, ConnectionError) and _ERROR_INSTEAD_OF_TLS in str(ex):
        err = _violation(host, port, "answered the TLS request with an error message", trust)
    elif isinstance(ex, ConnectionError) and "rejected SSL upgrade" in str(ex):
        # asyncpg says this for an 'N' and for 'S' followed at once by plaintext: ask again,
        # reading the one answer byte only, to tell a server without TLS from an injection.
        # That needs no trust anchors: asked with the caller's own context too (without probe).
        if _offers_tls(target, port, budget) is False:
            err = SSLNotSupportedError(
                f"The server at {host}:{port} does not offer TLS, and safepg never connects "
                f"without it.\n{FIX_NO_TLS}"
            )
        else:
            err = _violation(
                host,
                port,
                "answered the TLS request with something other than TLS (perhaps "
                "plaintext injected after agreeing to it, CVE-2021-23222)",
                trust,
            )
    else:
        return None
    err.host, err.port, err.trust = host, _number(port), plan.trust
    return err


# X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: Python's ssl checks host
# names through OpenSSL.
_MISMATCH_CODES = (62, 64)


def _violation(
    host: str, port: str, what: str, trust: str, said: str | None = None
) -> ProtocolViolationError:
    return ProtocolViolationError(
        f"The server at {host}:{port} {what}. Nothing it sent was authenticated, so safepg "
        "shows none of it and sends nothing: anyone on the network path could have written "
        "it. A real PostgreSQL server with TLS does not do this; check for something "
        f"intercepting the connection, or ask the operator whether TLS is on.\n{trust}"
        + (f"\n{said}" if said else "")
    )
