"""Direct TLS (sslnegotiation=direct, PostgreSQL 17+ and libpq 17+), learned per host.

Tests that need a PostgreSQL 17+ server are in the ``matrix`` run (they fetch its binaries);
the others run against the session's server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import safepg
from safepg import ConfigurationError, _fastpath
from safepg.testing import PostgresServer

needs_libpq17 = pytest.mark.skipif(
    not _fastpath.libpq_has_direct(), reason="this libpq does not know sslnegotiation"
)


def negotiation(conn: psycopg.Connection[object]) -> str:
    for opt in conn.pgconn.info:
        if opt.keyword == b"sslnegotiation":
            return (opt.val or b"").decode()
    return "(unknown to this libpq)"


def entries(cache: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(cache.glob("host-*.json"))]


@pytest.fixture
def cache(clean_env: Path) -> Path:
    import os

    return Path(os.environ["SAFEPG_CACHE_DIR"])


@pytest.fixture(scope="module")
def pg18() -> Iterator[PostgresServer]:
    with PostgresServer(version=18) as server:
        yield server


@pytest.mark.matrix
@needs_libpq17
def test_learned_and_used_against_postgresql_18(pg18: PostgresServer, cache: Path) -> None:
    with safepg.connect(pg18.conninfo()) as conn:  # cold: the probe learns
        assert safepg.check(conn).verified
    assert [e["direct_tls"] for e in entries(cache)] == [True]
    with safepg.connect(pg18.conninfo()) as conn:  # warm: TLS straight away
        assert negotiation(conn) == "direct"
        assert safepg.check(conn).verified


@pytest.mark.matrix
@needs_libpq17
def test_forced_and_refused(pg18: PostgresServer, server: PostgresServer) -> None:
    with safepg.connect(pg18.conninfo(), direct_tls=True, fast_path=False) as conn:
        assert negotiation(conn) == "direct"
    with safepg.connect(pg18.conninfo(), direct_tls=False) as conn:
        assert negotiation(conn) == "postgres"
    with safepg.connect(pg18.conninfo(sslnegotiation="postgres")) as conn:
        assert negotiation(conn) == "postgres"  # the caller's choice is never overridden
    # Forced against a server without direct TLS: refused as libpq refuses it, not retried.
    if server.major_version < 17:
        with pytest.raises(psycopg.OperationalError):
            safepg.connect(server.conninfo(), direct_tls=True)


@needs_libpq17
def test_learns_no_on_an_older_server(server: PostgresServer, cache: Path) -> None:
    if server.major_version >= 17:
        pytest.skip("the session's server takes direct TLS")
    for _ in range(2):
        with safepg.connect(server.conninfo()) as conn:
            assert negotiation(conn) == "postgres"
            assert safepg.check(conn).verified
    assert [e["direct_tls"] for e in entries(cache)] == [False]


@needs_libpq17
def test_falls_back_when_a_host_stops_taking_direct_tls(
    server: PostgresServer, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As if the host had taken direct TLS when it was learned, and a pooler or an older
    server has since taken its place: one failed attempt, then the SSLRequest, remembered."""
    if server.major_version >= 17:
        pytest.skip("the session's server takes direct TLS")
    safepg.connect(server.conninfo()).close()
    (entry_path,) = sorted(cache.glob("host-*.json"))
    entry = json.loads(entry_path.read_text())
    entry["direct_tls"] = True
    entry_path.write_text(json.dumps(entry))
    _fastpath.clear_memory()
    with caplog.at_level(logging.INFO, logger="safepg"), safepg.connect(server.conninfo()) as c:
        assert negotiation(c) == "postgres"
        assert safepg.check(c).verified
    assert "refused direct TLS" in caplog.text
    assert json.loads(entry_path.read_text())["direct_tls"] is False


def test_never_passed_to_a_libpq_that_does_not_know_it(server: PostgresServer) -> None:
    with safepg.connect(server.conninfo()) as conn:
        if not _fastpath.libpq_has_direct():
            assert negotiation(conn) == "(unknown to this libpq)"
    if not _fastpath.libpq_has_direct():
        with pytest.raises(ConfigurationError, match="libpq 17"):
            safepg.connect(server.conninfo(), direct_tls=True)


def test_direct_tls_option_conflicts_with_sslnegotiation(server: PostgresServer) -> None:
    if not _fastpath.libpq_has_direct():
        pytest.skip("sslnegotiation is unknown to this libpq")
    with pytest.raises(ConfigurationError, match="never overrides"):
        safepg.connect(server.conninfo(sslnegotiation="postgres"), direct_tls=True)


@pytest.mark.matrix
@needs_libpq17
def test_learned_direct_tls_never_overrides_the_callers_choice(
    pg18: PostgresServer, cache: Path
) -> None:
    """Once a host is learned to take direct TLS, a caller who asked for the SSLRequest (by
    direct_tls=False, sslnegotiation=postgres or PGSSLNEGOTIATION) still gets it."""
    safepg.connect(pg18.conninfo()).close()  # learns
    with safepg.connect(pg18.conninfo()) as conn:
        assert negotiation(conn) == "direct"  # and uses it
    for direct_tls, conninfo in (
        (False, pg18.conninfo()),
        (None, pg18.conninfo(sslnegotiation="postgres")),
    ):
        for _ in range(2):
            with safepg.connect(conninfo, direct_tls=direct_tls) as conn:
                assert negotiation(conn) == "postgres", (direct_tls, conninfo)
                assert safepg.check(conn).verified
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGSSLNEGOTIATION", "postgres")
        with safepg.connect(pg18.conninfo()) as conn:
            assert negotiation(conn) == "postgres"


@needs_libpq17
def test_the_fallback_from_direct_tls_is_tried_once(server: PostgresServer, cache: Path) -> None:
    """A host learned as taking direct TLS that now hangs up on every handshake (a proxy put
    in front of it): one direct attempt, one SSLRequest, then libpq's error; never a loop of
    fallbacks until the deadline."""
    from safepg import _params

    from .adversaries import hang_up, running

    with running(hang_up) as adversary:
        conninfo = server.conninfo(port=str(adversary.port), connect_timeout="3")
        plan = _params.build_plan(conninfo, {})
        index = _fastpath._index(plan.trust.path)
        assert index is not None
        [key] = _fastpath._host_keys(plan, index.digest)
        _fastpath._write_entry(key, _fastpath._Learned(tuple(index.by_fingerprint), True))
        with pytest.raises(psycopg.OperationalError):
            safepg.connect(conninfo)
        adversary.settle()
        assert adversary.connections == 2
