"""The ``safepg`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import psycopg

from . import __version__


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
    demo = commands.add_parser(
        "demo", help="run a demo against a throwaway local TLS server (no database needed)"
    )
    demo.add_argument("--bindir", help="directory of PostgreSQL's initdb and postgres")
    demo.set_defaults(func=_demo)
    return parser


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
        print(f"safepg {args.command}: {type(ex).__name__}: {ex}", file=sys.stderr)
        return 1
    return code
