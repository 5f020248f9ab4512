"""The pytest plugin, run the way users run it: a separate pytest process, with the entry point."""

from __future__ import annotations

import pytest

USER_TESTS = """
import psycopg
import pytest
import safepg
import sqlalchemy
import safepg.sqlalchemy


def test_fixtures(safepg_server, safepg_conn, safepg_url):
    assert safepg.check(safepg_conn).verified
    safepg_conn.execute("CREATE TABLE rolled_back (x int)")
    assert safepg_server.ca_path.exists()
    assert safepg_server.port > 0 and safepg_server.host and safepg_server.user
    assert safepg_server.dbname in safepg_url
    engine = safepg.sqlalchemy.create_engine(safepg_url)
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
    engine.dispose()


def test_rolled_back(safepg_conn):
    # The table made by the previous test was rolled back.
    assert safepg_conn.execute("SELECT to_regclass('rolled_back')").fetchone() == (None,)


def test_failure_paths(safepg_server):
    other = safepg_server.issue_certificate("other.example")
    with safepg_server.certificate(other):
        with pytest.raises(safepg.HostnameMismatchError):
            safepg.connect(safepg_server.conninfo())


def test_raw_require(safepg_server):
    psycopg.connect(safepg_server.conninfo(sslmode="require")).close()


@pytest.mark.safepg_strict
def test_marked_raw_require(safepg_server):
    psycopg.connect(safepg_server.conninfo(sslmode="require")).close()


@pytest.mark.safepg_strict(False)
def test_opted_out(safepg_server):
    psycopg.connect(safepg_server.conninfo(sslmode="require")).close()


def test_raw_verify_full_passes(safepg_server):
    psycopg.connect(safepg_server.conninfo(sslmode="verify-full")).close()
"""


def _run(pytester: pytest.Pytester, *args: str, ini: str = "") -> pytest.RunResult:
    pytester.makepyfile(test_user=USER_TESTS)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args)


def test_fixtures_and_marker(pytester: pytest.Pytester) -> None:
    result = _run(pytester)
    # Without the option, only the marked test is strict.
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_marked_raw_require*",
            "*safepg strict mode: 1 connection(s) opened without sslmode=verify-full and TLS*",
            "*with sslmode=require, which does not verify the server, opened at:*",
            "*test_user.py*line*in test_marked_raw_require*",
        ]
    )
    assert "test_raw_require " not in result.stdout.str()


@pytest.mark.parametrize("how", ["option", "ini"])
def test_strict_everywhere(pytester: pytest.Pytester, how: str) -> None:
    if how == "option":
        result = _run(pytester, "--safepg-strict")
    else:
        result = _run(pytester, ini="safepg_strict = true")
    result.assert_outcomes(passed=5, failed=2)
    result.stdout.fnmatch_lines(["*FAILED test_user.py::test_raw_require*"])
    assert "test_opted_out" not in "".join(
        line for line in result.outlines if line.startswith("FAILED")
    )


# Strict mode's reach: fixture teardown, raw libpq connections, SQLAlchemy hooks. Run with
# --safepg-strict, so the plugin watches before this module is imported.
STRICT_TESTS = """
import time

import psycopg
import pytest
import sqlalchemy
from psycopg import pq
from psycopg.pq import PGconn  # taken at import time: watched too

import safepg


@pytest.fixture
def opens_in_teardown(safepg_server):
    yield
    psycopg.connect(safepg_server.conninfo(sslmode="require")).close()


def test_teardown(opens_in_teardown):
    pass


def test_raw_connect(safepg_server):
    pgconn = pq.PGconn.connect(safepg_server.conninfo(sslmode="require").encode())
    assert pgconn.status == pq.ConnStatus.OK
    pgconn.finish()


def test_raw_connect_imported_early(safepg_server):
    pgconn = PGconn.connect(safepg_server.conninfo(sslmode="prefer").encode())
    assert pgconn.status == pq.ConnStatus.OK
    pgconn.finish()


def test_raw_connect_start(safepg_server):
    pgconn = pq.PGconn.connect_start(safepg_server.conninfo(sslmode="allow").encode())
    try:
        deadline = time.monotonic() + 10
        while pgconn.connect_poll() not in (pq.PollingStatus.OK, pq.PollingStatus.FAILED):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert pgconn.status == pq.ConnStatus.OK
    finally:
        pgconn.finish()


def test_counted_once(safepg_server):
    # psycopg starts its own connections with connect_start (PSYCOPG_IMPL=python): one report.
    psycopg.connect(safepg_server.conninfo(sslmode="require")).close()


def test_not_counted(safepg_server):
    # safepg resolves options with connect_start, which stops before any I/O: not counted.
    with safepg.connect(safepg_server.conninfo()) as conn:
        assert isinstance(conn.pgconn, pq.PGconn)
    psycopg.connect(safepg_server.conninfo(sslmode="verify-full")).close()
    pgconn = pq.PGconn.connect(safepg_server.conninfo(sslmode="verify-full").encode())
    assert pgconn.ssl_in_use and isinstance(pgconn, pq.PGconn)
    pgconn.finish()


def test_sqlalchemy_do_connect_hook(safepg_server):
    # No sslmode in the URL: dialect.dbapi.connect must still be safepg's.
    engine = sqlalchemy.create_engine(safepg_server.url(scheme="postgresql+safepg"))

    @sqlalchemy.event.listens_for(engine, "do_connect")
    def connect(dialect, record, cargs, cparams):
        return dialect.dbapi.connect(*cargs, **cparams)

    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
    engine.dispose()
"""


_REQUIRE = "with sslmode=require, which does not verify the server, opened at:"


_CASES = {
    # fixture teardown is watched, as setup and the test itself are
    "test_teardown": (
        {"passed": 1, "errors": 1},
        [
            "*ERROR at teardown of test_teardown*",
            "*safepg strict mode: 1 connection(s)*",
            f"- a connection to 127.0.0.1:* {_REQUIRE}",
            "*test_strict.py*in opens_in_teardown*",
        ],
    ),
    # raw libpq connections: no psycopg Connection is ever made
    "test_raw_connect": (
        {"failed": 1},
        [f"- a connection to 127.0.0.1:* {_REQUIRE}", "*test_strict.py*in test_raw_connect*"],
    ),
    "test_raw_connect_imported_early": (
        {"failed": 1},
        [
            "- a connection to 127.0.0.1:* with sslmode=prefer*",
            "*test_strict.py*in test_raw_connect_imported_early*",
        ],
    ),
    "test_raw_connect_start": (
        {"failed": 1},
        [
            "- a connection started to 127.0.0.1:* with sslmode=allow*",
            "*test_strict.py*in test_raw_connect_start*",
        ],
    ),
    # psycopg's own connect_start is not a second report
    "test_counted_once": (
        {"failed": 1},
        ["*safepg strict mode: 1 connection(s)*", f"- a connection to 127.0.0.1:* {_REQUIRE}"],
    ),
    "test_not_counted": ({"passed": 1}, []),
    # dialect.dbapi.connect in a hook is safepg's, so there is nothing to report
    "test_sqlalchemy_do_connect_hook": ({"passed": 1}, []),
}


@pytest.mark.parametrize("test", list(_CASES))
def test_strict_reach(pytester: pytest.Pytester, test: str) -> None:
    outcomes, lines = _CASES[test]
    pytester.makepyfile(test_strict=STRICT_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-q", "--safepg-strict", f"test_strict.py::{test}"
    )
    result.assert_outcomes(**outcomes)
    result.stdout.fnmatch_lines(lines)
    assert "2 connection(s)" not in result.stdout.str()


def test_loading_the_plugin_imports_nothing_heavy() -> None:
    """pytest loads the plugin in every run in the environment: it must not import psycopg (its
    ctypes layer and libpq took about 0.5 s) or the rest of safepg until a fixture or strict
    mode needs them. benchmarks/plugin_startup.py times it (issue 24: at most 50 ms)."""
    import subprocess
    import sys

    code = (
        "import sys, pytest; import safepg.pytest_plugin; "
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('safepg', 'psycopg', "
        "'psycopg_binary', 'psycopg_c', 'cryptography', 'sqlalchemy')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "['safepg', 'safepg.pytest_plugin']"


def test_the_public_names_load_on_first_use() -> None:
    import subprocess
    import sys

    code = (
        "import sys, safepg; assert 'psycopg' not in sys.modules; "
        "from safepg import connect, ConfigurationError; import pickle; "
        "assert ConfigurationError.__module__ == 'safepg'; "
        "assert pickle.loads(pickle.dumps(ConfigurationError('x'))).args == ('x',); "
        "assert set(safepg.__all__) <= set(dir(safepg)); "
        "assert all(getattr(safepg, n) is not None for n in safepg.__all__); print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
