"""A psycopg_pool pool whose every connection is verified by safepg (``safepg-tls[pool]``).

Run it against your own database::

    python examples/pool.py "host=db.example.com dbname=app user=app"

With no argument it starts a throwaway TLS server (needs ``safepg-tls[testing]`` and PostgreSQL's
server binaries).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import safepg
from safepg.pool import ConnectionPool


def run(conninfo: str) -> int:
    # psycopg_pool's own pool: every argument works as documented there. Connections the pool
    # opens later, to replace broken or expired ones, are verified too.
    with ConnectionPool(conninfo, min_size=2, max_size=4, open=True) as pool:

        def query(n: int) -> int:
            with pool.connection() as conn:
                row = conn.execute("SELECT %s::int * 2", [n]).fetchone()
                return row[0] if row else -1

        with ThreadPoolExecutor(8) as executor:
            print("sum:", sum(executor.map(query, range(100))))
        with pool.connection() as conn:
            print(safepg.check(conn).summary)
    return 0


def main() -> int:
    if len(sys.argv) > 1:
        return run(sys.argv[1])
    from safepg.testing import PostgresServer

    with PostgresServer() as server:
        return run(server.conninfo())


if __name__ == "__main__":
    sys.exit(main())
