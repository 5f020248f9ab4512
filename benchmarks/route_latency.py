"""One route for every driver: warm and fresh-process connect latency, psycopg, psycopg2, asyncpg.

Starts a throwaway TLS PostgreSQL (safepg.testing) on loopback. The "OS store" is certifi plus the
server's CA, named by SSL_CERT_FILE (a certifi-sized store, what safepg resolves by default); the
"1-cert file" is the server's CA alone. For each psycopg implementation (psycopg-binary's libpq,
and the system's with PSYCOPG_IMPL=python) it prints:

    warm: one process, the host learned, N interleaved rounds of every case; the median and p90
        per case, each against the same driver's raw ``sslmode=require`` and raw ``verify-full``
        with the same 1-cert file (asyncpg: an ``ssl.SSLContext`` of that file, made once).
    fresh: each sample is a new process whose user's cache already knows the host (a CLI run,
        a cron job, a serverless function of a fleet); only the first connect is timed, after
        the imports, against a new process's raw ``require`` connect, and its raw
        ``verify-full`` connect with the 1-cert file (what verifying costs libpq alone).
    own work: safepg's own Python work per warm psycopg connect (plan, route, post-connect
        step), the connect less the time inside psycopg's own connect: in the flow of real
        connects, and back to back on one open connection. Beside it, the floor: the file
        system calls that a warm connect's checks make (the trust file, libpq's default root
        and CRL, the small trust file and each directory above it), timed alone in the flow.

::

    .venv/bin/python benchmarks/route_latency.py [-n 200] [--fresh 25] [--impl binary,python]

Run from the checkout, with its .venv (``scripts/dev setup``), or with
``safepg-tls[binary,testing,psycopg2,asyncpg]`` installed.

The goals of issue #21 are checked at the end of each table. Medians move with the machine's
load: compare figures of one run, and run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import certifi

WARM = (
    ("psycopg", "raw require"),
    ("psycopg", "raw verify-full, 1-cert file"),
    ("psycopg", "safepg, 1-cert file"),
    ("psycopg", "safepg, OS store"),
    ("psycopg2", "raw require"),
    ("psycopg2", "raw verify-full, 1-cert file"),
    ("psycopg2", "safepg, 1-cert file"),
    ("psycopg2", "safepg, OS store"),
    ("asyncpg", "raw verify-full, 1-cert file"),
    ("asyncpg", "safepg, 1-cert file"),
)
FRESH = (
    ("psycopg", "raw require"),
    ("psycopg", "raw verify-full, 1-cert file"),
    ("psycopg", "safepg, OS store, known host"),
    ("psycopg2", "raw require"),
    ("psycopg2", "raw verify-full, 1-cert file"),
    ("psycopg2", "safepg, OS store, known host"),
)


def _opener(driver: str, case: str, conninfo: str, ca: str) -> Callable[[], Any]:
    if driver == "psycopg":
        import psycopg

        import safepg

        if case == "raw require":
            return lambda: psycopg.connect(conninfo, sslmode="require", gssencmode="disable")
        if case.startswith("raw verify-full"):
            return lambda: psycopg.connect(conninfo, sslmode="verify-full", sslrootcert=ca)
        if case.startswith("safepg, 1-cert"):
            return lambda: safepg.connect(conninfo, sslrootcert=ca)
        return lambda: safepg.connect(conninfo)  # the OS store, from SSL_CERT_FILE
    if driver == "psycopg2":
        import psycopg2

        import safepg.psycopg2

        if case == "raw require":
            return lambda: psycopg2.connect(conninfo, sslmode="require", gssencmode="disable")
        if case.startswith("raw verify-full"):
            return lambda: psycopg2.connect(conninfo, sslmode="verify-full", sslrootcert=ca)
        if case.startswith("safepg, 1-cert"):
            return lambda: safepg.psycopg2.connect(conninfo, sslrootcert=ca)
        return lambda: safepg.psycopg2.connect(conninfo)
    return _asyncpg_opener(case, conninfo, ca)


def _asyncpg_opener(case: str, conninfo: str, ca: str) -> Callable[[], Any]:
    import ssl

    import asyncpg
    from psycopg.conninfo import conninfo_to_dict

    import safepg.asyncpg

    params = conninfo_to_dict(conninfo)
    loop = asyncio.new_event_loop()
    if case.startswith("raw"):
        ctx = ssl.create_default_context(cafile=ca)  # verify-full: chain and host name
        kwargs = {
            "host": params["host"],
            "port": int(str(params["port"])),
            "user": params["user"],
            "password": params.get("password"),
            "database": params.get("dbname"),
            "ssl": ctx,
        }

        def raw() -> Any:
            return loop.run_until_complete(asyncpg.connect(**kwargs))

        return raw

    def safe() -> Any:
        return loop.run_until_complete(safepg.asyncpg.connect(conninfo, sslrootcert=ca))

    return safe


def _close(driver: str, conn: Any) -> None:
    if driver == "asyncpg":
        asyncio.get_event_loop_policy()  # the loop of the opener closes it
        conn.terminate()
    else:
        conn.close()


def child_warm(conninfo: str, ca: str, rounds: int) -> None:
    import psycopg
    import psycopg2.extensions

    openers = {(d, c): _opener(d, c, conninfo, ca) for d, c in WARM}
    times: dict[str, list[float]] = {f"{d}|{c}": [] for d, c in WARM}
    for (driver, _case), fn in openers.items():  # warm-up: imports, and safepg learns the host
        for _ in range(5):
            _close(driver, fn())
        time.sleep(0.05)  # let a background probe (psycopg2's first contact) finish
    for _ in range(rounds):
        for (driver, case), fn in openers.items():  # interleaved: drift hits every case alike
            t0 = time.perf_counter()
            conn = fn()
            times[f"{driver}|{case}"].append(time.perf_counter() - t0)
            _close(driver, conn)
    own_flow = _own_work(conninfo, rounds, opener_only=False)
    own_hot = _own_work(conninfo, rounds, opener_only=True)
    floor = _checks_floor(conninfo, rounds)
    print(
        json.dumps(
            {
                "impl": psycopg.pq.__impl__,
                "libpq": psycopg.pq.version(),
                "psycopg2_libpq": psycopg2.extensions.libpq_version(),
                "times": times,
                "own": [own_flow, own_hot, floor],
            }
        )
    )


def _own_work(conninfo: str, rounds: int, opener_only: bool) -> float:
    """Median seconds safepg spends outside psycopg's connect per warm connect (OS store)."""
    import psycopg

    import safepg
    from safepg import _connect

    spent: list[float] = []
    kept = psycopg.connect(safepg.secure_conninfo(conninfo))

    def opener(**params: Any) -> Any:
        t0 = time.perf_counter()
        conn = kept if opener_only else psycopg.Connection.connect(**params)
        spent.append(time.perf_counter() - t0)
        return conn

    own = []
    for _ in range(max(rounds, 200) if opener_only else rounds):
        spent.clear()
        t0 = time.perf_counter()
        conn = _connect.open_verified(
            opener, conninfo, {}, allow_unencrypted_unix_socket=False, fast_path=None
        )
        own.append(time.perf_counter() - t0 - sum(spent))
        if not opener_only:
            conn.close()
    kept.close()
    return statistics.median(own)


def _checks_floor(conninfo: str, rounds: int) -> float:
    """Median seconds of the file system calls a warm connect's checks make, alone, each
    time right after a real connect (as they run in the flow): stat of the trust file (twice:
    the plan and the route), of libpq's default root.crt and root.crl, and lstat of the small
    trust file and of every directory from / down to it."""
    import psycopg

    import safepg
    from safepg import _trust

    with safepg.connect(conninfo) as conn:
        trust = safepg.check(conn).trust
    if trust is None or "narrowed" not in trust.label:
        raise SystemExit(f"the warm connect did not use a small trust file ({trust})")
    full = os.environ["SSL_CERT_FILE"]
    root = str(_trust.libpq_default_root())
    crl = root[: -len("root.crt")] + "root.crl"
    small = Path(trust.path)
    chain = [str(p) for p in reversed(small.parents)]
    secure = safepg.secure_conninfo(conninfo)
    spent = []
    for _ in range(rounds):
        psycopg.connect(secure).close()
        t0 = time.perf_counter()
        os.stat(full)
        os.path.exists(root)
        os.access(crl, os.F_OK)
        os.stat(full)
        os.lstat(small)
        for directory in chain:
            os.lstat(directory)
        spent.append(time.perf_counter() - t0)
    return statistics.median(spent)


def child_fresh(driver: str, case: str, conninfo: str, ca: str) -> None:
    """One connect in this new process, after the imports; prints its time and trust."""
    import psycopg  # noqa: F401 - imported before timing, as an application would
    import psycopg2  # noqa: F401

    import safepg
    import safepg.psycopg2

    fn = _opener(driver, case, conninfo, ca)
    t0 = time.perf_counter()
    conn = fn()
    elapsed = time.perf_counter() - t0
    if driver == "psycopg":
        trust = safepg.check(conn).trust if case.startswith("safepg") else None
        label = trust.label if trust else ""
    else:
        label = conn.get_dsn_parameters().get("sslrootcert", "")
    conn.close()
    if case.startswith("safepg") and "anchors-" not in label and "narrowed" not in label:
        raise SystemExit(f"{driver} {case}: the fresh process did not start warm ({label})")
    print(json.dumps({"s": elapsed}))


def _run(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode:
        raise SystemExit(f"child {args[:3]} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f} ms"


def _verdict(value: float, goal: float) -> str:
    return f"{value:.3f}x (goal <= {goal}x: {'met' if value <= goal else 'NOT MET'})"


def report(result: dict[str, Any], fresh: dict[str, list[float]]) -> None:
    times = {k: statistics.median(v) for k, v in result["times"].items()}
    p90 = {k: statistics.quantiles(v, n=10)[-1] for k, v in result["times"].items()}
    print(
        f"psycopg {result['impl']} (libpq {result['libpq']}), "
        f"psycopg2 (libpq {result['psycopg2_libpq']})"
    )
    print("| driver | case | median | p90 | vs require | vs raw verify-full, 1-cert |")
    print("|---|---|---:|---:|---:|---:|")
    for key, med in times.items():
        driver, case = key.split("|")
        req = times.get(f"{driver}|raw require")
        vf = times.get(f"{driver}|raw verify-full, 1-cert file")
        print(
            f"| {driver} | {case} | {_ms(med)} | {_ms(p90[key])} | "
            f"{f'{med / req:.3f}x' if req else '-'} | {f'{med / vf:.3f}x' if vf else '-'} |"
        )
    print()
    for driver in ("psycopg", "psycopg2"):
        ratio = times[f"{driver}|safepg, OS store"] / times[f"{driver}|raw require"]
        print(f"  goal: {driver} warm, OS store / require: {_verdict(ratio, 1.05)}")
    for driver in ("psycopg", "psycopg2", "asyncpg"):
        ratio = (
            times[f"{driver}|safepg, 1-cert file"] / times[f"{driver}|raw verify-full, 1-cert file"]
        )
        print(f"  goal: {driver} safepg / raw verify-full, same file: {_verdict(ratio, 1.02)}")
    if fresh:
        print(
            "\n| fresh process (first connect, after imports) | median | vs raw require "
            "| vs raw verify-full, 1-cert |"
        )
        print("|---|---:|---:|---:|")
        med = {k: statistics.median(v) for k, v in fresh.items()}
        for key, value in med.items():
            driver, case = key.split("|")
            req = med[f"{driver}|raw require"]
            vf = med[f"{driver}|raw verify-full, 1-cert file"]
            print(f"| {driver}: {case} | {_ms(value)} | {value / req:.3f}x | {value / vf:.3f}x |")
        for driver in ("psycopg", "psycopg2"):
            ratio = med[f"{driver}|safepg, OS store, known host"] / med[f"{driver}|raw require"]
            print(f"  goal: {driver} fresh process, known host / require: {_verdict(ratio, 1.1)}")
    flow, hot, floor = result["own"]
    print(
        f"\n  safepg's own work per warm psycopg connect (OS store): {flow * 1e6:.0f} us in the "
        f"flow of real connects, {hot * 1e6:.0f} us back to back (goal <= 50 us in the flow: "
        f"{'met' if flow <= 50e-6 else 'NOT MET'}); its file system checks alone, in the flow: "
        f"{floor * 1e6:.0f} us\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=200)
    parser.add_argument("--fresh", type=int, default=25, help="fresh processes per case")
    parser.add_argument("--impl", default="binary,python")
    parser.add_argument("--child-warm", nargs=2, metavar=("CONNINFO", "CA"))
    parser.add_argument("--child-fresh", nargs=4, metavar=("DRIVER", "CASE", "CONNINFO", "CA"))
    args = parser.parse_args()
    if args.child_warm:
        conninfo, ca = args.child_warm
        child_warm(conninfo, ca, args.rounds)
        return 0
    if args.child_fresh:
        driver, case, conninfo, ca = args.child_fresh
        child_fresh(driver, case, conninfo, ca)
        return 0

    try:
        import asyncpg  # noqa: F401 - each is measured
        import psycopg2  # noqa: F401

        from safepg.testing import PostgresServer
    except ImportError as ex:
        raise SystemExit(
            f"route_latency.py measures psycopg, psycopg2 and asyncpg on a throwaway server: {ex}. "
            "Run it with the checkout's .venv (scripts/dev setup), or install "
            "'safepg-tls[binary,testing,psycopg2,asyncpg]'."
        ) from None

    with PostgresServer() as server, tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp, "os-store.pem")
        bundle.write_bytes(Path(certifi.where()).read_bytes() + server.ca.cert_pem)
        conninfo = server.conninfo(sslrootcert=None)
        ca = str(server.ca_path)
        print(f"PostgreSQL {server.major_version} on 127.0.0.1; {args.rounds} warm rounds,")
        count = bundle.read_bytes().count(b"BEGIN CERTIFICATE")
        print(f"{args.fresh} fresh processes per case; OS store: {count} certificates\n")
        for impl in args.impl.split(","):
            home = Path(tmp, f"home-{impl}")
            home.mkdir(mode=0o700)
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("PG", "SSL_CERT_", "SAFEPG"))
            }
            env.update(
                PSYCOPG_IMPL=impl,
                HOME=str(home),  # no ~/.postgresql/root.crt
                SSL_CERT_FILE=str(bundle),
                SAFEPG_CACHE_DIR=str(Path(tmp, f"cache-{impl}")),
            )
            result = _run(["-n", str(args.rounds), "--child-warm", conninfo, ca], env)
            fresh: dict[str, list[float]] = {f"{d}|{c}": [] for d, c in FRESH}
            for _ in range(args.fresh):  # the cache knows the host: the warm child taught it
                for driver, case in FRESH:
                    out = _run(["--child-fresh", driver, case, conninfo, ca], env)
                    fresh[f"{driver}|{case}"].append(out["s"])
            report(result, fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
