"""The route's attempt loop (`Route.drive`), as every libpq driver runs it.

psycopg, its async connect and safepg.psycopg2 make their attempts through one loop: on a warm
route (the learned anchors, then the full set), a failure that the route does not retry ends
the connect after one attempt, a password callable's refusal is never retried, and a retry
gets only what is left of the connect's deadline as its timeout. The sessions are real; the
password callables count the attempts.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import psycopg2
import pytest

import safepg
import safepg.psycopg2
from safepg import (
    ConfigurationError,
    ConnectTarget,
    TokenRejectedError,
    _connect,
    _diagnose,
    _fastpath,
)
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop
from .test_fastpath import big_bundle, cache, learned, second_ca
from .test_password_callable import role, set_password

__all__ = ["big_bundle", "cache", "role", "second_ca"]  # fixtures, shared


class Counted:
    """A password callable that gives *value* (or raises *error*) and counts its calls."""

    def __init__(self, value: str = "", error: Exception | None = None) -> None:
        self.value, self.error, self.calls = value, error, 0

    def __call__(self, target: ConnectTarget) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.value


def warm_conninfo(server: PostgresServer, role: str, bundle: Path) -> str:
    """*role*'s conninfo (no password) with the big trust set, its host learned: a connect
    now has two attempts to make, the learned anchors and then the full set."""
    password = "pw-" + secrets.token_hex(8)
    set_password(server, role, password)
    info = server.conninfo(user=role, password=None, sslrootcert=str(bundle))
    learned(f"{info} password={password}")
    assert "narrowed" in learned(f"{info} password={password}").label
    return info


def connect_with(driver: str, info: str, password: Counted) -> None:
    if driver == "psycopg":
        safepg.connect(info, password=password).close()
    elif driver == "async":

        async def go() -> None:
            conn = await safepg.connect_async(info, password=password)
            await conn.close()

        asyncio.run(go())
    else:
        safepg.psycopg2.connect(info, password=password).close()


DRIVERS = ["psycopg", "async", "psycopg2"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_failure_the_route_does_not_retry_is_one_attempt(
    server: PostgresServer, role: str, big_bundle: Path, cache: Path, driver: str
) -> None:
    info = warm_conninfo(server, role, big_bundle)
    wrong = Counted("not-the-password-" + secrets.token_hex(4))
    lost = TokenRejectedError if driver != "psycopg2" else safepg.psycopg2.TokenRejectedError
    with pytest.raises(lost):
        connect_with(driver, info, wrong)
    assert wrong.calls == 1  # the full set is not tried after a refused password


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_callables_refusal_is_not_retried_on_a_warm_route(
    server: PostgresServer, role: str, big_bundle: Path, cache: Path, driver: str
) -> None:
    info = warm_conninfo(server, role, big_bundle)
    # A cloud SDK that could not reach its token service: the text looks like libpq's, but it
    # is the callable's, and reaches the caller as it is (not as a database TLS failure).
    said = "token service: SSL error: certificate verify failed"
    refusing = Counted(error=ConfigurationError(said))
    with pytest.raises(ConfigurationError) as caught:
        connect_with(driver, info, refusing)
    assert refusing.calls == 1
    assert str(caught.value) == said
    if driver == "psycopg2":  # psycopg2's flavour, so that its except clauses catch it
        assert type(caught.value) is safepg.psycopg2.ConfigurationError
        assert isinstance(caught.value, psycopg2.OperationalError)
    else:
        assert type(caught.value) is ConfigurationError


def rotate(certs: CertificateShop, ca: CertificateAuthority) -> None:
    certs.present("localhost", ip_addresses=["127.0.0.1"], ca=ca)


def slow_first(seconds: float) -> tuple[list[dict[str, Any]], Callable[..., Any]]:
    """An opener (psycopg's connect) whose first attempt starts *seconds* late; it records
    the parameters of every attempt."""
    seen: list[dict[str, Any]] = []

    def opener(**params: Any) -> Any:
        seen.append(params)
        if len(seen) == 1:
            time.sleep(seconds)  # a slow link: most of the deadline is gone
        return psycopg.Connection.connect(**params)

    return seen, opener


def rotated_after_learning(
    server: PostgresServer, bundle: Path, certs: CertificateShop, ca: CertificateAuthority
) -> str:
    """A conninfo whose host was learned, then rotated to *ca*: the learned anchor no longer
    verifies, so the full set is retried. Its deadline is 4.5 s (connect_timeout=3)."""
    info = server.conninfo(sslrootcert=str(bundle), connect_timeout="3")
    learned(info)
    assert "narrowed" in learned(info).label
    rotate(certs, ca)
    return info


def test_a_retry_gets_what_is_left_of_the_deadline(
    server: PostgresServer,
    big_bundle: Path,
    cache: Path,
    certs: CertificateShop,
    second_ca: CertificateAuthority,
) -> None:
    info = rotated_after_learning(server, big_bundle, certs, second_ca)
    seen, opener = slow_first(1.6)
    conn = _connect.open_verified(
        opener, info, {}, allow_unencrypted_unix_socket=False, fast_path=None
    )
    conn.close()
    assert [p["connect_timeout"] for p in seen] == ["3", "2"]  # 2.9 s were left, whole seconds


def test_an_async_retry_gets_what_is_left_of_the_deadline(
    server: PostgresServer,
    big_bundle: Path,
    cache: Path,
    certs: CertificateShop,
    second_ca: CertificateAuthority,
) -> None:
    info = rotated_after_learning(server, big_bundle, certs, second_ca)
    seen: list[dict[str, Any]] = []

    async def opener(**params: Any) -> Any:
        seen.append(params)
        if len(seen) == 1:
            await asyncio.sleep(1.6)
        return await psycopg.AsyncConnection.connect(**params)

    async def go() -> None:
        conn = await _connect.open_verified_async(
            opener, info, {}, allow_unencrypted_unix_socket=False, fast_path=None
        )
        await conn.close()

    asyncio.run(go())
    assert [p["connect_timeout"] for p in seen] == ["3", "2"]


def test_psycopg2_sessions_report_where_they_landed(server: PostgresServer) -> None:
    conn = safepg.psycopg2.connect(server.conninfo())
    try:
        where = safepg.psycopg2._Session(conn).where()
    finally:
        conn.close()
    assert where == (server.host, None, str(server.port))


def reachable(obj: object, needle: str, depth: int = 0, seen: set[int] | None = None) -> bool:
    """*needle* is in *obj*, or in what it holds: containers, an error's frames' locals, and
    psycopg's snapshot of a failed connection (its options hold the password)."""
    seen = set() if seen is None else seen
    if depth > 6 or id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, str):
        return needle in obj
    if isinstance(obj, dict):
        return any(reachable(v, needle, depth + 1, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return any(reachable(v, needle, depth + 1, seen) for v in obj)
    if isinstance(obj, BaseException):
        tb = obj.__traceback__
        while tb is not None:
            if reachable(dict(tb.tb_frame.f_locals), needle, depth + 1, seen):
                return True
            tb = tb.tb_next
        snapshot = getattr(obj, "_pgconn", None)
        if snapshot is not None:
            return any((o.val or b"") == needle.encode() for o in snapshot.info)
    return False


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_first_attempts_token_is_not_left_in_the_frames_of_a_refusal(
    server: PostgresServer,
    role: str,
    big_bundle: Path,
    cache: Path,
    certs: CertificateShop,
    second_ca: CertificateAuthority,
    driver: str,
) -> None:
    """The learned anchor no longer verifies (a rotation), so the full set is retried; the
    callable gave a token for the first attempt and refuses the retry. The refusal's frames
    must not lead to the first attempt's error, whose frames and snapshot hold the token."""
    info = warm_conninfo(server, role, big_bundle)
    rotate(certs, second_ca)
    token = "tok-" + secrets.token_hex(16)
    calls: list[None] = []

    def provider(target: ConnectTarget) -> str:
        calls.append(None)
        if len(calls) == 1:
            return token
        raise ConfigurationError("token service unreachable")

    with pytest.raises(ConfigurationError) as caught:
        connect_with(driver, info, provider)  # type: ignore[arg-type]
    assert len(calls) == 2
    tb = caught.value.__traceback__
    where = []
    while tb is not None:
        code = tb.tb_frame.f_code
        if "/safepg/" in code.co_filename and "/tests/" not in code.co_filename:
            where += [
                f"{code.co_name}: {name}"
                for name, value in tb.tb_frame.f_locals.items()
                if reachable(value, token)
            ]
        tb = tb.tb_next
    assert where == []


# -- found by the attacker review: interrupted while diagnosing or deciding --------------------


def leaks(obj: object, needle: str) -> list[str]:
    """Paths by which *needle* is reachable: containers, an error's frames' locals, psycopg's
    snapshot (_pgconn), __cause__/__context__ chains."""
    found: list[str] = []
    seen: set[int] = set()
    keep: list[object] = []  # ids of freed temporaries would be reused

    def walk(o: object, path: str, depth: int) -> None:
        if depth > 8 or id(o) in seen:
            return
        seen.add(id(o))
        keep.append(o)
        if isinstance(o, str):
            if needle in o:
                found.append(path)
            return
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}[{k!r}]", depth + 1)
            return
        if isinstance(o, (list, tuple, set)):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]", depth + 1)
            return
        if isinstance(o, BaseException):
            tb = o.__traceback__
            while tb is not None:
                code = tb.tb_frame.f_code
                if "/tests/" in code.co_filename:  # the test's own frame holds the token
                    tb = tb.tb_next
                    continue
                walk(dict(tb.tb_frame.f_locals), f"{path}<tb {code.co_name}>", depth + 1)
                tb = tb.tb_next
            snap = getattr(o, "_pgconn", None)
            if snap is not None and any((x.val or b"") == needle.encode() for x in snap.info):
                found.append(f"{path}._pgconn.info")
            walk(o.__cause__, f"{path}.__cause__", depth + 1)
            walk(o.__context__, f"{path}.__context__", depth + 1)

    walk(obj, "err", 0)
    return found


def provider_for(token: str) -> Callable[[ConnectTarget], str]:
    def provider(target: ConnectTarget) -> str:
        return token

    return provider


def test_ctrl_c_during_the_diagnosis_leaves_no_token_in_the_frames(
    server: PostgresServer,
    second_ca: CertificateAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One attempt (fast path off), the chain rejected: safepg diagnoses (probes the server,
    up to seconds) before scrubbing libpq's error. Ctrl-C during that probe: the
    KeyboardInterrupt's frames lead to the unscrubbed error and its snapshot."""
    other = tmp_path / "other.pem"
    other.write_bytes(second_ca.cert_pem)
    info = server.conninfo(password=None, sslrootcert=str(other))
    token = "tok-" + secrets.token_hex(16)

    def slow_probe(*a: object, **k: object) -> None:  # Ctrl-C arriving while the probe waits
        raise KeyboardInterrupt

    monkeypatch.setattr(_diagnose, "diagnose", slow_probe)
    with pytest.raises(KeyboardInterrupt) as caught:
        safepg.connect(info, password=provider_for(token), fast_path=False)
    assert leaks(caught.value, token) == []


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is Python 3.11+")
def test_an_async_timeout_during_the_diagnosis_leaves_no_token_in_the_frames(
    server: PostgresServer,
    second_ca: CertificateAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A timeout (asyncio.timeout in the caller's task) cancels connect_async while safepg
    diagnoses the failure (in a thread, up to seconds of probes). The TimeoutError the app
    catches and reports (Sentry reads frame locals when it catches) leads to libpq's raw
    error: its frames and psycopg's snapshot hold the token."""
    other = tmp_path / "other.pem"
    other.write_bytes(second_ca.cert_pem)
    info = server.conninfo(password=None, sslrootcert=str(other))
    token = "tok-" + secrets.token_hex(16)
    real = _diagnose.diagnose

    def slow(*a: Any, **k: Any) -> Any:  # a probe of a slow server
        time.sleep(1.0)
        return real(*a, **k)

    monkeypatch.setattr(_diagnose, "diagnose", slow)

    async def go() -> list[str]:
        try:
            async with asyncio.timeout(0.5):  # type: ignore[attr-defined,unused-ignore]
                await safepg.connect_async(info, password=provider_for(token), fast_path=False)
        except TimeoutError as ex:
            return leaks(ex, token)  # what an error reporter sees, when it sees it
        return ["no timeout"]

    assert asyncio.run(go()) == []


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_ctrl_c_while_the_route_decides_on_a_retry_leaves_no_token(
    server: PostgresServer,
    role: str,
    big_bundle: Path,
    cache: Path,
    certs: CertificateShop,
    second_ca: CertificateAuthority,
    monkeypatch: pytest.MonkeyPatch,
    driver: str,
) -> None:
    """Warm route, CA rotated: the first attempt's chain is rejected; Route.failed runs
    inside drive's except clause (forget() parses the whole trust set). An exception there
    has the first attempt's raw error (frames, snapshot: the token) as __context__."""
    info = warm_conninfo(server, role, big_bundle)
    rotate(certs, second_ca)
    token = "tok-" + secrets.token_hex(16)

    def interrupted(*a: object, **k: object) -> None:  # Ctrl-C while the set is parsed
        raise KeyboardInterrupt

    monkeypatch.setattr(_fastpath, "forget", interrupted)
    connect = safepg.connect if driver == "psycopg" else safepg.psycopg2.connect
    with pytest.raises(KeyboardInterrupt) as caught:
        connect(info, password=provider_for(token))
    assert leaks(caught.value, token) == []
