"""Tokens from password callables through psycopg2 and asyncpg: refused tokens are
`TokenRejectedError` in the driver's own class, and no error holds the token anywhere an error
reporter looks (messages, reprs, the locals of every frame of every chained error)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import secrets
from typing import Any

import pytest

import safepg
from safepg.testing import PostgresServer

from .conftest import CertificateShop
from .test_password_callable import all_text, role, set_password

__all__ = ["role"]  # the fixture, shared

DRIVERS = ["psycopg2", "asyncpg"]


def _connect(driver: str, server: PostgresServer, user: str, password: Any, **kw: Any) -> Any:
    """A connection through safepg's module for *driver*, closed again; the error otherwise."""
    if driver == "psycopg2":
        pytest.importorskip("psycopg2")
        importlib.import_module("safepg.psycopg2").connect(
            server.conninfo(user=user, password=None, **kw), password=password
        ).close()
        return None
    pytest.importorskip("asyncpg")
    driver_module = importlib.import_module("safepg.asyncpg")

    async def main() -> None:
        conn = await driver_module.connect(
            host=kw.get("host", server.host),
            port=server.port,
            user=user,
            database=server.dbname,
            sslrootcert=str(server.ca_path),
            password=password,
        )
        await conn.close()

    asyncio.run(main())
    return None


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_rejected_token_is_the_drivers_error_and_says_what_to_check(
    server: PostgresServer, role: str, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    set_password(server, role, "something-else-" + secrets.token_hex(8))
    with caplog.at_level(logging.DEBUG), pytest.raises(safepg.TokenRejectedError) as info:
        _connect(driver, server, role, lambda: token)
    err = info.value
    ours = importlib.import_module(f"safepg.{driver}")
    assert type(err) is ours.TokenRejectedError
    if driver == "psycopg2":
        assert isinstance(err, importlib.import_module("psycopg2").OperationalError)
    else:
        assert isinstance(err, importlib.import_module("asyncpg").InvalidPasswordError)
        assert err.sqlstate == "28P01"
    assert "password authentication failed" in str(err)
    assert "this host, port and user" in str(err)
    assert token not in all_text(err)
    assert token not in caplog.text


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_token_is_in_no_frame_of_a_tls_failure(
    server: PostgresServer, certs: CertificateShop, role: str, driver: str
) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    set_password(server, role, token)
    certs.present("other.example")
    with pytest.raises(safepg.HostnameMismatchError) as info:
        _connect(driver, server, role, lambda: token)
    assert token not in all_text(info.value)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_token_is_in_no_frame_of_a_refused_connection(
    server: PostgresServer, role: str, driver: str
) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    with pytest.raises(Exception) as info:  # noqa: PT011 - whatever the driver raises
        _connect(driver, server, role, lambda: token, host="name.invalid")
    assert token not in all_text(info.value)


def test_without_frames_follows_both_chains() -> None:
    from safepg._password import without_frames

    def fail() -> None:
        try:
            raise KeyError("context")
        except KeyError:
            raise RuntimeError("raised") from ValueError("cause")

    with pytest.raises(RuntimeError) as info:
        fail()
    err = without_frames(info.value)
    assert err.__cause__ is not None
    assert err.__context__ is not None
    assert err.__cause__ is not err.__context__
    assert err.__traceback__ is None
    assert err.__context__.__traceback__ is None  # the one a single chain would miss


@pytest.mark.parametrize("driver", ["psycopg", *DRIVERS])
def test_a_refused_token_is_in_no_frame_of_the_error(
    server: PostgresServer, role: str, driver: str
) -> None:
    # A token with one character libpq cannot take (NUL) is refused before connecting; the
    # rest of it is still a secret.
    token = "tok-" + secrets.token_urlsafe(24)

    def connect() -> None:
        if driver == "psycopg":
            safepg.connect(server.conninfo(user=role, password=None), password=lambda: token + "\0")
        else:
            _connect(driver, server, role, lambda: token + "\0")

    with pytest.raises(safepg.ConfigurationError) as info:
        connect()
    assert token not in all_text(info.value)
