"""Shared fixtures: one real TLS PostgreSQL server per session, and a clean environment per test."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from safepg import _bundles, _cache, _fastpath, _params, _plans, _trust, _x509
from safepg.testing import CertificateAuthority, IssuedCertificate, PostgresServer

pytest_plugins = ["pytester"]

# Variables that change what libpq or OpenSSL would do; every test starts without them.
_ISOLATED_PREFIXES = (
    "PG",
    "SSL_CERT_",
    "SAFEPG_CACHE_DIR",
    "SAFEPG_FAST_PATH",
    "SAFEPG_BUNDLE_DIR",
    # Cloud SDK credentials and settings (safepg.aws, safepg.azure, safepg.gcp).
    "AWS_",
    "AZURE_",
    "GOOGLE_",
)


def pytest_report_header() -> list[str]:
    return [
        f"psycopg {psycopg.__version__}, impl {psycopg.pq.__impl__}, libpq {psycopg.pq.version()}"
    ]


@pytest.fixture(scope="session")
def server() -> Iterator[PostgresServer]:
    """A real PostgreSQL with TLS, shared by the whole session."""
    with PostgresServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run each test with no PG*/SSL_CERT_* variables, a fresh HOME and a private cache dir."""
    for name in list(os.environ):
        if name.startswith(_ISOLATED_PREFIXES):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SAFEPG_CACHE_DIR", str(tmp_path / "cache"))
    _trust._os_store_memo.clear()
    _trust._union_memo.clear()
    _trust._valid_files.clear()
    _params._warned.clear()
    _cache.clear_memory()
    _fastpath.clear_memory()
    _plans.clear_memory()
    _x509._expiry_warned.clear()
    _trust._expiry_checked.clear()
    _bundles._passed.clear()
    return home


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_password_in_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test: safepg's log records, at DEBUG, never hold the test server's password."""
    logger = logging.getLogger("safepg")
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if "server" in request.fixturenames:
        password = request.getfixturevalue("server").password
        leaked = [m for m in handler.messages if password in m]
        assert not leaked, f"the password reached safepg's log: {leaked[0][:200]}"


@pytest.fixture
def stalled_port() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.fixture(scope="session")
def rogue_ca() -> CertificateAuthority:
    """A CA nobody trusts: an attacker's."""
    return CertificateAuthority("rogue CA")


# When present_expired's certificate expired: a day before the session started.
EXPIRED_ON = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)


class CertificateShop:
    """Issues server certificates once per session and swaps them onto the server on demand."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self._issued: dict[tuple[object, ...], IssuedCertificate] = {}

    def present(
        self,
        *dns_names: str,
        ca: CertificateAuthority | None = None,
        **kwargs: object,
    ) -> IssuedCertificate:
        # Keyed by the CA object itself (kept alive here), never by id(): a freed CA's id can
        # be reused by another one, which would then be handed the wrong certificate.
        key = (ca, dns_names, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in self._issued:
            self._issued[key] = (ca or self.server.ca).issue(*dns_names, **kwargs)  # type: ignore[arg-type]
        cert = self._issued[key]
        if self.server.server_cert is not cert:
            self.server.use_certificate(cert)
        return cert

    def present_expired(self) -> IssuedCertificate:
        """A certificate for localhost and 127.0.0.1, signed by the server's CA, that expired
        a day before this test session started (valid for the 30 days before that)."""
        return self.present(
            "localhost",
            ip_addresses=["127.0.0.1"],
            not_before=EXPIRED_ON - dt.timedelta(days=29),
            not_after=EXPIRED_ON,
        )


@pytest.fixture(scope="session")
def _shop(server: PostgresServer) -> CertificateShop:
    return CertificateShop(server)


@pytest.fixture
def certs(_shop: CertificateShop) -> Iterator[CertificateShop]:
    """Present other certificates during a test; the default one is back afterwards."""
    yield _shop
    _shop.server.reset_certificate()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
