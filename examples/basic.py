"""Connect with safepg, see how the session is protected, and handle the errors.

Run it against your own database::

    python examples/basic.py "postgresql://app:secret@db.example.com/app"

With no argument it starts a throwaway TLS server (needs ``safepg-tls[testing]`` and PostgreSQL's
server binaries) so that it runs anywhere.
"""

from __future__ import annotations

import sys

import psycopg

import safepg


def show(conninfo: str) -> int:
    try:
        with safepg.connect(conninfo) as conn:
            # A real psycopg.Connection: use it as you always have.
            version = conn.execute("SELECT version()").fetchone()
            print(version[0] if version else "?")
            # How the session is protected, from libpq's side and the server's (pg_stat_ssl).
            print(safepg.check(conn))
    except safepg.HostnameMismatchError as ex:
        print(f"wrong server name: {ex}", file=sys.stderr)
        return 2
    except safepg.UntrustedCertificateError as ex:  # includes CertificateExpiredError
        print(f"untrusted server: {ex}", file=sys.stderr)
        return 2
    except safepg.ConfigurationError as ex:
        print(f"cannot be made safe: {ex}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as ex:  # authentication, refused, timeout...
        print(f"connection failed: {ex}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    if len(sys.argv) > 1:
        return show(sys.argv[1])
    from safepg.testing import PostgresServer

    with PostgresServer() as server:
        return show(server.conninfo())


if __name__ == "__main__":
    sys.exit(main())
