"""``safepg demo [--keep]``: a throwaway local TLS server, a verified connect, two refusals; with
``--keep``, the server then stays up until Ctrl-C, to try ``check`` and ``inspect`` on."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from ._output import EXIT_CONNECT, EXIT_OK, EXIT_USAGE, Output, add_verbose, invocation

if TYPE_CHECKING:
    from ..testing import PostgresServer
    from ._output import Subparsers


def register(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "demo", help="run a demo against a throwaway local TLS server (no database needed)"
    )
    parser.add_argument("--bindir", help="directory of PostgreSQL's initdb and postgres")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="then keep the server running until Ctrl-C, and print how to reach it",
    )
    add_verbose(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, out: Output) -> int:
    import safepg

    try:
        from ..testing import PostgresServer, ServerNotFoundError
    except ImportError as ex:
        return out.refuse(EXIT_USAGE, type(ex).__name__, str(ex))
    try:
        server = PostgresServer(args.bindir)
    except ServerNotFoundError as ex:
        return out.refuse(EXIT_USAGE, type(ex).__name__, str(ex))
    out.line(f"Starting a throwaway PostgreSQL with TLS from {server.bindir} ...")
    with server:
        out.line(
            f"  listening on {server.host}:{server.port}, certificate for localhost, 127.0.0.1"
        )
        out.line(f"  its CA (made for this run): {server.ca_path}\n")

        conninfo = server.conninfo(sslmode="require").replace(server.password, "***")
        out.line(f"1. safepg.connect({conninfo!r})")
        out.line("   sslmode=require trusts any server; safepg raises it to verify-full.\n")
        with safepg.connect(server.conninfo(sslmode="require")) as conn:
            report = safepg.check(conn)
        out.line("\n".join("   " + line for line in str(report).splitlines()))

        out.line(
            '\n2. The same server, dialled as "db.example.com" (a name its certificate lacks):'
        )
        try:
            safepg.connect(server.conninfo(host="db.example.com", hostaddr="127.0.0.1"))
        except safepg.HostnameMismatchError as ex:
            out.line(f"   refused with {type(ex).__name__}:")
            out.line("\n".join("   | " + line for line in str(ex).splitlines()))
        else:  # pragma: no cover - would be a bug
            return out.refuse(EXIT_CONNECT, "Bug", "NOT refused: this is a bug, please report it")

        out.line("\n3. Over the server's Unix-domain socket, where libpq never uses TLS:")
        try:
            safepg.connect(server.conninfo(host=str(server.socket_dir)))
        except safepg.ConfigurationError as ex:
            out.line(f"   refused before any I/O with {type(ex).__name__}:")
            out.line(f"   | {ex}")
        if args.keep:
            _keep(server, out)
    out.line("\nServer stopped. Done.")
    return EXIT_OK


def _passfile(server: PostgresServer) -> Path:
    """A libpq password file for the demo's role, private to this user: the URL printed for
    people and their shell history then holds no password."""
    path = server.directory / "pgpass"

    def field(value: object) -> str:
        return str(value).replace("\\", "\\\\").replace(":", "\\:")

    line = ":".join(
        field(v) for v in (server.host, server.port, server.dbname, server.user, server.password)
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")
    return path


def _keep(server: PostgresServer, out: Output) -> None:
    """Print how to reach *server*, then wait for Ctrl-C (SIGINT) or SIGTERM."""
    passfile = _passfile(server)
    ca_file = str(server.ca_path)
    url = (
        f"postgresql://{server.user}@{server.host}:{server.port}/{server.dbname}"
        f"?sslrootcert={quote(ca_file, safe='/')}&passfile={quote(str(passfile), safe='/')}"
    )
    me = invocation()
    out.line("\nThe server keeps running until Ctrl-C:")
    out.field("url", url)
    out.field("CA file", ca_file)
    out.field("password file", f"{passfile} (the URL names it; no password is shown)")
    out.field("check it", f"{me} check {shlex.quote(url)}")
    out.field(
        "inspect it",
        f"{me} inspect {server.host}:{server.port} --sslrootcert {shlex.quote(ca_file)}",
    )
    out.stream.flush()
    with _until_stopped() as stopped:
        while not stopped.wait(0.5):
            pass
    out.line("\nStopping the server ...")


@contextmanager
def _until_stopped() -> Iterator[threading.Event]:
    """An event set by SIGINT (Ctrl-C) or SIGTERM, whose usual handlers are back afterwards."""
    stopped = threading.Event()
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not in the main thread (ValueError), the usual handlers stay: Ctrl-C still ends it.
        with contextlib.suppress(ValueError):
            previous[signum] = signal.signal(signum, lambda *_: stopped.set())
    try:
        yield stopped
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
