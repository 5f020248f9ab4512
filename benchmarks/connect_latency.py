"""Connect latency: raw psycopg at each sslmode against safepg, under both psycopg implementations.

Starts a throwaway TLS PostgreSQL (safepg.testing), then, for each psycopg implementation, runs N
interleaved rounds of every case and prints the median and p90 connect time and the ratio to
raw ``sslmode=require``. It also times ``import safepg`` against ``import psycopg``::

    .venv/bin/python benchmarks/connect_latency.py [-n 200]

Cases (the "big bundle" is certifi plus the server's CA: what safepg resolves by default):
    raw disable / raw require      psycopg.connect, no verification
    raw verify-full, 1 CA          psycopg.connect with the server's CA only
    raw verify-full, big bundle    psycopg.connect with the big bundle
    raw, safepg's warm params      psycopg.connect given safepg's final parameters, warm
    safepg cold, big bundle        safepg.connect to a host it has not learned: what it learned,
                                   in memory and on disk, is cleared before each sample. libpq
                                   gets the full set, and safepg learns from the session (no
                                   probe). Parsing the trust set (5-7 ms for 118 certificates,
                                   once per process) is not included: it is reported apart.
    safepg warm, big bundle        safepg.connect once the host is learned (the fast path)
    safepg, fast path off          safepg.connect(..., fast_path=False): libpq reads the bundle
The wrapper overhead is "safepg warm" against "raw, safepg's warm params". safepg's own Python
work per warm connect (hardening, the fast path's cache lookup, the post-connect check) is
timed as the connect less the time inside psycopg's own connect: back to back, and in the flow of
real connects (caches cold after each handshake). The goals of issue #13 are checked at the end
of each table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    from safepg import _fastpath

    cache = Path(os.environ["SAFEPG_CACHE_DIR"])

    def cold() -> object:
        _fastpath.clear_memory(keep_indexes=True)
        for learned in cache.iterdir():
            learned.unlink()
        return safepg.connect(conninfo, sslrootcert=bundle)

    safepg.connect(conninfo, sslrootcert=bundle).close()  # the first contact teaches
    with safepg.connect(conninfo, sslrootcert=bundle) as conn:
        small = safepg.check(conn).trust
    if small is None or "narrowed" not in small.label:
        raise SystemExit(f"the fast path did not engage: {small}")
    kept = Path(tempfile.mkdtemp(), "small.pem")  # the cold case empties the cache
    shutil.copyfile(small.path, kept)
    final = safepg.secure_conninfo(conninfo, sslrootcert=str(kept))
    return {
        "raw disable": lambda: psycopg.connect(conninfo, sslmode="disable"),
        "raw require": lambda: psycopg.connect(conninfo, sslmode="require"),
        "raw verify-full, 1 CA": lambda: psycopg.connect(
            conninfo, sslmode="verify-full", sslrootcert=ca
        ),
        "raw verify-full, big bundle": lambda: psycopg.connect(
            conninfo, sslmode="verify-full", sslrootcert=bundle
        ),
        "raw, safepg's warm params": lambda: psycopg.connect(final),
        "safepg cold, big bundle": cold,
        "safepg warm, big bundle": lambda: safepg.connect(conninfo, sslrootcert=bundle),
        "safepg, fast path off": lambda: safepg.connect(
            conninfo, sslrootcert=bundle, fast_path=False
        ),
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

    from safepg import _fastpath, _x509

    own_flow = _own_work(conninfo, bundle, rounds)
    parse = []
    for _ in range(20):
        _fastpath.clear_memory()
        _x509.read_certificates.cache_clear()
        t0 = time.perf_counter()
        _fastpath._index(bundle)
        parse.append(time.perf_counter() - t0)
    result = {"impl": psycopg.pq.__impl__, "libpq": psycopg.pq.version(), "times": times}
    own_hot = _own_work(conninfo, bundle, rounds, opener_only=True)
    print(json.dumps({**result, "index": statistics.median(parse), "own": [own_hot, own_flow]}))


def _own_work(conninfo: str, bundle: str, rounds: int, opener_only: bool = False) -> float:
    """Median time safepg spends outside psycopg's connect, per warm connect (seconds).

    With *opener_only*, no connection is made: the opener returns the same open connection,
    so safepg's steps run back to back, as in a tight loop; otherwise each is a real connect.
    """
    import psycopg

    from safepg import _connect

    spent: list[float] = []
    kept = psycopg.connect(safepg_conninfo(conninfo, bundle))

    def opener(**params: object) -> psycopg.Connection[object]:
        t0 = time.perf_counter()
        conn = kept if opener_only else psycopg.Connection.connect(**params)  # type: ignore[arg-type]
        spent.append(time.perf_counter() - t0)
        return conn

    own = []
    for _ in range(max(rounds, 200) if opener_only else rounds):
        spent.clear()
        t0 = time.perf_counter()
        conn = _connect.open_verified(
            opener, conninfo, {"sslrootcert": bundle}, allow_unencrypted_unix_socket=False,
            fast_path=None,
        )  # fmt: skip
        own.append(time.perf_counter() - t0 - sum(spent))
        if not opener_only:
            conn.close()
    kept.close()
    return statistics.median(own)


def safepg_conninfo(conninfo: str, bundle: str) -> str:
    import safepg

    return safepg.secure_conninfo(conninfo, sslrootcert=bundle)


def import_cost(env: dict[str, str], runs: int = 15) -> tuple[float, float]:
    """Median wall time of a fresh interpreter importing psycopg, and psycopg plus safepg.

    Bytecode caches are allowed, as for an installed package (pip compiles on install), even
    where PYTHONDONTWRITEBYTECODE is set: otherwise every run compiles safepg from source.
    """
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    times: dict[str, list[float]] = {"psycopg": [], "psycopg, safepg": []}
    subprocess.run([sys.executable, "-c", "import psycopg, safepg"], env=env, check=True)
    for _ in range(runs):
        for modules in times:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {modules}"], env=env, check=True)
            times[modules].append(time.perf_counter() - t0)
    return statistics.median(times["psycopg"]), statistics.median(times["psycopg, safepg"])


def _verdict(met: bool) -> str:
    return "met" if met else "NOT MET"


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
            env["SAFEPG_CACHE_DIR"] = str(Path(tmp, f"cache-{impl}"))
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
            overhead = statistics.median(t["safepg warm, big bundle"]) / statistics.median(
                t["raw, safepg's warm params"]
            )
            print(f"  wrapper overhead (safepg warm vs raw with the same params): {overhead:.3f}x")
            hot, flow = result["own"]
            print(
                f"  safepg's own work per warm connect: {hot * 1e6:.0f} us back to back, "
                f"{flow * 1e6:.0f} us in the flow of real connects"
            )
            warm = statistics.median(t["safepg warm, big bundle"]) / base
            cold = statistics.median(t["safepg cold, big bundle"]) / base
            print(f"  goal: warm <= 1.05x require: {warm:.2f}x, {_verdict(warm <= 1.05)}")
            print(f"  goal: own work <= 50 us (back to back): {_verdict(hot <= 50e-6)}")
            if result["libpq"] >= 170000:
                verdict = _verdict(cold <= 1.5)
                print(f"  goal: cold <= 1.5x require (libpq 17+): {cold:.2f}x, {verdict}")
            print(f"  parsing the big bundle, once per process: {result['index'] * 1000:.1f}ms")
            bare, with_safepg = import_cost(env)
            print(f"  import safepg adds {(with_safepg - bare) * 1000:.1f}ms to import psycopg\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
