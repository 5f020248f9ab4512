"""``safepg check`` gets a password the psql way: -W prompts, and libpq's own sources
(PGPASSWORD, passfile=, PGPASSFILE, ~/.pgpass) are honoured; without one, the error says how."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from safepg._cli import main
from safepg.testing import PostgresServer

from .cli_json import run_json


def _without_password(server: PostgresServer, **extra: str) -> str:
    return make_conninfo(
        "",
        host=server.host,
        port=server.port,
        user=server.user,
        dbname=server.dbname,
        sslrootcert=str(server.ca_path),
        **extra,
    )


def _passfile(path: Path, server: PostgresServer) -> Path:
    path.write_text(f"*:*:*:{server.user}:{server.password}\n")
    path.chmod(0o600)
    return path


def test_prompt(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[str] = []

    def getpass(prompt: str = "") -> str:
        asked.append(prompt)
        return server.password

    monkeypatch.setattr("getpass.getpass", getpass)
    monkeypatch.setattr("safepg._cli.check._has_terminal", lambda: True)
    code, data = run_json(capsys, "check", _without_password(server), "-W")
    assert code == 0, data["error"]
    assert asked == ["Password: "]
    assert data["client"]["verified"] is True
    code, _ = run_json(capsys, "check", _without_password(server), "--password")
    assert code == 0
    assert len(asked) == 2


def test_pgpassword(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PGPASSWORD", server.password)
    code, data = run_json(capsys, "check", _without_password(server))
    assert code == 0, data["error"]


def test_passfile_in_the_conninfo(
    server: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passfile = _passfile(tmp_path / "pgpass", server)
    code, data = run_json(capsys, "check", _without_password(server, passfile=str(passfile)))
    assert code == 0, data["error"]


def test_pgpassfile(
    server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(_passfile(tmp_path / "pgpass", server)))
    code, data = run_json(capsys, "check", _without_password(server))
    assert code == 0, data["error"]


def test_home_pgpass(
    server: PostgresServer, clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _passfile(clean_env / ".pgpass", server)  # clean_env's HOME, which libpq reads
    code, data = run_json(capsys, "check", _without_password(server))
    assert code == 0, data["error"]


def test_no_password_names_the_ways_to_give_one(
    server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", _without_password(server)]) == 1
    err = capsys.readouterr().err
    assert "no password supplied" in err
    for way in ("-W/--password", "PGPASSWORD", "passfile=", "PGPASSFILE", "~/.pgpass"):
        assert way in err
