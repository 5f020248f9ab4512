"""Load: 64 threads x 20 connects from a cold cache, with 4 processes doing the same at once.

Zero failures, no file descriptors leaked, no temporary files left behind. Marked slow: it runs
in ``scripts/dev test``'s ``-m slow`` pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import certifi
import pytest

import safepg
from safepg.testing import PostgresServer

pytestmark = pytest.mark.slow

THREADS, CONNECTS, PROCESSES = 64, 20, 4
CHILD = """
import sys
from concurrent.futures import ThreadPoolExecutor
import safepg

def work(_):
    for _ in range(int(sys.argv[2])):
        with safepg.connect(sys.argv[1]) as conn:
            assert safepg.check(conn).verified
    return True

with ThreadPoolExecutor(8) as pool:
    assert all(pool.map(work, range(8)))
"""


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def temp_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_load_from_a_cold_cache(
    server: PostgresServer, tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A temporary directory of this test's own, for this process and the children: others on
    # the machine (another test run, a user's `safepg demo --keep`) create names in the global one.
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + server.ca.cert_pem)
    conninfo = server.conninfo(sslrootcert=str(bundle))
    cache = Path(os.environ["SAFEPG_CACHE_DIR"])
    safepg.connect(server.conninfo(), fast_path=False).close()  # warm up, leaving no cache
    fds_before, temps_before = open_fds(), temp_files(private_tmp)

    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, conninfo, "5"],
            stderr=subprocess.PIPE,
            env={**os.environ},
        )
        for _ in range(PROCESSES)
    ]

    def work(_: int) -> int:
        done = 0
        for _ in range(CONNECTS):
            with safepg.connect(conninfo) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
                done += 1
        return done

    with ThreadPoolExecutor(THREADS) as pool:
        assert sum(pool.map(work, range(THREADS))) == THREADS * CONNECTS
    for child in children:
        _out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err.decode()

    assert open_fds() - fds_before == set(), "file descriptors leaked"
    assert temp_files(private_tmp) - temps_before == set(), "temporary files left behind"
    assert not list(cache.glob(".tmp*")), "partial cache files left behind"
    assert len(list(cache.glob("host-*.json"))) == 1
    with safepg.connect(conninfo) as conn:
        trust = safepg.check(conn).trust
    assert trust is not None
    assert "narrowed" in trust.label
