"""Inspecting a server's TLS without logging in: the chain, who verifies it, names, expiry.

Everything here is read from an unauthenticated handshake and is advice for people; libpq's
verification alone decides whether safepg connects.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from . import _probe, _trust, providers
from ._diagnose import FIX_EXPIRED, FIX_MISMATCH, FIX_NO_TLS, FIX_UNTRUSTED, POSTGRES_PORT_HINT
from ._errors import ConfigurationError
from ._probe import CertificateInfo
from ._text import shown
from ._trust import TrustSource

EXPIRY_WARNING_DAYS = 30
_EXPIRY_CODES = (9, 10)

# Amazon RDS CA generations, by the words in their certificates' names.
_RDS_GENERATIONS = (
    (re.compile(r"RSA2048 G1", re.IGNORECASE), "rds-ca-rsa2048-g1"),
    (re.compile(r"RSA4096 G1", re.IGNORECASE), "rds-ca-rsa4096-g1"),
    (re.compile(r"ECC384 G1", re.IGNORECASE), "rds-ca-ecc384-g1"),
    (re.compile(r"Amazon RDS Root 2019 CA", re.IGNORECASE), "rds-ca-2019"),
)


@dataclass(frozen=True)
class Inspection:
    """What ``safepg inspect`` found. See the README for the JSON form.

    *chain* holds the certificates' text as presented (raw); the sentences in *problems* and
    *warnings* show it escaped (`_text.shown`), ready to print.
    """

    host: str
    port: int
    address: str
    direct: bool
    reachable: bool
    tls: bool
    chain: tuple[CertificateInfo, ...] = ()
    trust: TrustSource | None = None
    trust_verifies: bool = False
    verify_error: str | None = None
    verified_by: TrustSource | None = None
    hostname_matches: bool | None = None
    rds_ca: str | None = None
    problems: tuple[str, ...] = ()  # reasons libpq would refuse the server
    warnings: tuple[str, ...] = ()  # a certificate expires within EXPIRY_WARNING_DAYS
    advice: tuple[str, ...] = field(default=())
    # How far the conversation got: "ok" (PostgreSQL answered the TLS request), or why not:
    # "unresolved", "refused", "timeout" (no TCP connection in time), "silent" (connected, then
    # no answer), "closed" (connected, then closed unanswered), "not-postgresql" (something
    # else answered), "handshake" (the TLS handshake failed), "error" (another network error).
    connection: str = "ok"

    @property
    def connected(self) -> bool:
        """Whether a PostgreSQL server answered: False for every reason that is not a TLS
        finding (the exit code "could not connect")."""
        return self.reachable and self.connection in ("ok", "handshake")

    @property
    def ok(self) -> bool:
        return self.tls and self.trust_verifies and bool(self.hostname_matches)


def days_left(cert: CertificateInfo, now: dt.datetime | None = None) -> int | None:
    if cert.not_after is None:
        return None
    return (cert.not_after - (now or dt.datetime.now(dt.timezone.utc))).days


def _wildcard_match(pattern: str, host: str) -> bool:
    # libpq: a wildcard is allowed only as the whole leftmost label, and matches one label.
    if not pattern.startswith("*."):
        return pattern == host
    first, _, rest = host.partition(".")
    return bool(first) and rest == pattern[2:]


def hostname_matches(host: str, cert: CertificateInfo) -> bool:
    """Whether *cert* names *host*, as libpq decides it.

    Names are compared case-insensitively and literally (a trailing dot is not stripped). The
    common name counts only when the certificate has no subjectAltName of the host's kind.
    """
    host = host.lower()
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        ip = None
    if ip is not None:
        if cert.ip_addresses:
            return ip in cert.ip_addresses
    elif cert.dns_names:
        return any(_wildcard_match(n.lower(), host) for n in cert.dns_names)
    cn = (cert.common_name or "").lower()
    return bool(cn) and (cn == host if ip else _wildcard_match(cn, host))


def rds_generation(chain: Sequence[CertificateInfo]) -> str | None:
    for cert in chain:
        for text in (cert.subject, cert.issuer):
            for pattern, name in _RDS_GENERATIONS:
                if pattern.search(text):
                    return name
    return None


def _candidates(first: TrustSource) -> list[TrustSource]:
    """Other trust sources to try when the chosen one does not verify the chain."""
    found: list[TrustSource] = []
    for bundle in providers.BUNDLES:
        for path, _override in providers.bundle_paths(bundle):
            found.append(TrustSource(path, bundle.label, "bundled"))
    try:
        store = _trust.os_store()
    except ConfigurationError:
        store = None
    if store is not None:
        found.append(store)
    found.append(_trust.certifi_source())
    return [s for s in found if s.path != first.path]


def _not_answered(address: str, port: int, timeout: float, why: _probe.Unreached) -> Inspection:
    """The fields of an inspection that read no certificate, saying why in people's words."""
    where = f"{shown(address)}:{port}"
    detail = shown(why.detail)
    reachable, sentence = {
        "unresolved": (False, f'cannot reach {where}: the host name "{shown(address)}" does '
                       f"not resolve ({detail})"),
        "refused": (False, f"cannot reach {where}: connection refused (nothing listens on that "
                    "port, or a firewall rejects the connection)"),
        "timeout": (False, f"cannot reach {where}: the TCP connection was not answered within "
                    f"{timeout:g} seconds (a firewall may drop the packets, or the host is down)"),
        "silent": (True, f"{where} accepted the TCP connection, then gave no answer to "
                   f"PostgreSQL's TLS request within {timeout:g} seconds. {POSTGRES_PORT_HINT}"),
        "handshake": (True, f"{where} accepts connections, but the TLS handshake failed "
                      f"({detail})"),
        "error": (False, f"cannot reach {where}: {detail}"),
    }[why.reason]  # fmt: skip
    return Inspection(
        "", port, address, False, reachable=reachable, tls=False, problems=(sentence,),
        connection=why.reason,
    )  # fmt: skip


def _no_tls(address: str, port: int, answer: bytes) -> tuple[str, str, tuple[str, ...]]:
    """(connection, problem, advice) for a server that did not agree to TLS."""
    where = f"{shown(address)}:{port}"
    if answer == b"N":
        return "ok", "the server does not offer TLS", (FIX_NO_TLS,)
    if answer == b"E":
        return (
            "ok",
            "the server answered the TLS request with an error message instead of TLS (not "
            "shown: nobody authenticated it)",
            (),
        )
    if answer == b"":
        return (
            "closed",
            f"{where} accepted the connection, then closed it without answering PostgreSQL's "
            f"TLS request. {POSTGRES_PORT_HINT}",
            (),
        )
    return (
        "not-postgresql",
        f"{where} answered PostgreSQL's TLS request with {shown(repr(answer))[1:]} (unverified), "
        f"which no PostgreSQL server sends. {POSTGRES_PORT_HINT}",
        (),
    )


def _without_direct(
    base: Inspection, trust: TrustSource, timeout: float, started: float
) -> Inspection:
    """Direct TLS failed: is it the server, or the network? The SSLRequest tells."""
    address, port = base.address, base.port
    result = _probe.probe_detailed(
        address, port, trust.path, server_hostname=base.host, timeout=_left(started, timeout, 0.5)
    )
    if isinstance(result, _probe.Unreached):
        return _unanswered(base, timeout, result)
    if result.tls:
        return replace(
            base,
            reachable=True,
            problems=(
                "the server does not accept direct TLS, which needs PostgreSQL 17 or later (and "
                "any pooler or proxy in front of it to pass it on); the SSLRequest works, so it "
                "offers TLS that way",
            ),
            advice=(
                "Leave sslnegotiation at its default (postgres), and run safepg inspect without "
                "--direct to check its certificates.",
            ),
        )
    if result.answer != b"N":
        return _refused_tls(base, result.answer)
    return replace(
        base,
        reachable=True,
        problems=("the server does not offer TLS, directly or after the SSLRequest",),
        advice=(FIX_NO_TLS,),
    )


def _left(started: float, timeout: float, floor: float = 0.0) -> float:
    """What is left of *timeout* since *started*, and at least *floor*."""
    return max(timeout - (time.monotonic() - started), floor)


def _unanswered(base: Inspection, timeout: float, why: _probe.Unreached) -> Inspection:
    found = _not_answered(base.address, base.port, timeout, why)
    return replace(
        base, reachable=found.reachable, problems=found.problems, connection=found.connection
    )


def _refused_tls(base: Inspection, answer: bytes) -> Inspection:
    connection, problem, advice = _no_tls(base.address, base.port, answer)
    return replace(
        base, reachable=True, tls=False, problems=(problem,), advice=advice, connection=connection
    )


def inspect_server(
    host: str,
    port: int,
    *,
    trust: TrustSource,
    hostaddr: str | None = None,
    timeout: float = 10.0,
    direct: bool = False,
) -> Inspection:
    """Probe *host*:*port* (no login) and judge what it presents against *trust*.

    With *direct*, the server must take TLS straight away (PostgreSQL 17+); if it does not,
    the SSLRequest tells whether it offers TLS at all. A server that cannot be reached says
    why: the name does not resolve, the connection is refused, or nothing answered in time.
    """
    started = time.monotonic()
    address = hostaddr or host
    base = Inspection(host, port, address, direct, reachable=False, tls=False, trust=trust)
    if direct:
        presented = _probe.presented_chain(
            address, port, server_hostname=host, timeout=timeout, direct=True
        )
        if presented is not None and presented.timed_out:
            return replace(
                base,
                problems=(f"{shown(address)}:{port} did not answer within {timeout:g} seconds",),
            )
        if presented is None or not presented.tls:
            return _without_direct(base, trust, timeout, started)
    # One deadline for every probe: a server that stalls the later ones cannot hold inspect
    # for the timeout once per probe (direct, SSLRequest, each other trust source).
    result = _probe.probe_detailed(
        address, port, trust.path, server_hostname=host, timeout=_left(started, timeout, 0.5)
    )
    if isinstance(result, _probe.Unreached):
        return _unanswered(base, timeout, result)
    if not result.tls:
        return _refused_tls(base, result.answer)
    chain = result.chain
    verifies = result.verify_code is None
    verified_by = trust if verifies else None
    if not verifies and result.verify_code not in _EXPIRY_CODES:
        for other in _candidates(trust):
            remaining = _left(started, timeout)
            if remaining <= 0:
                break
            again = _probe.probe(address, port, other.path, server_hostname=host, timeout=remaining)
            if again is not None and again.tls and again.verify_code is None:
                verified_by = other
                break
    leaf = chain[0] if chain else None
    matches = hostname_matches(host, leaf) if leaf else None
    problems: list[str] = []
    advice: list[str] = []
    if not verifies:
        problems.append(f"the chain does not verify against {trust.label}: {result.verify_message}")
        if result.verify_code in _EXPIRY_CODES:
            advice.append(FIX_EXPIRED)
        else:
            if leaf is not None:
                problems.append(
                    f'the issuer "{shown(leaf.issuer)}" (as presented, unverified) is not among '
                    "the trust anchors"
                )
            if verified_by is not None:
                advice.append(
                    f"It verifies against {verified_by.label} ({verified_by.path}): pass that "
                    "file as sslrootcert."
                )
            advice.append(FIX_UNTRUSTED)
    if matches is False and leaf is not None:
        names = ", ".join(map(shown, leaf.names)) or (
            f"CN={shown(leaf.common_name)}" if leaf.common_name else "none"
        )
        unverified = "" if verifies else " (as presented, unverified)"
        problems.append(f'the certificate does not name "{host}"; it names{unverified}: {names}')
        advice.append(FIX_MISMATCH)
    warnings: list[str] = []
    for i, cert in enumerate(chain):
        left = days_left(cert)
        if left is not None and left < EXPIRY_WARNING_DAYS:
            who = "the server's certificate" if i == 0 else f"CA certificate {shown(cert.subject)}"
            if left < 0:
                problems.append(f"{who} expired on {cert.not_after:%Y-%m-%d}")
            else:
                warnings.append(f"{who} expires in {left} days ({cert.not_after:%Y-%m-%d})")
    # For RDS hosts, and for anything whose chain names an RDS CA (an alias of one).
    rds = rds_generation(chain)
    return replace(
        base,
        reachable=True,
        tls=True,
        chain=chain,
        trust_verifies=verifies,
        verify_error=result.verify_message,
        verified_by=verified_by,
        hostname_matches=matches,
        rds_ca=rds,
        problems=tuple(problems),
        warnings=tuple(warnings),
        advice=tuple(dict.fromkeys(advice)),
    )
