"""SQLAlchemy's own dialect test suite, in part, against ``postgresql+safepg://`` and
``postgresql+safepg_async://`` on the session's TLS server.

``sqlalchemy.testing.suite`` ships with SQLAlchemy and is how third-party dialects show that they
behave as SQLAlchemy expects. It runs here in a pytest subprocess with SQLAlchemy's plugin, set
up as a third-party dialect's tests are: a ``conftest.py`` importing the plugin, a ``setup.cfg``
naming the requirements class (safepg's: `safepg.sqlalchemy.requirements`), the profile file
and the database URL (``[db] default``, which ``--dburi`` would override). The dialects are
found through safepg's ``sqlalchemy.dialects`` entry points.

SQLAlchemy asks each dialect for its test provisioning (`safepg.sqlalchemy.provision`). Without
it, the reflection tests' temporary tables cannot be made, and ``pytest -n`` stops at start-up
because it cannot create its workers' databases: ``test_provision.py`` creates and drops such a
database as SQLAlchemy's xdist hooks do.

The subprocess runs in safepg's strict mode, so a test during which the suite opened a
connection without TLS and ``sslmode=verify-full`` fails. The same subset runs with SQLAlchemy's
own psycopg dialect (with ``sslmode=verify-full``) as a control: when that fails too, the suite
or the server changed, not safepg.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql
from sqlalchemy.engine import URL, make_url

import safepg
from safepg.testing import PostgresServer

# A small, fast part of the suite: plain SQL, DML, results, types, and the reflection tests that
# need the provisioning (temporary tables, the test_schema schemas).
SUITE: dict[str, list[str]] = {
    "test_dialect": [
        "PingTest",
        "ExceptionTest",
        "IsolationLevelTest",
        "AutocommitIsolationTest",
        "EscapingTest",
    ],
    "test_select": ["JoinTest", "CompoundSelectTest", "ExistsTest", "OrderByLabelTest"],
    "test_insert": ["InsertBehaviorTest", "LastrowidTest", "ReturningTest"],
    "test_results": ["RowFetchTest"],
    "test_types": ["DateTimeTZTest", "JSONTest", "NumericTest", "UnicodeVarcharTest"],
    "test_reflection": [
        "HasTableTest",
        "HasIndexTest",
        "CompositeKeyReflectionTest",
        "ComponentReflectionTest",
    ],
}
# ComponentReflectionTest has some 750 tests; these are enough. Its setup makes temporary tables.
# SQLAlchemy 2.0's test_round_trip_custom_json expects the deserializer to get str, where psycopg
# hands it bytes: it fails with SQLAlchemy's own psycopg dialect too.
SELECT = (
    "(not ComponentReflectionTest or temp_table or get_columns or get_foreign_keys "
    "or get_indexes or get_schema_names or get_table_names) and not round_trip_custom_json"
)
FOLLOWER_TEST = "FollowerDatabaseTest"
PSYCOPG_ONLY_TEST = "PsycopgOnlyTest"

SETUP_CFG = """\
[tool:pytest]
python_files = test_*.py
markers =
    backend
    sparse_backend
    sparse_driver_backend
    memory_intensive
    timing_intensive
    mypy

[sqla_testing]
requirement_cls = safepg.sqlalchemy.requirements:Requirements
profile_file = profiles.txt

[db]
default = DBURI
"""

CONFTEST = """\
import pytest

pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402, F403
"""

TEST_SUITE = f"""\
import importlib

SUITE = {SUITE!r}

for _module, _names in SUITE.items():
    _suite = importlib.import_module("sqlalchemy.testing.suite." + _module)
    globals().update({{name: getattr(_suite, name) for name in _names}})
"""

TEST_PROVISION = f"""\
import uuid

from sqlalchemy import text
from sqlalchemy import testing
from sqlalchemy.testing import config, engines, fixtures, provision


class {FOLLOWER_TEST}(fixtures.TestBase):
    __backend__ = True

    def test_create_and_drop_a_follower_database(self):
        # What SQLAlchemy's pytest-xdist hooks do for each worker of pytest -n.
        ident = "test_%s" % uuid.uuid4().hex[:12]
        provision.create_follower_db(ident)
        try:
            url = provision.follower_url_from_main(config.db.url, ident)
            eng = engines.testing_engine(url)
            with eng.connect() as conn:
                assert conn.scalar(text("select current_database()")) == ident
            eng.dispose()
        finally:
            provision.drop_follower_db(ident)


class {PSYCOPG_ONLY_TEST}(fixtures.TestBase):
    # SQLAlchemy's own tests key psycopg's on its driver name; safepg's dialects are psycopg's,
    # and safepg's requirements class says so.
    __only_on__ = "postgresql+psycopg"
    __backend__ = True

    def test_generated_for_psycopgs_dialects(self):
        assert testing.against("postgresql+psycopg")
        assert testing.against("+psycopg")
        assert not testing.against("+psycopg2")
        assert not testing.against("+asyncpg")
"""


@pytest.fixture
def suite_url(server: PostgresServer) -> Iterator[URL]:
    """A database of its own for the suite, with a role that may create databases (pytest -n)
    and the schemas the suite expects; dropped afterwards, with any database the role made."""
    role = f"sqla_suite_{secrets.token_hex(4)}"
    password = secrets.token_hex(16)
    with server.admin_connect() as admin:
        available = {row[0] for row in admin.execute("SELECT name FROM pg_available_extensions")}
        # SQLAlchemy's PostgreSQL provisioning creates them in the test database.
        missing = sorted({"citext", "hstore"} - available)
        if missing:
            pytest.skip(f"the server lacks the extensions {missing} (PostgreSQL's contrib)")
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        admin.execute(sql.SQL("CREATE DATABASE {0} OWNER {0}").format(sql.Identifier(role)))
    try:
        conninfo = server.conninfo(user=role, password=password, dbname=role)
        with safepg.connect(conninfo, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA test_schema")
            conn.execute("CREATE SCHEMA test_schema_2")
        yield make_url(server.url()).set(username=role, password=password, database=role)
    finally:
        with server.admin_connect() as admin:
            owned = admin.execute(
                "SELECT datname FROM pg_database JOIN pg_roles ON datdba = pg_roles.oid "
                "WHERE rolname = %s",
                [role],
            ).fetchall()
            for (name,) in owned:
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _write_project(root: Path, url: URL) -> None:
    # In the file rather than on the command line, where it would show its password.
    dburi = url.render_as_string(hide_password=False).replace("%", "%%")  # configparser's escape
    root.mkdir()
    for name, text in {
        "setup.cfg": SETUP_CFG.replace("DBURI", dburi),
        "conftest.py": CONFTEST,
        "test_provision.py": TEST_PROVISION,
        "test_suite.py": TEST_SUITE,
    }.items():
        (root / name).write_text(text)


def _outcomes(report: Path, driver: str) -> dict[str, Counter[str]]:
    """Per test class of the suite (``HasTableTest``, ...): how many tests had each outcome."""
    outcomes: dict[str, Counter[str]] = {}
    databases: set[str] = set()
    for case in ET.parse(report).iter("testcase"):  # noqa: S314 - our own subprocess's report
        # SQLAlchemy names each backend class per database: HasTableTest_postgresql+safepg_15_4.
        cls, _, database = case.get("classname", "").rpartition(".")[2].partition("_postgresql+")
        assert not database or re.fullmatch(rf"{re.escape(driver)}_\d\w*", database), cls
        databases.add(database)
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcome = "failed" if kinds - {"skipped"} else "skipped" if kinds else "passed"
        outcomes.setdefault(cls, Counter())[outcome] += 1
    assert databases - {""}, "no test ran per database"
    return outcomes


@pytest.mark.parametrize("driver", ["safepg", "safepg_async", "psycopg"])
def test_sqlalchemys_dialect_suite(suite_url: URL, tmp_path: Path, driver: str) -> None:
    url = suite_url.set(drivername=f"postgresql+{driver}")
    if driver == "psycopg":  # the control: SQLAlchemy's own dialect, verified by libpq alone
        url = url.update_query_dict({"sslmode": "verify-full"})
    project = tmp_path / "suite"
    _write_project(project, url)
    report = tmp_path / "report.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--safepg-strict",
            "-k",
            SELECT,
            f"--junitxml={report}",
            "-q",
            "-rfE",
            "test_provision.py",
            "test_suite.py",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output, returncode = (proc.stdout + proc.stderr)[-6000:], proc.returncode
    assert returncode == 0, output
    outcomes = _outcomes(report, driver)
    failed = {cls: n["failed"] for cls, n in outcomes.items() if n["failed"]}
    assert not failed, output
    # Every class chosen ran, so that the subset cannot shrink unnoticed, and the tests that
    # need the provisioning passed.
    expected = {name for names in SUITE.values() for name in names}
    expected |= {FOLLOWER_TEST, PSYCOPG_ONLY_TEST}
    assert {cls for cls, n in outcomes.items() if n["passed"]} == expected, outcomes
    assert outcomes[FOLLOWER_TEST]["passed"] == 1
    assert outcomes[PSYCOPG_ONLY_TEST]["passed"] == 1
    assert outcomes["ComponentReflectionTest"]["passed"] >= 10
    assert sum(n["passed"] for n in outcomes.values()) >= 100, output
