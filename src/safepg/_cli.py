"""The ``safepg`` command line: check, inspect, ca, env and demo.

Exit codes (stable, for scripts and monitoring):

- 0: verified (``check``), or everything checked out (``inspect``);
- 1: could not connect for a reason other than security: unreachable, refused, timed out,
  authentication failed;
- 2: usage or configuration error (bad arguments, a bad CA file, a socket host);
- 3: the server could not be verified: host name mismatch, untrusted or expired certificate,
  no TLS;
- 4: ``inspect`` only: all is well, but a certificate expires within 30 days.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import psycopg

from . import __version__
from ._text import shown, shown_lines

EXIT_OK, EXIT_CONNECT, EXIT_USAGE, EXIT_INSECURE, EXIT_EXPIRING = 0, 1, 2, 3, 4
DEFAULT_TIMEOUT = 10.0
_ACTIVITY_QUERY = (
    "SELECT a.usename, a.datname, a.application_name, host(a.client_addr), a.backend_start, "
    "s.ssl, s.version, s.cipher, s.bits, s.client_dn "
    "FROM pg_catalog.pg_stat_activity a JOIN pg_catalog.pg_stat_ssl s USING (pid) "
    "WHERE a.pid = pg_catalog.pg_backend_pid()"
)


class _Out:
    """Human output: aligned, coloured only on a terminal and never with NO_COLOR."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.colour = (
            stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        )

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def good(self, text: str) -> str:
        return self._paint(text, "32")

    def bad(self, text: str) -> str:
        return self._paint(text, "31;1")

    def warn(self, text: str) -> str:
        return self._paint(text, "33")

    def bold(self, text: str) -> str:
        return self._paint(text, "1")

    def line(self, text: str = "") -> None:
        print(text, file=self.stream)

    def field(self, key: str, value: object, indent: int = 2) -> None:
        print(f"{' ' * indent}{key:<16} {value}", file=self.stream)


def _json(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


def _timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError("the timeout must be between 0 and 3600 seconds")
    return seconds


def _cert_json(cert: Any) -> dict[str, Any]:
    from ._inspect import days_left

    return {
        "subject": cert.subject,
        "issuer": cert.issuer,
        "names": list(cert.names),
        "not_before": cert.not_before.isoformat() if cert.not_before else None,
        "not_after": cert.not_after.isoformat() if cert.not_after else None,
        "days_left": days_left(cert),
    }


def _trust_json(trust: Any) -> dict[str, Any] | None:
    if trust is None:
        return None
    return {"path": trust.path, "label": trust.label, "origin": trust.origin}


def _print_chain(out: _Out, chain: Sequence[Any]) -> None:
    from ._inspect import EXPIRY_WARNING_DAYS, days_left

    # Every name is the server's text: shown escaped (the callers' headings say it is unverified).
    for i, cert in enumerate(chain):
        role = "server" if i == 0 else "CA"
        out.line(f"  [{i}] {role}: {shown(cert.subject) or '(empty subject)'}")
        out.field("issuer", shown(cert.issuer), 6)
        if cert.names:
            out.field("names", ", ".join(map(shown, cert.names)), 6)
        left = days_left(cert)
        if cert.not_after is not None and left is not None:
            text = f"{cert.not_after:%Y-%m-%d} ({left} days)"
            if left < 0:
                text = out.bad(f"{cert.not_after:%Y-%m-%d} (EXPIRED {-left} days ago)")
            elif left < EXPIRY_WARNING_DAYS:
                text = out.warn(text + ", renew soon")
            out.field("expires", text, 6)


def _secrets(target: str) -> tuple[str | None, ...]:
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(target)
    except psycopg.Error:
        return ()
    return (str(params.get("password") or "") or None, str(params.get("sslpassword") or "") or None)


def _error_exit(ex: BaseException) -> int:
    from ._errors import ConfigurationError, ConnectionSecurityError

    if isinstance(ex, ConfigurationError):
        return EXIT_USAGE
    if isinstance(ex, ConnectionSecurityError):
        return EXIT_INSECURE
    return EXIT_CONNECT


def _for_people(ex: BaseException, message: str) -> str:
    """*message* (from *ex*) ready to print. safepg's own messages show the network's text
    escaped already; psycopg's may quote the server's, so each of their lines is escaped (the
    line breaks are libpq's, and its tabs indent its hints)."""
    from ._errors import SafePGError

    if isinstance(ex, SafePGError):
        return message
    return shown_lines(message)


# -- check -------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    """Connect through safepg and report the session, the certificate and the server's view."""
    import safepg

    from . import _probe
    from ._redact import redact

    out = _Out(sys.stdout)
    connect_timeout = str(max(2, math.ceil(args.timeout)))
    try:
        conn = safepg.connect(args.target, autocommit=True, connect_timeout=connect_timeout)
    except psycopg.Error as ex:
        message = redact(str(ex), _secrets(args.target))
        code = _error_exit(ex)
        if args.json:
            _json(
                {
                    "schema": "safepg.check/1",
                    "ok": False,
                    "exit_code": code,
                    "error": {"class": type(ex).__name__, "message": message},
                    "trust": _trust_json(getattr(ex, "trust", None)),
                }
            )
        else:
            print(
                f"safepg check: {type(ex).__name__}:\n{_for_people(ex, message)}", file=sys.stderr
            )
        return code
    with conn:
        report = safepg.check(conn)
        row = conn.execute(_ACTIVITY_QUERY).fetchone()
    activity = dict(
        zip(
            (
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
            ),
            row or (),
            strict=False,
        )
    )
    presented = None
    if report.encrypted and report.trust is not None:
        presented = _probe.probe(
            report.hostaddr or report.host,
            int(report.port),
            report.trust.path,
            server_hostname=report.host,
            timeout=args.timeout,
        )
    chain = presented.chain if presented else ()
    code = EXIT_OK if report.verified else EXIT_INSECURE
    if args.json:
        _json(
            {
                "schema": "safepg.check/1",
                "ok": report.verified,
                "exit_code": code,
                "host": report.host,
                "hostaddr": report.hostaddr,
                "port": report.port,
                "client": {
                    "encrypted": report.encrypted,
                    "verified": report.verified,
                    "sslmode": report.sslmode,
                    "protocol": report.protocol,
                    "cipher": report.cipher,
                    "bits": report.bits,
                    "ssl_library": report.ssl_library,
                },
                "trust": _trust_json(report.trust),
                "certificates": [_cert_json(c) for c in chain],
                "server": {"pid": report.backend_pid, **activity},
                "error": None,
            }
        )
        return code
    state = out.good("verified") if report.verified else out.bad("NOT verified")
    out.line(f"{out.bold('safepg check')}: {state}, {report.summary}")
    out.field(
        "host",
        f"{report.host}:{report.port}"
        + (f" (address {report.hostaddr})" if report.hostaddr else ""),
    )
    out.field("sslmode", report.sslmode)
    out.field("protocol", report.protocol or "-")
    out.field("cipher", f"{report.cipher or '-'} ({report.bits or '-'} bits)")
    out.field("TLS library", report.ssl_library or "-")
    if report.trust is not None:
        out.field("trust anchors", report.trust.label)
        out.field("trust file", report.trust.path)
    if chain:
        out.line("  certificates (read by a second handshake, as presented: unverified):")
        _print_chain(out, chain)
    # The server's own text (verified server, but its values can hold anything): escaped.
    out.line("  server side (pg_stat_ssl joined with pg_stat_activity, this session):")
    out.field("pid", report.backend_pid, 6)
    for key in ("user", "database", "application_name", "client_addr", "backend_start"):
        if activity.get(key) is not None:
            out.field(key.replace("_", " "), shown(str(activity[key])), 6)
    ssl_text = f"{activity.get('protocol') or ''} {activity.get('cipher') or ''}"
    out.field("ssl", f"{activity.get('ssl')} {shown(ssl_text)}", 6)
    if activity.get("client_dn"):
        out.field("client cert", shown(str(activity["client_dn"])), 6)
    return code


# -- inspect -----------------------------------------------------------------------------------


def _host_port(value: str) -> tuple[str, int]:
    host, port = value, "5432"
    if value.startswith("["):  # [::1]:5432
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") or port
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST[:PORT], got {value!r}")
    return host, int(port)


def _inspect(args: argparse.Namespace) -> int:
    """Probe a server's TLS without logging in."""
    import safepg

    from ._inspect import inspect_server

    host, port = args.server
    extra: dict[str, Any] = {"sslrootcert": args.sslrootcert} if args.sslrootcert else {}
    if args.hostaddr:
        extra["hostaddr"] = args.hostaddr
    try:
        trust = safepg.resolve_trust(host=host, port=port, **extra)
    except safepg.ConfigurationError as ex:
        print(f"safepg inspect: {ex}", file=sys.stderr)
        return EXIT_USAGE
    found = inspect_server(
        host, port, trust=trust, hostaddr=args.hostaddr, timeout=args.timeout, direct=args.direct
    )
    if not found.reachable:
        code = EXIT_CONNECT
    elif not found.ok:
        code = EXIT_INSECURE
    elif found.warnings:
        code = EXIT_EXPIRING
    else:
        code = EXIT_OK
    if args.json:
        leaf = found.chain[0] if found.chain else None
        _json(
            {
                "schema": "safepg.inspect/1",
                "ok": found.ok,
                "exit_code": code,
                "host": host,
                "port": port,
                "address": found.address,
                "negotiation": "direct" if found.direct else "sslrequest",
                "reachable": found.reachable,
                "tls": found.tls,
                "certificates": [_cert_json(c) for c in found.chain],
                "trust": {
                    **(_trust_json(found.trust) or {}),
                    "verifies": found.trust_verifies,
                    "error": found.verify_error,
                },
                "verified_by": _trust_json(found.verified_by),
                "hostname": {
                    "host": host,
                    "matches": found.hostname_matches,
                    "names": list(leaf.names) if leaf else [],
                },
                "rds_ca": found.rds_ca,
                "problems": list(found.problems),
                "warnings": list(found.warnings),
                "advice": list(found.advice),
            }
        )
        return code
    out = _Out(sys.stdout)
    how = "direct TLS" if found.direct else "SSLRequest"
    out.line(f"{out.bold('safepg inspect')} {host}:{port} (no login; {how})")
    if found.address != host:
        out.field("address", found.address)
    if found.reachable:
        out.field("TLS", out.good("offered") if found.tls else out.bad("not offered"))
    if found.chain:
        out.line("  certificates as presented (unverified; the trust anchors judge them below):")
        _print_chain(out, found.chain)
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
        EXIT_CONNECT: out.bad("unreachable"),
    }[code]
    out.field("result", result)
    return code


# -- ca and env --------------------------------------------------------------------------------


def _resolve(target: str | None, host: str | None, port: int | None) -> Any:
    import safepg

    extra: dict[str, Any] = {}
    if host:
        extra["host"] = host
    if port:
        extra["port"] = port
    # Without a TCP host, the trust anchors for "any server": a socket host would be refused.
    return safepg.resolve_trust(target or "", allow_unencrypted_unix_socket=True, **extra)


def _ca(args: argparse.Namespace) -> int:
    """Print the trust file safepg would use."""
    import safepg

    try:
        trust = _resolve(None, args.host, args.port)
    except safepg.ConfigurationError as ex:
        print(f"safepg ca: {ex}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        _json({"schema": "safepg.ca/1", **(_trust_json(trust) or {})})
    else:
        print(trust.path)
        if args.verbose:
            print(f"safepg ca: {trust.label}", file=sys.stderr)
    return EXIT_OK


def _env(args: argparse.Namespace) -> int:
    """Print shell exports that make other libpq tools verify as safepg does."""
    import safepg

    from ._params import MIN_TLS_VERSION, REQUIRED_SSLMODE

    try:
        trust = _resolve(args.target, None, None)
    except safepg.ConfigurationError as ex:
        print(f"safepg env: {ex}", file=sys.stderr)
        return EXIT_USAGE
    exports = {
        "PGSSLMODE": REQUIRED_SSLMODE,
        "PGSSLROOTCERT": trust.path,
        "PGGSSENCMODE": "disable",
        "PGSSLMINPROTOCOLVERSION": MIN_TLS_VERSION,
    }
    if args.json:
        _json({"schema": "safepg.env/1", "env": exports, "trust": _trust_json(trust)})
        return EXIT_OK
    print(f"# trust anchors: {trust.label}")
    for key, value in exports.items():
        print(f"export {key}={shlex.quote(value)}")
    return EXIT_OK


# -- providers and bundles ---------------------------------------------------------------------


def _bundle_files_json() -> list[dict[str, Any]]:
    from . import _x509, providers

    rows = []
    for bundle in providers.BUNDLES:
        for path, override in providers.bundle_paths(bundle):
            with open(path, "rb") as f:
                certs = _x509.parse_pem(f.read())
            expiries = [c.not_after for c in certs if c.not_after]
            rows.append(
                {
                    "bundle": bundle.key,
                    "file": os.path.basename(path),
                    "path": path,
                    "override": override,
                    "certificates": len(certs),
                    "earliest_expiry": min(expiries).isoformat() if expiries else None,
                }
            )
    return rows


def _providers(args: argparse.Namespace) -> int:
    """List the provider profiles and the CA files safepg ships."""
    import safepg

    from . import providers

    try:
        files = _bundle_files_json()
    except safepg.ConfigurationError as ex:  # a bad override: say so, do not hide it
        print(f"safepg providers: {ex}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        _json(
            {
                "schema": "safepg.providers/1",
                "profiles": [
                    {
                        "key": p.key,
                        "name": p.name,
                        "patterns": list(p.patterns),
                        "trust": p.trust,
                        "bundle": p.bundle.key if p.bundle else None,
                        "notes": p.notes,
                    }
                    for p in providers.PROFILES
                ],
                "bundle_files": files,
            }
        )
        return EXIT_OK
    out = _Out(sys.stdout)
    for p in providers.PROFILES:
        trust = {
            "bundled": f"bundled ({', '.join(p.bundle.files)})" if p.bundle else "bundled",
            "os-store": "OS trust store, then certifi",
            "not-bundled": "not bundled: pass the CA file (sslrootcert)",
        }[p.trust]
        out.line(out.bold(p.name))
        out.field("hosts", ", ".join(p.patterns))
        out.field("trust", trust)
        out.field("notes", p.notes)
    out.line()
    out.line(out.bold("CA files") + f" (overrides are read from {providers.override_dir()})")
    for row in files:
        source = "override" if row["override"] else "shipped"
        until = (row["earliest_expiry"] or "-")[:10]
        out.field(
            row["file"], f"{row['certificates']} certificates, {source}, earliest expiry {until}"
        )
    return EXIT_OK


def _bundles_check(args: argparse.Namespace) -> int:
    """Check a CA bundle as safepg checks its own data, and show how it differs."""
    return _checked_bundle(args)[0]


def _checked_bundle(args: argparse.Namespace) -> tuple[int, list[Any]]:
    """Check *args.file*, print the verdict and the difference to *args.replace*; the exit
    status and the checked certificates (`_bundles.CheckedCert`), read once."""
    from . import _bundles, providers

    try:
        with open(args.file, "rb") as f:
            pem = f.read()
        certs = _bundles.check_bundle(pem)
    except OSError as ex:
        print(f"safepg bundles: cannot read {args.file}: {ex.strerror}", file=sys.stderr)
        return EXIT_USAGE, []
    except _bundles.BundleError as ex:
        print(f"safepg bundles: {args.file}: {ex}", file=sys.stderr)
        return EXIT_INSECURE, []
    print(f"{args.file}: {len(certs)} certificates, all CAs, signatures verify, none expired")
    if getattr(args, "replace", None):
        current = _fingerprints(providers.shipped_path(args.replace))
        new = {c.sha256: c.subject for c in certs}
        for fp in sorted(set(new) - set(current)):
            print(f"  + {new[fp]}  {fp[:16]}")
        for fp in sorted(set(current) - set(new)):
            print(f"  - {current[fp]}  {fp[:16]}")
    return EXIT_OK, certs


def _fingerprints(path: str) -> dict[str, str]:
    """The certificates of a PEM file, read as OpenSSL and `_bundles.check_bundle` read it."""
    from . import _x509

    with open(path, "rb") as f:
        blocks = _x509.read_pem(f.read())
    certs = [_x509.certificate(b) for b in blocks if b.label in _x509.CERTIFICATE_LABELS]
    return {c.sha256.upper(): _x509.common_name(c.subject) or "?" for c in certs}


def _bundles_install(args: argparse.Namespace) -> int:
    """Check a newer copy of a shipped CA file and make safepg use it (no download, ever)."""
    from . import _bundles, _cache, providers

    code, certs = _checked_bundle(args)
    if code != EXIT_OK:
        return code
    directory = providers.override_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The certificates checked, re-encoded: never the file's own bytes, which could hold
        # more than was checked.
        _cache.write_private_file(directory / args.replace, _bundles.canonical_pem(certs))
    except OSError as ex:
        print(f"safepg bundles: cannot write to {directory}: {ex.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(f"installed as {directory / args.replace}; safepg now uses it instead of its own copy")
    print(f"(remove that file to go back to the data shipped with safepg {__version__})")
    return EXIT_OK


# -- demo --------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    """Start a throwaway TLS server, connect verified, and show a wrong name being refused."""
    import safepg

    try:
        from safepg.testing import PostgresServer, ServerNotFoundError
    except ImportError as ex:
        print(f"safepg demo: {ex}", file=sys.stderr)
        return 2
    try:
        server = PostgresServer(args.bindir)
    except ServerNotFoundError as ex:
        print(f"safepg demo: {ex}", file=sys.stderr)
        return 2
    print(f"Starting a throwaway PostgreSQL with TLS from {server.bindir} ...")
    with server:
        print(f"  listening on {server.host}:{server.port}, certificate for localhost, 127.0.0.1")
        print(f"  its CA (made for this run): {server.ca_path}\n")

        conninfo = server.conninfo(sslmode="require").replace(server.password, "***")
        print(f"1. safepg.connect({conninfo!r})")
        print("   sslmode=require trusts any server; safepg raises it to verify-full.\n")
        with safepg.connect(server.conninfo(sslmode="require")) as conn:
            report = safepg.check(conn)
        print("\n".join("   " + line for line in str(report).splitlines()))

        print('\n2. The same server, dialled as "db.example.com" (a name its certificate lacks):')
        try:
            safepg.connect(server.conninfo(host="db.example.com", hostaddr="127.0.0.1"))
        except safepg.HostnameMismatchError as ex:
            print(f"   refused with {type(ex).__name__}:")
            print("\n".join("   | " + line for line in str(ex).splitlines()))
        else:  # pragma: no cover - would be a bug
            print("   NOT refused: this is a bug, please report it", file=sys.stderr)
            return 1

        print("\n3. Over the server's Unix-domain socket, where libpq never uses TLS:")
        try:
            safepg.connect(server.conninfo(host=str(server.socket_dir)))
        except safepg.ConfigurationError as ex:
            print(f"   refused before any I/O with {type(ex).__name__}:")
            print(f"   | {ex}")
    print("\nServer stopped. Done.")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safepg", description="PostgreSQL connections that are always verified."
    )
    parser.add_argument("--version", action="version", version=f"safepg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log safepg's decisions")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser(
        "check", help="connect through safepg and report how the session is protected"
    )
    check.add_argument("target", metavar="URL|CONNINFO", help="postgresql:// URL or conninfo")
    _add_common(check)
    check.set_defaults(func=_check)

    inspect = commands.add_parser(
        "inspect", help="show a server's certificates and who verifies them (no login needed)"
    )
    inspect.add_argument("server", metavar="HOST[:PORT]", type=_host_port)
    inspect.add_argument("--hostaddr", help="dial this address, check the certificate for HOST")
    inspect.add_argument("--sslrootcert", help="judge the chain against this CA file")
    inspect.add_argument(
        "--direct", action="store_true", help="direct TLS (PostgreSQL 17+) instead of SSLRequest"
    )
    _add_common(inspect)
    inspect.set_defaults(func=_inspect)

    ca = commands.add_parser("ca", help="print the path of the trust file safepg would use")
    ca.add_argument("--host", help="the server's host name (chooses provider roots)")
    ca.add_argument("--port", type=int)
    ca.add_argument("--json", action="store_true", help="print JSON")
    ca.set_defaults(func=_ca)

    env = commands.add_parser("env", help="print shell exports for psql and other libpq tools")
    env.add_argument("target", nargs="?", metavar="URL|CONNINFO", help="chooses the trust file")
    env.add_argument("--json", action="store_true", help="print JSON")
    env.set_defaults(func=_env)

    provs = commands.add_parser(
        "providers", help="list the cloud provider profiles and the CA files safepg ships"
    )
    provs.add_argument("--json", action="store_true", help="print JSON")
    provs.set_defaults(func=_providers)

    from .providers import BUNDLES

    shipped = sorted(name for b in BUNDLES for name in b.files)
    bundles = commands.add_parser("bundles", help="check or install newer copies of CA files")
    bundle_commands = bundles.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    bcheck = bundle_commands.add_parser("check", help="check a CA bundle file")
    bcheck.add_argument("file")
    bcheck.add_argument("--replace", choices=shipped, help="show the difference to this file")
    bcheck.set_defaults(func=_bundles_check)
    binstall = bundle_commands.add_parser(
        "install", help="check a newer copy of a shipped CA file and use it from now on"
    )
    binstall.add_argument("file")
    binstall.add_argument("--replace", choices=shipped, required=True, help="the file it replaces")
    binstall.set_defaults(func=_bundles_install)

    demo = commands.add_parser(
        "demo", help="run a demo against a throwaway local TLS server (no database needed)"
    )
    demo.add_argument("--bindir", help="directory of PostgreSQL's initdb and postgres")
    demo.set_defaults(func=_demo)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (see the README)")
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the network (default {DEFAULT_TIMEOUT:g})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``safepg`` command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(name)s: %(levelname)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except psycopg.Error as ex:
        message = _for_people(ex, str(ex))
        print(f"safepg {args.command}: {type(ex).__name__}: {message}", file=sys.stderr)
        return _error_exit(ex)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away: safepg providers | head
        # Python flushes stdout at exit, which would fail again and print a traceback.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK
    return code
