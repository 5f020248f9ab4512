"""psycopg_pool through safepg: concurrent load, replacement connections, failing closed."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import PoolTimeout

import safepg
from safepg import HostnameMismatchError, UntrustedCertificateError
from safepg.pool import AsyncConnectionPool, ConnectionPool, verified_class
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop


def test_concurrent_load(server: PostgresServer) -> None:
    pids: set[int] = set()
    with ConnectionPool(server.conninfo(), min_size=4, max_size=8, open=True) as pool:

        def worker(n: int) -> int:
            for i in range(50):
                with pool.connection() as conn:
                    row = conn.execute("SELECT %s::int, pg_backend_pid()", [n * 100 + i]).fetchone()
                    assert row is not None
                    assert row[0] == n * 100 + i
                    pids.add(row[1])
                    if i == 0:
                        assert safepg.check(conn).verified
            return n

        with ThreadPoolExecutor(32) as executor:
            assert sorted(executor.map(worker, range(32))) == list(range(32))
        stats = pool.get_stats()
    assert stats.get("requests_errors", 0) == 0
    assert stats.get("connections_errors", 0) == 0
    assert 1 <= len(pids) <= 8


def test_pool_keeps_psycopg_options(server: PostgresServer) -> None:
    with (
        ConnectionPool(
            server.conninfo(),
            kwargs={"autocommit": True, "row_factory": dict_row, "application_name": "pooled"},
            min_size=1,
            open=True,
        ) as pool,
        pool.connection() as conn,
    ):
        assert type(conn).__name__ == "VerifiedConnection"
        assert isinstance(conn, psycopg.Connection)
        assert conn.autocommit
        row: Any = conn.execute("SHOW application_name").fetchone()  # dict_row, set via kwargs
        assert row == {"application_name": "pooled"}


def test_replacement_connections_fail_closed(
    server: PostgresServer,
    certs: CertificateShop,
    rogue_ca: CertificateAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with ConnectionPool(
        server.conninfo(), min_size=1, max_size=1, open=True, reconnect_timeout=60
    ) as pool:
        with pool.connection() as conn:
            assert safepg.check(conn).verified
        certs.present("localhost", ip_addresses=["127.0.0.1"], ca=rogue_ca)  # a MITM now
        with pool.connection() as conn:
            conn.close()  # broken: the pool must open a replacement, through safepg
        with caplog.at_level(logging.WARNING, logger="psycopg.pool"), pytest.raises(PoolTimeout):
            pool.getconn(timeout=1.5)
    assert "does not chain to a trusted root" in caplog.text
    assert server.password not in caplog.text
    # The connection class the pool uses raises safepg's error class.
    with pytest.raises(UntrustedCertificateError):
        pool.connection_class.connect(server.conninfo())


def test_verified_class_keeps_a_custom_connection_class(
    server: PostgresServer, certs: CertificateShop
) -> None:
    class MyConnection(psycopg.Connection[Any]):
        marker = "mine"

    cls = verified_class(MyConnection)
    with cls.connect(server.conninfo()) as conn:
        assert isinstance(conn, MyConnection)
        assert conn.marker == "mine"
        assert safepg.check(conn).verified
    certs.present("other.example")
    with pytest.raises(HostnameMismatchError):
        cls.connect(server.conninfo())


def test_async_pool(server: PostgresServer) -> None:
    async def main() -> int:
        async with AsyncConnectionPool(server.conninfo(), min_size=2, max_size=4) as pool:

            async def worker(n: int) -> int:
                total = 0
                for i in range(20):
                    async with pool.connection() as conn:
                        cur = await conn.execute("SELECT %s::int", [i])
                        row = await cur.fetchone()
                        assert row is not None
                        total += row[0]
                        if i == 0:
                            assert (await safepg.check_async(conn)).verified
                return total

            return sum(await asyncio.gather(*(worker(n) for n in range(8))))

    assert asyncio.run(main()) == 8 * sum(range(20))
