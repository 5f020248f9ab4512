"""Messages name a setting where the user set it, and the fix speaks that place's language."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy

import safepg
import safepg.sqlalchemy
from safepg.testing import CertificateAuthority, PostgresServer


def _raised(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "raised to verify-full" in r.getMessage()]


def _rogue_file(rogue_ca: CertificateAuthority, tmp_path: Path) -> str:
    path = tmp_path / "rogue.pem"
    rogue_ca.write_cert(path)
    return str(path)


def test_a_keyword_argument_is_named_as_such(
    server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "safepg")
    safepg.connect(server.conninfo(), sslmode="require").close()
    assert any("(from the keyword argument sslmode)" in m for m in _raised(caplog))


@pytest.mark.parametrize("through", ["safepg.sqlalchemy", "dialect"])
def test_a_sqlalchemy_url_query_is_named_as_such(
    server: PostgresServer, caplog: pytest.LogCaptureFixture, through: str
) -> None:
    caplog.set_level(logging.DEBUG, "safepg")
    if through == "dialect":
        engine = sqlalchemy.create_engine(server.url("postgresql+safepg") + "&sslmode=require")
    else:
        engine = safepg.sqlalchemy.create_engine(server.url() + "&sslmode=require")
    with engine.connect():
        pass
    engine.dispose()
    raised = _raised(caplog)
    assert any("(from ?sslmode= in the SQLAlchemy URL)" in m for m in raised), raised
    assert not any("keyword argument" in m for m in raised), raised


def test_sqlalchemy_connect_args_are_named_as_such(
    server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "safepg")
    engine = safepg.sqlalchemy.create_engine(server.url(), connect_args={"sslmode": "verify-ca"})
    with engine.connect():
        pass
    engine.dispose()
    assert any('(from connect_args["sslmode"])' in m for m in _raised(caplog))


def test_the_sqlalchemy_fix_is_in_url_words(
    server: PostgresServer, rogue_ca: CertificateAuthority, tmp_path: Path
) -> None:
    rogue = quote(_rogue_file(rogue_ca, tmp_path), safe="")
    url = server.url().split("?")[0] + f"?sslrootcert={rogue}"
    engine = safepg.sqlalchemy.create_engine(url)
    with pytest.raises(sqlalchemy.exc.OperationalError) as info:
        engine.connect()
    engine.dispose()
    message = str(info.value.orig)
    assert "?sslrootcert=/path/to/ca.pem in the SQLAlchemy URL, or PGSSLROOTCERT" in message
    assert "from ?sslrootcert= in the SQLAlchemy URL" in message


def test_a_plain_keyword_fix_is_in_keyword_words(
    server: PostgresServer, rogue_ca: CertificateAuthority, tmp_path: Path
) -> None:
    with pytest.raises(safepg.UntrustedCertificateError) as info:
        safepg.connect(server.conninfo(), sslrootcert=_rogue_file(rogue_ca, tmp_path))
    assert "sslrootcert=/path/to/ca.pem, or PGSSLROOTCERT" in str(info.value)


DJANGO = """
import json, logging, sys
import django
from django.conf import settings

server, rogue = json.loads(sys.argv[1]), sys.argv[2]
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="LOG %(message)s")
settings.configure(DATABASES={
    alias: {
        "ENGINE": "safepg.django", "NAME": server["dbname"], "USER": server["user"],
        "PASSWORD": server["password"], "HOST": server["host"], "PORT": server["port"],
        "OPTIONS": options,
    }
    for alias, options in {
        "default": {"sslrootcert": server["ca"], "sslmode": "require"},
        "rogue": {"sslrootcert": rogue},
        "pooled": {
            "sslrootcert": server["ca"], "sslmode": "verify-ca",
            "pool": {"min_size": 0, "max_size": 1},
        },
    }.items()
})
django.setup()
from django.db import connections
connections["default"].ensure_connection()
try:
    connections["rogue"].ensure_connection()
except Exception as ex:
    print("ERROR", ex.__cause__)
connections["pooled"].ensure_connection()
connections["pooled"].close_pool()
"""


def test_django_options_are_named_as_settings_spells_them(
    server: PostgresServer, rogue_ca: CertificateAuthority, tmp_path: Path
) -> None:
    details = {
        "dbname": server.dbname,
        "user": server.user,
        "password": server.password,
        "host": server.host,
        "port": str(server.port),
        "ca": str(server.ca_path),
    }
    rogue = _rogue_file(rogue_ca, tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DJANGO), json.dumps(details), rogue],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert 'sslmode=require (from OPTIONS["sslmode"] in settings.DATABASES) raised' in out, out
    # The pool's connections, opened in its own threads, too.
    assert 'sslmode=verify-ca (from OPTIONS["sslmode"] in settings.DATABASES) raised' in out, out
    assert (
        'OPTIONS["sslrootcert"] = "/path/to/ca.pem" in settings.DATABASES, or PGSSLROOTCERT' in out
    )
    assert 'sslrootcert from OPTIONS["sslrootcert"] in settings.DATABASES' in out, out
    assert "keyword argument" not in out


def test_the_django_mismatch_fix_names_options(server: PostgresServer, tmp_path: Path) -> None:
    code = """
import json, sys
import django
from django.conf import settings
server = json.loads(sys.argv[1])
settings.configure(DATABASES={"default": {
    "ENGINE": "safepg.django", "NAME": server["dbname"], "USER": server["user"],
    "PASSWORD": server["password"], "HOST": "wrong.example", "PORT": server["port"],
    "OPTIONS": {"sslrootcert": server["ca"], "hostaddr": "127.0.0.1"},
}})
django.setup()
from django.db import connection
try:
    connection.ensure_connection()
except Exception as ex:
    print(type(ex.__cause__).__name__, ex.__cause__)
"""
    details = {
        "dbname": server.dbname,
        "user": server.user,
        "password": server.password,
        "port": str(server.port),
        "ca": str(server.ca_path),
    }
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(details)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HostnameMismatchError"), result.stdout
    assert 'OPTIONS["verify_as"] = "the.name.in.the.certificate"' in result.stdout
    assert "connect(..., verify_as=" not in result.stdout
