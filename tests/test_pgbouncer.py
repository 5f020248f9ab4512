"""Real PgBouncer with client-side TLS in front of the real server: safepg verifies the pooler.

``.ci/run`` installs Debian's ``pgbouncer``; elsewhere these tests are skipped when it is missing.
PgBouncer runs as the server's account (it refuses to run as root) and verifies the server with
``server_tls_sslmode = verify-full``, so both hops are TLS.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import safepg
from safepg.pool import ConnectionPool
from safepg.testing import PostgresServer

PGBOUNCER = shutil.which("pgbouncer") or next(
    (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
)
pytestmark = pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed")


class PgBouncer:
    def __init__(self, server: PostgresServer, directory: Path) -> None:
        self.server = server
        self.directory = directory
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        d = self.directory
        d.mkdir(mode=0o700)
        cert = self.server.issue_certificate("localhost", ip_addresses=["127.0.0.1"])
        cert.write(d / "bouncer.crt", d / "bouncer.key")
        self.server.ca.write_cert(d / "ca.pem")
        (d / "userlist.txt").write_text(f'"{self.server.user}" "{self.server.password}"\n')
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        upstream = f"host=127.0.0.1 port={self.server.port} dbname={self.server.dbname}"
        (d / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"session = {upstream} pool_mode=session\n"
            f"transaction = {upstream} pool_mode=transaction\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {d / 'userlist.txt'}\n"
            f"logfile = {d / 'pgbouncer.log'}\n"
            f"pidfile = {d / 'pgbouncer.pid'}\n"
            "client_tls_sslmode = require\n"
            f"client_tls_cert_file = {d / 'bouncer.crt'}\n"
            f"client_tls_key_file = {d / 'bouncer.key'}\n"
            "server_tls_sslmode = verify-full\n"
            f"server_tls_ca_file = {d / 'ca.pem'}\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        account = self.server._account  # the account the server runs as (not root)
        if account:
            for path in [d, *d.iterdir()]:
                os.chown(path, *account)
        assert PGBOUNCER is not None
        self._proc = subprocess.Popen(
            [PGBOUNCER, str(d / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            user=account[0] if account else None,
            group=account[1] if account else None,
            extra_groups=[] if account else None,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)  # polling a port that is not open yet
        raise RuntimeError(f"pgbouncer did not start:\n{self.log()}")

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text()[-3000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None

    def conninfo(self, dbname: str, **overrides: Any) -> str:
        return self.server.conninfo(port=self.port, dbname=dbname, **overrides)


@pytest.fixture(scope="module")
def bouncer(server: PostgresServer) -> Iterator[PgBouncer]:
    # Inside the server's directory, which its account can reach (pytest's tmp is root's).
    b = PgBouncer(server, server.directory / f"pgbouncer-{os.getpid()}-{time.monotonic_ns()}")
    b.start()
    yield b
    b.stop()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_verified_through_pgbouncer(bouncer: PgBouncer, mode: str) -> None:
    with safepg.connect(bouncer.conninfo(mode), prepare_threshold=None) as conn:
        report = safepg.check(conn)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert report.verified
    assert report.sslmode == "verify-full"
    assert report.protocol in ("TLSv1.2", "TLSv1.3")
    # pg_stat_ssl describes the pooler's own connection to the server: PgBouncer -> PostgreSQL.
    assert report.backend_ssl is True


def test_pooled_connections_through_pgbouncer(bouncer: PgBouncer) -> None:
    with ConnectionPool(
        bouncer.conninfo("transaction"),
        kwargs={"prepare_threshold": None},
        min_size=2,
        max_size=4,
        open=True,
    ) as pool:
        for i in range(20):
            with pool.connection() as conn:
                assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)


def test_pgbouncer_with_a_certificate_for_another_name_is_refused(bouncer: PgBouncer) -> None:
    with pytest.raises(safepg.HostnameMismatchError):
        safepg.connect(bouncer.conninfo("session", host="db.example.com", hostaddr="127.0.0.1"))


def test_pg_stat_ssl_through_pgbouncer_is_the_poolers_view(
    bouncer: PgBouncer, server: PostgresServer
) -> None:
    with safepg.connect(bouncer.conninfo("session")) as conn:
        report = safepg.check(conn)
        row = conn.execute(
            "SELECT host(client_addr), application_name FROM pg_stat_activity "
            "WHERE pid = pg_backend_pid()"
        ).fetchone()
        libpq_pid = conn.info.backend_pid
    assert row is not None
    # The backend's client is PgBouncer (on 127.0.0.1), not this process: the TLS session that
    # pg_stat_ssl shows is the pooler's, while report.protocol/cipher are this client's own.
    assert row[0] == "127.0.0.1"
    # libpq's backend PID is PgBouncer's made-up key; the report's comes from the server.
    assert libpq_pid != report.backend_pid
    assert report.backend_pid > 0


def test_pgbouncer_is_a_real_pooler(bouncer: PgBouncer) -> None:
    # Raw psycopg with sslmode=require reaches it too: safepg's refusals above are not a quirk
    # of the setup.
    with psycopg.connect(bouncer.conninfo("session", sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use


def test_pgbouncer_takes_no_direct_tls_and_safepg_learns_it(
    bouncer: PgBouncer, clean_env: Path
) -> None:
    from safepg import _fastpath

    if not _fastpath.libpq_has_direct():
        pytest.skip("this libpq does not know sslnegotiation")
    for _ in range(2):
        with safepg.connect(bouncer.conninfo("session")) as conn:
            assert safepg.check(conn).verified
    cache = Path(os.environ["SAFEPG_CACHE_DIR"])
    learned = [json.loads(p.read_text()) for p in cache.glob("host-*.json")]
    assert [e["direct_tls"] for e in learned] == [False]
