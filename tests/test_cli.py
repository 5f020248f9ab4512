"""The command line, in-process and as ``python -m safepg``."""

from __future__ import annotations

import functools
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from safepg._cli import main
from safepg.testing import PostgresServer, ServerNotFoundError, find_bindir

from .cli_json import validate


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


def test_demo_keep_serves_until_ctrl_c() -> None:
    """safepg demo --keep prints a URL, the CA and a ready check line; the check line works;
    Ctrl-C (SIGINT) stops the server, removes its files and exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, timeout=60)
    lines: queue.Queue[str] = queue.Queue()
    shown: dict[str, str] = {}
    with subprocess.Popen(
        [sys.executable, "-m", "safepg", "demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:

        def read() -> None:
            for line in proc.stdout or ():
                lines.put(line)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            while "inspect it" not in shown:  # the last line it prints before it waits
                key, _, value = lines.get(timeout=120).strip().partition("  ")
                shown[key] = value.strip()
            url, ca = shown["url"], Path(shown["CA file"])
            check = run([*shlex.split(shown["check it"]), "--json"])
            assert check.returncode == 0, check.stderr
            data = json.loads(check.stdout)
            validate(data)
            assert data["trust"]["path"] == str(ca)
            inspect = run(shlex.split(shown["inspect it"]))
            assert inspect.returncode == 0, inspect.stdout + inspect.stderr
            # The URL names a password file; the password is in it, not on the screen.
            password = (ca.parent / "pgpass").read_text().strip().rsplit(":", 1)[1]
            assert password not in url
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
            reader.join(timeout=10)
        err = proc.stderr.read() if proc.stderr else ""
    out = "".join(lines.queue)
    assert proc.returncode == 0, err
    assert "Server stopped." in out
    assert password not in out + err
    assert not ca.parent.exists()  # its directory, data and password file are gone
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", data["port"]), timeout=2).close()


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
