"""Fork safety: a child forked while a parent thread fetches a token connects, within its
connect_timeout, instead of waiting for ever on a lock that thread held.

The token providers are safepg's own (EntraAuth, the GCP and AWS IAMAuth); only the cloud
credential under them is a stand-in, whose first fetch blocks until released. The child
connects to the real test server through libpq, with the token as the password.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest

import safepg
from safepg import ConnectTarget
from safepg.testing import PostgresServer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

CONNECT_TIMEOUT = 2
CHILD_DEADLINE = 20.0  # the child's whole life, generously; a hang is killed at this point


class FirstBlocks:
    """Returns *token*; the first call waits (in the parent) until released."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> str:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            self.release.wait(60)
        return self.token


class AccessToken(NamedTuple):  # azure.core.credentials.AccessToken's shape
    token: str
    expires_on: int


class AzureCredential:
    def __init__(self, fetch: FirstBlocks) -> None:
        self.fetch = fetch

    def get_token(self, *scopes: str) -> AccessToken:
        return AccessToken(self.fetch(), int(time.time()) + 3600)


class GoogleCredentials:
    def __init__(self, fetch: FirstBlocks) -> None:
        self.fetch = fetch
        self.token: str | None = None
        self.expiry: datetime.datetime | None = None

    @property
    def valid(self) -> bool:
        return self.token is not None

    def refresh(self, request: object) -> None:
        self.token = self.fetch()


class RDSClient:
    def __init__(self, fetch: FirstBlocks) -> None:
        self.fetch = fetch

    def generate_db_auth_token(self, **kwargs: Any) -> str:
        return self.fetch()


class BotocoreSession:
    def __init__(self, fetch: FirstBlocks) -> None:
        self.fetch = fetch

    def create_client(self, service: str, region_name: str) -> RDSClient:
        return RDSClient(self.fetch)


def azure(fetch: FirstBlocks, host: str) -> Callable[[ConnectTarget], str]:
    import safepg.azure

    return safepg.azure.EntraAuth(AzureCredential(fetch), hosts=[host])


def gcp(fetch: FirstBlocks, host: str) -> Callable[[ConnectTarget], str]:
    import safepg.gcp

    return safepg.gcp.IAMAuth(GoogleCredentials(fetch), request=object(), hosts=[host])


def aws(fetch: FirstBlocks, host: str) -> Callable[[ConnectTarget], str]:
    pytest.importorskip("botocore")
    import safepg.aws

    return safepg.aws.IAMAuth("eu-central-1", session=BotocoreSession(fetch))


def _child(server: PostgresServer, provider: Callable[[ConnectTarget], str]) -> int:
    """In the child: connect with the provider; 0 if connected and verified."""
    try:
        with safepg.connect(
            host=server.host,
            port=server.port,
            user=server.user,
            dbname=server.dbname,
            sslrootcert=str(server.ca_path),
            password=provider,
            connect_timeout=CONNECT_TIMEOUT,
        ) as conn:
            return 0 if conn.execute("SELECT 1").fetchone() == (1,) else 3
    except BaseException:
        return 2


def _in_child(run: Callable[[], int]) -> tuple[int | None, float]:
    """*run*'s exit code in a forked child, and how long the child lived; None if it hung
    past CHILD_DEADLINE (then it is killed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            code = run()
        finally:
            os._exit(code)
    started = time.monotonic()
    while time.monotonic() - started < CHILD_DEADLINE:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.monotonic() - started
        time.sleep(0.05)  # polling the child's exit, bounded by the deadline
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None, time.monotonic() - started


@pytest.mark.parametrize("make", [azure, gcp, aws], ids=["azure", "gcp", "aws"])
def test_a_child_forked_mid_fetch_connects(
    server: PostgresServer, make: Callable[[FirstBlocks, str], Callable[[ConnectTarget], str]]
) -> None:
    fetch = FirstBlocks(server.password)
    provider = make(fetch, server.host)
    target = ConnectTarget(server.host, server.port, server.user, server.dbname)
    fetching = threading.Thread(target=provider, args=(target,), daemon=True)
    fetching.start()
    try:
        assert fetch.entered.wait(10), "the parent's fetch never started"
        code, elapsed = _in_child(lambda: _child(server, provider))
    finally:
        fetch.release.set()
        fetching.join(10)
    assert code is not None, f"the forked child hung for {CHILD_DEADLINE:g} s (killed)"
    assert code == 0, f"the child failed to connect (exit {code})"
    assert elapsed < CONNECT_TIMEOUT + 8


def test_sdk_objects_safepg_made_are_made_anew_in_a_child(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # A botocore session and its clients hold HTTP pools and locks: the child must not share
    # the parent's. One the caller gave stays the caller's.
    pytest.importorskip("botocore")
    import safepg.aws

    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    own = safepg.aws.IAMAuth("eu-central-1")
    own._client("eu-central-1")
    assert own._session is not None
    assert own._clients
    assert _in_child(lambda: int(own._session is not None or bool(own._clients)))[0] == 0
    assert own._session is not None  # the parent's are untouched
    assert own._clients
    session = BotocoreSession(FirstBlocks("unused"))
    given = safepg.aws.IAMAuth("eu-central-1", session=session)
    assert _in_child(lambda: int(given._session is not session))[0] == 0


def test_a_provider_subclass_without_a_hash_is_still_reset() -> None:
    import safepg.azure

    class Compared(safepg.azure.EntraAuth):
        def __eq__(self, other: object) -> bool:  # and so no __hash__
            return isinstance(other, Compared)

    auth = Compared(AzureCredential(FirstBlocks("t")), hosts=["db.example.com"])
    auth._lock.acquire()  # as a parent's thread would hold it, fetching
    try:
        assert _in_child(lambda: int(auth._lock.locked()))[0] == 0
    finally:
        auth._lock.release()


def test_azure_and_gcp_sdk_objects_safepg_made_are_made_anew_in_a_child() -> None:
    import safepg.azure
    import safepg.gcp

    entra = safepg.azure.EntraAuth()  # DefaultAzureCredential, made on first use
    entra._credential = made = object()  # as if made here, in the parent
    assert _in_child(lambda: int(entra._credential is not None))[0] == 0
    assert entra._credential is made
    given = AzureCredential(FirstBlocks("t"))
    mine = safepg.azure.EntraAuth(given)
    assert _in_child(lambda: int(mine._credential is not given))[0] == 0
    google = safepg.gcp.IAMAuth()  # google.auth.default() and a Request, made on first use
    google._credentials, google._request = object(), object()
    code, _ = _in_child(lambda: int(google._credentials is not None or google._request is not None))
    assert code == 0
    creds, request = GoogleCredentials(FirstBlocks("t")), object()
    theirs = safepg.gcp.IAMAuth(creds, request=request)
    code, _ = _in_child(
        lambda: int(theirs._credentials is not creds or theirs._request is not request)
    )
    assert code == 0
