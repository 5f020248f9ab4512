"""The post-connect check: is this session encrypted and verified, and how?"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq
from psycopg.rows import tuple_row

from ._errors import InsecureConnectionError
from ._libpq import ssl_attribute
from ._params import REQUIRED_SSLMODE, Plan, _is_socket
from ._text import shown
from ._trust import TrustSource

__all__ = ["SSLReport", "check", "check_async"]

ACCEPTED_PROTOCOLS = ("TLSv1.2", "TLSv1.3")
_DEFAULT_PORT = 5432
# The server's pid comes from the server: through a pooler, libpq's backend PID is the pooler's
# own (made-up) key, and in transaction pooling each query may run in another server process.
_STAT_SSL_QUERY = (
    "SELECT b.pid, s.ssl, s.version, s.cipher, s.bits, s.client_dn "
    "FROM (SELECT pg_catalog.pg_backend_pid() AS pid) b "
    "LEFT JOIN pg_catalog.pg_stat_ssl s ON s.pid OPERATOR(pg_catalog.=) b.pid"
)

# The plan each connection safepg made was built from, to report its trust anchors later.
_plans: weakref.WeakKeyDictionary[Any, Plan] = weakref.WeakKeyDictionary()


def remember(conn: Any, plan: Plan) -> None:
    _plans[conn] = plan


@dataclass(frozen=True)
class SSLReport:
    """How a session is protected, from the client's side (libpq) and the server's (pg_stat_ssl).

    Attributes:
        encrypted: libpq uses TLS on this connection.
        verified: encrypted, with sslmode=verify-full (the chain and the host name were checked).
        local_socket: the session runs over a Unix-domain socket (only with
            ``allow_unencrypted_unix_socket=True``): local, not encrypted.
        host, hostaddr, port: where libpq connected; *host* is the name that was verified,
            *port* a number (for a Unix-domain socket, the one in the socket file's name).
        sslmode: the sslmode libpq used.
        protocol, cipher, bits, ssl_library: libpq's view of the TLS session.
        trust: the trust anchors safepg chose, or None for a connection safepg did not make.
        backend_pid: the server process that answered the check's query. Through a pooler this
            is a process serving the pooler (libpq's own backend PID would be the pooler's
            made-up key).
        backend_ssl, backend_protocol, backend_cipher, backend_bits: ``pg_stat_ssl`` for that
            process. They differ from the client's view when a pooler or proxy terminates TLS.
        client_dn: the client certificate's subject, when one was used.
    """

    encrypted: bool
    verified: bool
    local_socket: bool
    host: str
    hostaddr: str | None
    port: int
    sslmode: str
    protocol: str | None
    cipher: str | None
    bits: int | None
    ssl_library: str | None
    trust: TrustSource | None
    backend_pid: int
    backend_ssl: bool | None = None
    backend_protocol: str | None = None
    backend_cipher: str | None = None
    backend_bits: int | None = None
    client_dn: str | None = None

    @property
    def summary(self) -> str:
        """One line for people: ``verified TLSv1.3 (TLS_AES_256_GCM_SHA384) to db:5432``."""
        where = f"{self.host}:{self.port}"
        if self.local_socket:
            return f"local socket, not encrypted ({self.host}, port {self.port})"
        if not self.encrypted:
            return f"NOT encrypted to {where}"
        state = "verified" if self.verified else "encrypted but NOT verified"
        trust = f", trusting {self.trust.label}" if self.trust else ""
        return f"{state} {self.protocol} ({self.cipher}) to {where}{trust}"

    def __str__(self) -> str:
        lines = [
            self.summary,
            f"  sslmode:       {self.sslmode}",
            f"  protocol:      {self.protocol or '-'}",
            f"  cipher:        {self.cipher or '-'} ({self.bits or '-'} bits)",
            f"  TLS library:   {self.ssl_library or '-'}",
            f"  trust anchors: {self.trust or '-'}",
            # The server's own text (pg_stat_ssl): shown escaped, like any text from the network.
            f"  server side:   pid {self.backend_pid}, pg_stat_ssl.ssl={self.backend_ssl}, "
            f"{shown(self.backend_protocol or '-')}, {shown(self.backend_cipher or '-')}",
        ]
        if self.client_dn:
            lines.append(f"  client cert:   {shown(self.client_dn)}")
        return "\n".join(lines)


def session_problem(pgconn: pq.abc.PGconn, allow_socket: bool) -> str | None:
    """Why the session is below policy, or None. Reads libpq state only: no round trip.

    The TLS version needs no check here: safepg sets ssl_min_protocol_version, and libpq
    refuses the handshake below it. `check` looks at the version again.
    """
    host = (pgconn.host or b"").decode("utf-8", "replace")
    return tls_problem(bool(pgconn.ssl_in_use), host, allow_socket)


def tls_problem(ssl_in_use: bool, host: str, allow_socket: bool) -> str | None:
    """`session_problem` from libpq's state as any driver reports it (psycopg2 too)."""
    if ssl_in_use:
        return None
    if allow_socket and _is_socket(host):
        return None
    return "the session is not encrypted (libpq reports no TLS in use)"


def _sslmode(pgconn: pq.abc.PGconn) -> str:
    for opt in pgconn.info:
        if opt.keyword == b"sslmode":
            return opt.val.decode() if opt.val else ""
    return ""


def _port(pgconn: pq.abc.PGconn) -> int:
    # libpq reports the port as text; an empty one means its built-in default (psycopg's
    # ConnectionInfo.port reads it the same way).
    text = (pgconn.port or b"").decode()
    if text.isdigit():
        return int(text)
    getter = getattr(pq.misc, "get_compiled_port", None)  # psycopg 3.2+
    compiled = str(getter() or "") if getter is not None else ""
    return int(compiled) if compiled.isdigit() else _DEFAULT_PORT


def _client_report(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> SSLReport:
    pgconn = conn.pgconn
    plan = _plans.get(conn)
    host = (pgconn.host or b"").decode("utf-8", "replace")
    encrypted = bool(pgconn.ssl_in_use)
    sslmode = _sslmode(pgconn)
    bits = ssl_attribute(pgconn, "key_bits")
    return SSLReport(
        encrypted=encrypted,
        verified=encrypted and sslmode == REQUIRED_SSLMODE,
        local_socket=not encrypted and _is_socket(host),
        host=host,
        hostaddr=(pgconn.hostaddr or b"").decode() or None,
        port=_port(pgconn),
        sslmode=sslmode,
        protocol=ssl_attribute(pgconn, "protocol"),
        cipher=ssl_attribute(pgconn, "cipher"),
        bits=int(bits) if bits and bits.isdigit() else None,
        ssl_library=ssl_attribute(pgconn, "library"),
        trust=plan.trust if plan else None,
        backend_pid=pgconn.backend_pid,
    )


def _finish(report: SSLReport, row: tuple[Any, ...] | None, allow_socket: bool) -> SSLReport:
    if row is not None:
        pid, ssl_on, version, cipher, bits, client_dn = row
        report = dataclasses.replace(
            report,
            backend_pid=pid,
            backend_ssl=ssl_on,
            backend_protocol=version,
            backend_cipher=cipher,
            backend_bits=bits,
            client_dn=client_dn,
        )
    if report.local_socket and allow_socket:
        return report
    if not report.verified:
        raise InsecureConnectionError(
            f"This session is below safepg's policy: {report.summary} (sslmode={report.sslmode}). "
            "Open connections with safepg.connect(), which always verifies the server."
        )
    # Unknown only when libpq's attributes cannot be read and the server side has no TLS (a
    # pooler in between); libpq has enforced ssl_min_protocol_version in the handshake anyway.
    protocol = report.protocol or report.backend_protocol
    if protocol is not None and protocol not in ACCEPTED_PROTOCOLS:
        raise InsecureConnectionError(
            f"This session uses {shown(protocol)}, below the TLS 1.2 minimum."
        )
    return report


def check(conn: psycopg.Connection[Any]) -> SSLReport:
    """Report how *conn* is protected, and fail if it is below policy.

    Reads libpq's TLS state and, with one query, the server's ``pg_stat_ssl`` row for this
    session (visible to any role, superuser or not). The transaction state is left as it was.

    Raises:
        InsecureConnectionError: the session is not encrypted with verify-full and TLS >= 1.2.
            A Unix-socket session is accepted only if safepg opened it with
            ``allow_unencrypted_unix_socket=True``.
    """
    report = _client_report(conn)
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(_STAT_SSL_QUERY).fetchone()
    plan = _plans.get(conn)
    return _finish(report, tuple(row) if row else None, bool(plan and plan.allow_unix_socket))


async def check_async(conn: psycopg.AsyncConnection[Any]) -> SSLReport:
    """`check` for an async connection."""
    report = _client_report(conn)
    async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(_STAT_SSL_QUERY)
        row = await cur.fetchone()
    plan = _plans.get(conn)
    return _finish(report, tuple(row) if row else None, bool(plan and plan.allow_unix_socket))


# Public: shown as safepg.X (tracebacks, reprs, SQLAlchemy's messages), where it is documented,
# however this module was imported. Pickle finds it there.
SSLReport.__module__ = "safepg"
