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
