"""``safepg check URL|CONNINFO``: connect through safepg and report how the session is protected."""

from __future__ import annotations

import argparse
import getpass
import math
import os
import select
import sys
import time
from typing import TYPE_CHECKING, Any

import psycopg

from .._errors import ConfigurationError
from .._text import shown
from ._output import (
    EXIT_INSECURE,
    EXIT_OK,
    Output,
    add_json,
    add_timeout,
    add_verbose,
    cert_json,
    iso,
    port_number,
    print_chain,
    secrets_of,
    trust_json,
)

if TYPE_CHECKING:
    from .._check import SSLReport
    from .._probe import CertificateInfo
    from ._output import Subparsers

SCHEMA = "safepg.check/1"
# Every function and operator by its schema: a role whose search_path puts its own schema
# before pg_catalog must not choose what this query calls.
_ACTIVITY_QUERY = (
    "SELECT a.usename, a.datname, a.application_name, pg_catalog.host(a.client_addr), "
    "a.backend_start, s.ssl, s.version, s.cipher, s.bits, s.client_dn "
    "FROM pg_catalog.pg_stat_activity a JOIN pg_catalog.pg_stat_ssl s "
    "ON a.pid OPERATOR(pg_catalog.=) s.pid "
    "WHERE a.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()"
)
_ACTIVITY_KEYS = (
    "user",
    "database",
    "application_name",
    "client_addr",
    "backend_start",
    "ssl",
    "protocol",
    "cipher",
    "bits",
    "client_dn",
)
SOCKET_OPTION = "--allow-unencrypted-unix-socket"


def register(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "check", help="connect through safepg and report how the session is protected"
    )
    parser.add_argument("target", metavar="URL|CONNINFO", help="postgresql:// URL or conninfo")
    parser.add_argument(
        SOCKET_OPTION,
        dest="allow_socket",
        action="store_true",
        help="accept a Unix-domain socket host (local, never encrypted); reported as such",
    )
    parser.add_argument(
        "-W",
        "--password",
        dest="prompt",
        action="store_true",
        help="prompt for the password, as psql -W does (else libpq's PGPASSWORD, passfile, "
        "~/.pgpass; keep it out of the URL and your shell history)",
    )
    add_json(parser)
    add_timeout(parser)
    add_verbose(parser)
    parser.set_defaults(run=run)


def _client(report: SSLReport | None) -> dict[str, Any]:
    if report is None:  # no session: nothing was encrypted or verified
        return {
            "encrypted": False,
            "verified": False,
            "local_socket": False,
            "sslmode": None,
            "protocol": None,
            "cipher": None,
            "bits": None,
            "ssl_library": None,
        }
    return {
        "encrypted": report.encrypted,
        "verified": report.verified,
        "local_socket": report.local_socket,
        "sslmode": report.sslmode,
        "protocol": report.protocol,
        "cipher": report.cipher,
        "bits": report.bits,
        "ssl_library": report.ssl_library,
    }


def _server(pid: int | None, row: tuple[Any, ...] | None) -> dict[str, Any]:
    activity = dict(zip(_ACTIVITY_KEYS, row or (None,) * len(_ACTIVITY_KEYS), strict=True))
    activity["backend_start"] = iso(activity["backend_start"])
    return {"pid": pid, **activity}


def _known(doc: dict[str, Any], args: argparse.Namespace, ex: BaseException) -> None:
    """Fill *doc* with what is known of a connection that failed: where it went and which
    trust anchors it used, from the error and from safepg's plan for the target."""
    from .._errors import ConnectionSecurityError, SafePGError
    from .._params import build_plan

    try:
        plan = build_plan(args.target, {}, allow_unencrypted_unix_socket=args.allow_socket)
    except (SafePGError, psycopg.Error):
        plan = None  # the input itself was refused: nothing is known
    if plan is not None:
        hosts = list(dict.fromkeys(t.host for t in plan.targets))
        addrs = list(dict.fromkeys(t.hostaddr for t in plan.targets if t.hostaddr))
        ports = list(dict.fromkeys(t.port for t in plan.targets))
        doc["host"] = ",".join(hosts) or None
        doc["hostaddr"] = ",".join(addrs) or None
        doc["port"] = port_number(ports[0]) if len(ports) == 1 else None
        doc["trust"] = trust_json(plan.trust)
    # The failed attempt itself, when safepg's error names it.
    if isinstance(ex, ConnectionSecurityError):
        if ex.host:
            doc["host"] = ex.host
        if ex.port is not None:
            doc["port"] = ex.port
        if ex.trust is not None:
            doc["trust"] = trust_json(ex.trust)


# libpq's words when the server asks for a password and none was given.
_NO_PASSWORD = "no password supplied"  # noqa: S105 - libpq's message, not a password
HOW_TO_GIVE_IT = (
    "To give a password: -W/--password prompts for it; libpq also reads the PGPASSWORD "
    "environment variable, a password file named by passfile= in the conninfo or by "
    "PGPASSFILE, and ~/.pgpass (lines host:port:dbname:user:password, mode 0600). Keep it out "
    "of the URL: a command line ends up in shell history and in the process list."
)


def _cli_wording(message: str) -> str:
    """The library's advice in command-line terms."""
    from .._params import SOCKET_OPT_IN

    message = message.replace(SOCKET_OPT_IN, f"run again with {SOCKET_OPTION}")
    if _NO_PASSWORD in message:
        message = f"{message.rstrip()}\n{HOW_TO_GIVE_IT}"
    return message


_NO_INPUT = (
    "-W/--password found no terminal to ask on and {what}; give the password through "
    "PGPASSWORD, a passfile or ~/.pgpass instead, or pipe it to standard input"
)


def _has_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _ask_password(timeout: float) -> str:
    """The password for -W: asked on the terminal as psql asks; without one (CI, cron), the
    first line of standard input, waited for *timeout* seconds at most (a CI job's open but
    silent standard input must not hang the check), never echoed or quoted in an error.

    Raises:
        ConfigurationError: no terminal and no standard input, or nothing on it in time.
    """
    if os.name == "nt" or _has_terminal():
        return getpass.getpass("Password: ")
    stdin = sys.stdin
    try:
        fd = stdin.fileno() if stdin is not None else -1
    except (OSError, ValueError):
        fd = -1
    if fd < 0:
        raise ConfigurationError(_NO_INPUT.format(what="no standard input"))
    line = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in line:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            del line  # a part of the password: not in the refusal's frames
            raise ConfigurationError(
                _NO_INPUT.format(what=f"no line came on standard input within {timeout:g} s")
            )
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        line += chunk
    if not line:
        raise ConfigurationError(_NO_INPUT.format(what="standard input is empty"))
    text = _decoded(line.partition(b"\n")[0].rstrip(b"\r"))
    del line, chunk
    if text is None:
        raise ConfigurationError("the password from standard input is not valid UTF-8 text")
    return text


def _decoded(raw: bytes) -> str | None:
    # Not raised from the except clause: the UnicodeDecodeError holds the password's bytes.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def run(args: argparse.Namespace, out: Output) -> int:
    import safepg

    from .. import _probe
    from .._redact import redact

    doc = out.start(
        SCHEMA,
        host=None,
        hostaddr=None,
        port=None,
        client=_client(None),
        trust=None,
        certificates=[],
        server=_server(None, None),
    )
    connect_timeout = str(max(2, math.ceil(args.timeout)))
    report = None
    # As psql -W: asked for before connecting; libpq's own sources (PGPASSWORD, passfile,
    # ~/.pgpass) are left to libpq otherwise.
    password = _ask_password(args.timeout) if args.prompt else None
    secrets = (*secrets_of(args.target), password)
    try:
        with safepg.connect(
            args.target,
            autocommit=True,
            connect_timeout=connect_timeout,
            allow_unencrypted_unix_socket=args.allow_socket,
            password=password,
        ) as conn:
            report = safepg.check(conn)
            doc.update(
                host=report.host,
                hostaddr=report.hostaddr,
                port=report.port,
                client=_client(report),
                trust=trust_json(report.trust),
                server=_server(report.backend_pid, None),
            )
            row = conn.execute(_ACTIVITY_QUERY).fetchone()
            doc["server"] = _server(report.backend_pid, tuple(row) if row else None)
    except psycopg.Error as ex:
        if report is None:
            _known(doc, args, ex)
        return out.fail(ex, _cli_wording(redact(str(ex), secrets)))
    presented = None
    if report.encrypted and report.trust is not None:
        presented = _probe.probe(
            report.hostaddr or report.host,
            report.port,
            report.trust.path,
            server_hostname=report.host,
            timeout=args.timeout,
        )
    chain = presented.chain if presented else ()
    doc["certificates"] = [cert_json(c) for c in chain]
    # A socket session is what the caller asked for with the option; anything else that is
    # not verified could not have been opened (safepg.check would have raised).
    good = report.verified or (report.local_socket and args.allow_socket)
    code = EXIT_OK if good else EXIT_INSECURE
    if not out.json:
        _print(out, report, chain, doc["server"], good)
    return out.finish(code)


def _print(
    out: Output,
    report: SSLReport,
    chain: tuple[CertificateInfo, ...],
    server: dict[str, Any],
    good: bool,
) -> None:
    summary = out.good(report.summary) if good else out.bad(report.summary)
    out.line(f"{out.bold('safepg check')}: {summary}")
    out.field(
        "host",
        f"{report.host}:{report.port}"
        + (f" (address {report.hostaddr})" if report.hostaddr else ""),
    )
    out.field("sslmode", report.sslmode)
    if report.encrypted:
        out.field("protocol", report.protocol or "-")
        out.field("cipher", f"{report.cipher or '-'} ({report.bits or '-'} bits)")
        out.field("TLS library", report.ssl_library or "-")
    if report.trust is not None:
        out.field("trust anchors", report.trust.label)
        out.field("trust file", report.trust.path)
    if chain:
        out.line("  certificates (read by a second handshake, as presented: unverified):")
        print_chain(out, chain)
    # The server's own text (verified server, but its values can hold anything): escaped.
    out.line("  server side (pg_stat_ssl joined with pg_stat_activity, this session):")
    out.field("pid", server["pid"], 6)
    for key in ("user", "database", "application_name", "client_addr", "backend_start"):
        if server.get(key):  # an empty application_name says nothing
            out.field(key.replace("_", " "), shown(str(server[key])), 6)
    if server.get("ssl"):
        ssl_text = f"{server.get('protocol') or ''} {server.get('cipher') or ''}".strip()
        bits = f" ({server['bits']} bits)" if server.get("bits") else ""
        out.field("ssl", f"yes, {shown(ssl_text)}{bits}", 6)
    else:
        out.field("ssl", "no", 6)
    if server.get("client_dn"):
        out.field("client cert", shown(str(server["client_dn"])), 6)
