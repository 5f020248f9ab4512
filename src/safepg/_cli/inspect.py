"""``safepg inspect HOST[:PORT]``: a server's TLS without logging in."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

from ._output import (
    EXIT_CONNECT,
    EXIT_EXPIRING,
    EXIT_INSECURE,
    EXIT_OK,
    Output,
    add_json,
    add_timeout,
    add_verbose,
    cert_json,
    print_chain,
    trust_json,
)

if TYPE_CHECKING:
    from .._inspect import Inspection
    from .._trust import TrustSource
    from ._output import Subparsers

SCHEMA = "safepg.inspect/1"


def host_port(value: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (``[::1]:5432`` for an IPv6 address) as a host and a port number."""
    host, port = value, "5432"
    if value.startswith("["):  # [::1]:5432
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") or port
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        # The value is not shown: a mistyped URL puts a password here (app:secret@db).
        raise argparse.ArgumentTypeError("expected HOST[:PORT] (the value is not shown)")
    return host, int(port)


def register(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "inspect", help="show a server's certificates and who verifies them (no login needed)"
    )
    parser.add_argument(
        "server", metavar="HOST[:PORT]", type=host_port, help="the server (port 5432 if not given)"
    )
    parser.add_argument("--hostaddr", help="dial this address, check the certificate for HOST")
    parser.add_argument("--sslrootcert", help="judge the chain against this CA file")
    parser.add_argument(
        "--direct", action="store_true", help="direct TLS (PostgreSQL 17+) instead of SSLRequest"
    )
    add_json(parser)
    add_timeout(parser)
    add_verbose(parser)
    parser.set_defaults(run=run)


def _check_address(value: str) -> None:
    """Refuse a ``--hostaddr`` that is not an IP address (libpq's hostaddr is numeric), without
    showing it."""
    from .._errors import ConfigurationError
    from .._probe import _is_ip

    if not _is_ip(value):
        raise ConfigurationError(
            "--hostaddr takes an IP address (such as 192.0.2.10 or 2001:db8::1); the value "
            "given is not one, and is not shown, as it may hold part of a password."
        )


def _trust(host: str, port: int, args: argparse.Namespace) -> TrustSource:
    """The trust anchors to judge by, in the command line's words: a file given with
    ``--sslrootcert`` is named as that option, not as a keyword argument."""
    import safepg

    from .._trust import check_ca_file

    extra: dict[str, Any] = {"hostaddr": args.hostaddr} if args.hostaddr else {}
    if args.sslrootcert:
        if args.sslrootcert != "system":
            check_ca_file(args.sslrootcert, "--sslrootcert")  # its errors name the option
        extra["sslrootcert"] = args.sslrootcert
    trust = safepg.resolve_trust(host=host, port=port, **extra)
    if trust.origin == "sslrootcert":
        trust = dataclasses.replace(trust, label="the --sslrootcert file")
    return trust


def run(args: argparse.Namespace, out: Output) -> int:
    import safepg

    from .._inspect import inspect_server
    from .._params import is_host_name

    host, port = args.server
    # Host and address are shown once checked: a mistyped URL may put a password in them.
    doc = out.start(
        SCHEMA,
        host=None,
        port=port,
        address=None,
        negotiation="direct" if args.direct else "sslrequest",
        reachable=False,
        connection=None,
        tls=False,
        certificates=[],
        trust=None,
        verified_by=None,
        hostname={"host": None, "matches": None, "names": []},
        rds_ca=None,
        problems=[],
        warnings=[],
        advice=[],
    )
    if is_host_name(host):
        doc.update(host=host, address=host)
        doc["hostname"]["host"] = host
    try:
        if args.hostaddr is not None:
            _check_address(args.hostaddr)
            doc["address"] = args.hostaddr
        trust = _trust(host, port, args)
    except safepg.ConfigurationError as ex:
        return out.fail(ex)
    found = inspect_server(
        host, port, trust=trust, hostaddr=args.hostaddr, timeout=args.timeout, direct=args.direct
    )
    if not found.connected:
        code = EXIT_CONNECT
    elif not found.ok:
        code = EXIT_INSECURE
    elif found.warnings:
        code = EXIT_EXPIRING
    else:
        code = EXIT_OK
    leaf = found.chain[0] if found.chain else None
    doc.update(
        address=found.address,
        reachable=found.reachable,
        connection=found.connection,
        tls=found.tls,
        certificates=[cert_json(c) for c in found.chain],
        trust={
            **(trust_json(found.trust) or {}),
            "verifies": found.trust_verifies,
            "error": found.verify_error,
        },
        verified_by=trust_json(found.verified_by),
        hostname={
            "host": host,
            "matches": found.hostname_matches,
            "names": list(leaf.names) if leaf else [],
        },
        rds_ca=found.rds_ca,
        problems=list(found.problems),
        warnings=list(found.warnings),
        advice=list(found.advice),
    )
    if not out.json:
        _print(out, found, code)
    return out.finish(code, ok=found.ok)


# The result line when no PostgreSQL answered, by Inspection.connection.
_NOT_CONNECTED = {
    "refused": "connection refused",
    "silent": "no answer after connecting",
    "closed": "closed without an answer",
    "not-postgresql": "not a PostgreSQL server?",
}


def _print(out: Output, found: Inspection, code: int) -> None:
    host, port = found.host, found.port
    how = "direct TLS" if found.direct else "SSLRequest"
    out.line(f"{out.bold('safepg inspect')} {host}:{port} (no login; {how})")
    if found.address != host:
        out.field("address", found.address)
    if found.connected and found.direct and not found.tls:
        out.field("direct TLS", out.bad("not accepted"))
    elif found.connected:
        out.field("TLS", out.good("offered") if found.tls else out.bad("not offered"))
    if found.chain:
        out.line("  certificates as presented (unverified; the trust anchors judge them below):")
        print_chain(out, found.chain)
    if found.tls and found.trust is not None:
        verdict = (
            out.good("verifies the chain")
            if found.trust_verifies
            else out.bad(f"does NOT verify the chain ({found.verify_error})")
        )
        out.field("trust anchors", f"{found.trust.label}: {verdict}")
        out.field("trust file", found.trust.path)
        if not found.trust_verifies:
            other = found.verified_by
            out.field(
                "verified by",
                f"{other.label} ({other.path})" if other else "none of safepg's trust sources",
            )
    if found.hostname_matches is not None:
        out.field(
            "host name",
            out.good(f'"{host}" is named by the certificate')
            if found.hostname_matches
            else out.bad(f'"{host}" is NOT named by the certificate'),
        )
    if found.rds_ca:
        out.field("RDS CA", found.rds_ca)
    for problem in found.problems:
        out.line(f"  {out.bad('problem:')} {problem}")
    for warning in found.warnings:
        out.line(f"  {out.warn('warning:')} {warning}")
    for advice in found.advice:
        out.line(f"  {advice}")
    result = {
        EXIT_OK: out.good("OK"),
        EXIT_EXPIRING: out.warn("OK, but renew soon"),
        EXIT_INSECURE: out.bad("would be refused"),
        EXIT_CONNECT: out.bad(_NOT_CONNECTED.get(found.connection, "unreachable")),
    }[code]
    out.field("result", result)
