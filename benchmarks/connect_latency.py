"""Connect latency: raw psycopg at each sslmode against safepg, under both psycopg implementations.

Starts a throwaway TLS PostgreSQL (safepg.testing), then, for each psycopg implementation, runs N
interleaved rounds of every case and prints the median and p90 connect time and the ratio to
raw ``sslmode=require``::

    .venv/bin/python benchmarks/connect_latency.py [-n 300]

Cases:
    raw disable / raw require      psycopg.connect, no verification
    raw verify-full, 1 CA          psycopg.connect with the server's CA only
    raw verify-full, big bundle    the same CA inside a certifi-sized bundle
    raw, safepg's params           psycopg.connect given safepg's final parameters (1 CA)
    safepg, 1 CA                   safepg.connect (wrapper overhead = this vs. the row above)
    safepg, big bundle             safepg.connect trusting the big bundle
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import certifi


def _cases(conninfo: str, ca: str, bundle: str) -> dict[str, Callable[[], object]]:
    import psycopg

    import safepg

    final = safepg.secure_conninfo(conninfo, sslrootcert=ca)
    return {
        "raw disable": lambda: psycopg.connect(conninfo, sslmode="disable"),
        "raw require": lambda: psycopg.connect(conninfo, sslmode="require"),
        "raw verify-full, 1 CA": lambda: psycopg.connect(
            conninfo, sslmode="verify-full", sslrootcert=ca
        ),
        "raw verify-full, big bundle": lambda: psycopg.connect(
            conninfo, sslmode="verify-full", sslrootcert=bundle
        ),
        "raw, safepg's params": lambda: psycopg.connect(final),
        "safepg, 1 CA": lambda: safepg.connect(conninfo, sslrootcert=ca),
        "safepg, big bundle": lambda: safepg.connect(conninfo, sslrootcert=bundle),
    }


def child(conninfo: str, ca: str, bundle: str, rounds: int) -> None:
    """Measure in this process (one psycopg implementation) and print JSON timings."""
    cases = _cases(conninfo, ca, bundle)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up: imports, first handshake, page cache
        for _ in range(5):
            fn().close()  # type: ignore[attr-defined]
    for _ in range(rounds):
        for name, fn in cases.items():  # interleaved, so drift hits every case alike
            t0 = time.perf_counter()
            conn = fn()
            times[name].append(time.perf_counter() - t0)
            conn.close()  # type: ignore[attr-defined]
    import psycopg

    print(json.dumps({"impl": psycopg.pq.__impl__, "libpq": psycopg.pq.version(), "times": times}))


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=200)
    parser.add_argument("--child", nargs=3, metavar=("CONNINFO", "CA", "BUNDLE"))
    args = parser.parse_args()
    if args.child:
        conninfo, ca, bundle = args.child
        child(conninfo, ca, bundle, args.rounds)
        return 0

    from safepg.testing import PostgresServer

    with PostgresServer() as server, tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp, "bundle.pem")
        bundle.write_bytes(Path(certifi.where()).read_bytes() + server.ca.cert_pem)
        conninfo = server.conninfo(sslrootcert=None)
        print(f"PostgreSQL {server.major_version} on 127.0.0.1, {args.rounds} rounds per case")
        print(f"big bundle: {bundle.read_bytes().count(b'BEGIN CERTIFICATE')} certificates\n")
        for impl in ("binary", "python"):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SSL_CERT_"))}
            env["PSYCOPG_IMPL"] = impl
            out = subprocess.run(
                [sys.executable, __file__, "-n", str(args.rounds), "--child", conninfo,
                 str(server.ca_path), str(bundle)],
                capture_output=True, text=True, env=env, check=False,
            )  # fmt: skip
            if out.returncode:
                print(f"{impl}: failed\n{out.stderr}")
                continue
            result = json.loads(out.stdout)
            base = statistics.median(result["times"]["raw require"])
            print(f"psycopg {result['impl']}, libpq {result['libpq']}")
            print(f"  {'case':<30} {'median':>9} {'p90':>9} {'vs require':>11}")
            for name, values in result["times"].items():
                med = statistics.median(values)
                print(
                    f"  {name:<30} {med * 1000:>7.2f}ms {_p90(values) * 1000:>7.2f}ms "
                    f"{med / base:>10.2f}x"
                )
            t = result["times"]
            overhead = statistics.median(t["safepg, 1 CA"]) / statistics.median(
                t["raw, safepg's params"]
            )
            print(f"  wrapper overhead (safepg vs raw with the same params): {overhead:.3f}x\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
