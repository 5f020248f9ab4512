"""A mistyped option is named, the same way on every path, without echoing a possible secret."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

import safepg
from safepg import _cli
from safepg._typos import libpq_keywords, may_hold_secret, near_miss

SUGGESTION = 'did you mean "sslrootcert"?'
HOST = "db.example.com"  # never dialled: every case is refused before any I/O


def test_near_miss() -> None:
    assert near_miss("sslrootcrt") == "sslrootcert"
    assert near_miss("SSLMODE") == "sslmode"
    assert near_miss("hostadr") == "hostaddr"
    assert near_miss("applicationname") == "application_name"
    assert near_miss("sslrootcert") is None  # a keyword is no typo
    assert near_miss("S3cretXYZ") is None
    assert near_miss("databse", known=["database"]) == "database"
    assert "sslrootcert" in libpq_keywords()


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("host=db.example.com nosuchoption=1", False),
        ("postgresql://app@db.example.com/app?sslrootcrt=x", False),
        ("host=db.example.com password=x nosuchoption=1", True),
        ("host=db.example.com sslpassword=x", True),
        ("postgresql://app:pw@db.example.com/app?sslrootcrt=x", True),
        ("postgresql://db.example.com/app?p%61ssword=x", True),
        ("host=db.example.com user='a b' x=1", True),
        ("host=db.example.com user=a\\ b", True),
    ],
)
def test_may_hold_secret(text: str, secret: bool) -> None:
    assert may_hold_secret(text) is secret


def _message(call: Callable[[], object]) -> str:
    with pytest.raises(safepg.ConfigurationError) as info:
        call()
    return str(info.value)


def _sqlalchemy(url: str) -> None:
    import safepg.sqlalchemy

    with safepg.sqlalchemy.create_engine(url).connect():
        pass


def _asyncpg(dsn: str | None, **kwargs: Any) -> None:
    import safepg.asyncpg

    asyncio.run(safepg.asyncpg.connect(dsn, **kwargs))


def _psycopg2(dsn: str | None = None, **kwargs: Any) -> None:
    import safepg.psycopg2

    safepg.psycopg2.connect(dsn, **kwargs)


def _sqlalchemy_message(url: str) -> str:
    import sqlalchemy.exc

    with pytest.raises(sqlalchemy.exc.OperationalError) as info:
        _sqlalchemy(url)
    assert isinstance(info.value.orig, safepg.ConfigurationError)
    return str(info.value.orig)


# (how the typo is given, the call) -> the message. "shown": the typo itself may be named.
PATHS: list[tuple[str, bool, Callable[[], str]]] = [
    ("conninfo", True, lambda: _message(lambda: safepg.connect(f"host={HOST} sslrootcrt=x"))),
    (
        "URL query",
        True,
        lambda: _message(lambda: safepg.connect(f"postgresql://{HOST}/app?sslrootcrt=x")),
    ),
    ("keyword", True, lambda: _message(lambda: safepg.connect(f"host={HOST}", sslrootcrt="x"))),
    (
        "secure_conninfo",
        True,
        lambda: _message(lambda: safepg.secure_conninfo(f"host={HOST} sslrootcrt=x")),
    ),
    ("psycopg2 DSN", True, lambda: _message(lambda: _psycopg2(f"host={HOST} sslrootcrt=x"))),
    ("psycopg2 keyword", True, lambda: _message(lambda: _psycopg2(host=HOST, sslrootcrt="x"))),
    (
        "asyncpg DSN",
        True,
        lambda: _message(lambda: _asyncpg(f"postgresql://{HOST}/app?sslrootcrt=x")),
    ),
    ("asyncpg keyword", True, lambda: _message(lambda: _asyncpg(None, host=HOST, sslrootcrt="x"))),
    ("SQLAlchemy URL", True, lambda: _sqlalchemy_message(f"postgresql://{HOST}/app?sslrootcrt=x")),
    # With a password in the string, the unknown name may be a piece of it: only the suggestion.
    (
        "conninfo with a password",
        False,
        lambda: _message(lambda: safepg.connect(f"host={HOST} password=pw sslrootcrt=x")),
    ),
    (
        "URL with a password",
        False,
        lambda: _message(lambda: safepg.connect(f"postgresql://u:pw@{HOST}/app?sslrootcrt=x")),
    ),
]


@pytest.mark.parametrize(("path", "shown", "call"), PATHS, ids=[p[0] for p in PATHS])
def test_every_path_names_the_near_miss(path: str, shown: bool, call: Callable[[], str]) -> None:
    message = call()
    assert message.startswith("invalid connection parameters: unknown option"), message
    assert message.endswith(SUGGESTION), message
    assert ('"sslrootcrt"' in message) is shown, message


def test_django_options_name_the_near_miss() -> None:
    code = f"""
        import django
        from django.conf import settings
        settings.configure(DATABASES={{"default": {{
            "ENGINE": "safepg.django", "NAME": "app", "HOST": "{HOST}",
            "OPTIONS": {{"sslrootcrt": "x"}},
        }}}})
        django.setup()
        from django.db import connection
        try:
            connection.ensure_connection()
        except Exception as ex:
            print(type(ex.__cause__).__name__, ex.__cause__)
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        'ConfigurationError invalid connection parameters: unknown option "sslrootcrt"; '
        + SUGGESTION
    )


def test_cli_names_the_near_miss(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["check", f"postgresql://u:pw@{HOST}/app?sslrootcrt=x"]) == 2
    err = capsys.readouterr().err
    assert "unknown option; " + SUGGESTION in err
    assert "sslrootcrt" not in err


@pytest.mark.parametrize(
    "conninfo",
    [
        # The security decision: with a password in the string, an unknown "option" may be a
        # piece of it (a badly quoted value), so it is never shown.
        f"host={HOST} password=pw S3cretXYZ=1",
        f"host={HOST} password=pw S3cretXYZ",
        f"host={HOST} password='pw S3cretXYZ=1",
        f"postgresql://u:pw S3cretXYZ@{HOST}/app?S3cretXYZ=1",
        f"postgresql://{HOST}/app?password=pw&S3cretXYZ=1",
        f"postgresql://{HOST}/app?p%61ssword=pw&S3cretXYZ=1",
    ],
)
def test_a_name_that_may_be_a_secret_is_not_shown(conninfo: str) -> None:
    message = _message(lambda: safepg.connect(conninfo))
    assert "S3cretXYZ" not in message, message


def test_an_unknown_name_without_a_secret_around_is_shown() -> None:
    message = _message(lambda: safepg.connect(f"host={HOST} nosuchoption=1"))
    assert 'unknown option "nosuchoption": libpq has no such keyword' in message
