"""The command line, in-process and as ``python -m safepg``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from safepg._cli import main
from safepg.testing import PostgresServer, ServerNotFoundError, find_bindir


def test_demo_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "verified TLSv1." in out
    assert "refused with HostnameMismatchError" in out
    assert "refused before any I/O with ConfigurationError" in out
    assert "Server stopped." in out


def test_demo_as_module() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.run(
        [sys.executable, "-m", "safepg", "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused with HostnameMismatchError" in proc.stdout
    # The demo's own password never reaches the screen.
    assert "password=***" in proc.stdout


def test_demo_without_server_binaries(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--bindir", str(tmp_path)]) == 2
    assert "apt-get install postgresql" in capsys.readouterr().err


def _run_example(
    conninfo: str, name: str = "basic.py", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    example = Path(__file__).parent.parent / "examples" / name
    return subprocess.run(
        [sys.executable, str(example), *([conninfo] if conninfo else [])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_basic_example(server: PostgresServer) -> None:
    proc = _run_example(server.conninfo())
    assert proc.returncode == 0, proc.stderr
    assert "verified TLSv1." in proc.stdout
    proc = _run_example(server.conninfo(host="db.example.com", hostaddr="127.0.0.1"))
    assert proc.returncode == 2
    assert "wrong server name" in proc.stderr


def test_sqlalchemy_example(server: PostgresServer) -> None:
    proc = _run_example("", "sqlalchemy_app.py", env={**os.environ, "DATABASE_URL": server.url()})
    assert proc.returncode == 0, proc.stderr
    assert "hello, verified world" in proc.stdout
    assert "verified TLSv1." in proc.stdout


def test_pool_example(server: PostgresServer) -> None:
    proc = _run_example(server.conninfo(), "pool.py")
    assert proc.returncode == 0, proc.stderr
    assert f"sum: {2 * sum(range(100))}" in proc.stdout
    assert "verified TLSv1." in proc.stdout


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_find_bindir_explains_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAFEPG_PG_BINDIR", str(tmp_path))
    with pytest.raises(ServerNotFoundError, match="apt-get install postgresql"):
        find_bindir()
