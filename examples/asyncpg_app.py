"""asyncpg through safepg: a verified connection, a verified pool, and the errors to expect.

Run it against your own database::

    python examples/asyncpg_app.py "postgresql://app:secret@db.example.com/app"

With no argument it starts a throwaway TLS server (needs ``safepg-tls[testing,asyncpg]`` and
PostgreSQL's server binaries) so that it runs anywhere.
"""

from __future__ import annotations

import asyncio
import sys

import safepg
import safepg.asyncpg


async def show(dsn: str) -> int:
    try:
        # asyncpg's own connection, opened with ssl= a verify-full context.
        conn = await safepg.asyncpg.connect(dsn)
        try:
            print(await conn.fetchval("SELECT version()"))
            # The server's view of this session (safepg checked the client's before returning).
            row = await conn.fetchrow(
                "SELECT version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
            print(f"verified {row['version']} ({row['cipher']})")
        finally:
            await conn.close()
        # Every connection the pool opens, now or later, goes through safepg.asyncpg.connect.
        async with safepg.asyncpg.create_pool(dsn, min_size=2, max_size=4) as pool:
            total = await pool.fetchval("SELECT sum(x) FROM generate_series(1, 10) AS x")
            print(f"verified pool: sum = {total}")
    except safepg.HostnameMismatchError as ex:
        print(f"wrong server name: {ex}", file=sys.stderr)
        return 2
    except safepg.UntrustedCertificateError as ex:  # includes CertificateExpiredError
        print(f"untrusted server: {ex}", file=sys.stderr)
        return 2
    except safepg.ConfigurationError as ex:
        print(f"cannot be made safe: {ex}", file=sys.stderr)
        return 2
    except safepg.ConnectionSecurityError as ex:  # no TLS, a protocol violation
        print(f"refused: {ex}", file=sys.stderr)
        return 2
    except OSError as ex:  # refused, unreachable, timed out (asyncpg's own errors)
        print(f"connection failed: {ex}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    if len(sys.argv) > 1:
        return asyncio.run(show(sys.argv[1]))
    from safepg.testing import PostgresServer

    with PostgresServer() as server:
        return asyncio.run(show(server.url()))


if __name__ == "__main__":
    sys.exit(main())
