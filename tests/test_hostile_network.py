"""Attackers on the network path: every attack is refused, in time, with nothing sent.

Each adversary (see adversaries.py) is attacked twice: with a one-CA trust file, and with a large
bundle, where the fast path's probe talks to the adversary first and its cache is in play. And
through each driver: safepg.connect (psycopg 3) and safepg.psycopg2.connect, whose errors are
the same classes and psycopg2's OperationalError too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import certifi
import psycopg
import psycopg2
import pytest

import safepg
import safepg.psycopg2
from safepg import (
    HostnameMismatchError,
    ProtocolViolationError,
    SafePGError,
    SSLNotSupportedError,
    UntrustedCertificateError,
)
from safepg.testing import CertificateAuthority, PostgresServer

from . import adversaries
from .adversaries import Adversary

CONNECT_TIMEOUT = 2
# libpq's connect_timeout, plus at most half of it for the fast path's probe, plus slack.
DEADLINE = CONNECT_TIMEOUT * 1.5 + 1.5
PASSWORD = "hostile-S3cret-pw"


@pytest.fixture(params=["one-ca", "big-bundle"])
def trust(request: pytest.FixtureRequest, server: PostgresServer, tmp_path: Path) -> str:
    if request.param == "one-ca":
        return str(server.ca_path)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + server.ca.cert_pem)
    return str(bundle)


@pytest.fixture
def no_secrets_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.DEBUG, logger="safepg"):
        yield
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()


Connect = Callable[[str], object]


@pytest.fixture(params=["psycopg", "psycopg2"])
def connect(request: pytest.FixtureRequest) -> Connect:
    """The safepg connect the adversaries meet: psycopg 3's or psycopg2's."""
    return safepg.psycopg2.connect if request.param == "psycopg2" else safepg.connect


def attack(
    connect: Connect, adversary: Adversary, trust: str, deadline: float = DEADLINE
) -> tuple[BaseException, float]:
    conninfo = (
        f"host=localhost hostaddr=127.0.0.1 port={adversary.port} user=app dbname=app "
        f"password={PASSWORD} connect_timeout={CONNECT_TIMEOUT} sslrootcert={trust}"
    )
    via_psycopg2 = connect is safepg.psycopg2.connect
    started = time.monotonic()
    with pytest.raises((psycopg.OperationalError, psycopg2.OperationalError)) as info:
        connect(conninfo)
    elapsed = time.monotonic() - started
    err = info.value
    # The same classes either way; through psycopg2, every error is psycopg2's too.
    assert isinstance(err, psycopg2.OperationalError if via_psycopg2 else psycopg.OperationalError)
    assert PASSWORD not in str(err)
    assert PASSWORD not in repr(err)
    assert elapsed < deadline, f"took {elapsed:.1f}s"
    return err, elapsed


def assert_nothing_sent(adversary: Adversary) -> None:
    adversary.close()  # joins the handlers, so that everything received is recorded
    assert adversary.received == [], "the client sent data past the attack"


@pytest.mark.usefixtures("no_secrets_logged")
def test_downgrade_answer_n(connect: Connect, trust: str) -> None:
    with adversaries.running(adversaries.answer_n) as adversary:
        err, _ = attack(connect, adversary, trust)
    assert isinstance(err, SSLNotSupportedError)
    assert_nothing_sent(adversary)


@pytest.mark.usefixtures("no_secrets_logged")
def test_bytes_injected_after_s(
    connect: Connect, server: PostgresServer, trust: str, tmp_path: Path
) -> None:
    """CVE-2021-23222: plaintext after 'S' must never be read as the server's answer."""
    ctx = adversaries.server_context(server.default_certificate, tmp_path)
    with adversaries.running(adversaries.inject_after_s(ctx)) as adversary:
        err, _ = attack(connect, adversary, trust)
    assert isinstance(err, ProtocolViolationError)
    assert "CVE-2021-23222" in str(err)
    assert_nothing_sent(adversary)


@pytest.mark.usefixtures("no_secrets_logged")
def test_self_signed_certificate(connect: Connect, trust: str, tmp_path: Path) -> None:
    lone = CertificateAuthority("self-signed impostor")
    ctx = adversaries.server_context(lone.issue("localhost", ip_addresses=["127.0.0.1"]), tmp_path)
    with adversaries.running(adversaries.present(ctx)) as adversary:
        err, _ = attack(connect, adversary, trust)
    assert isinstance(err, UntrustedCertificateError)
    assert_nothing_sent(adversary)


@pytest.mark.usefixtures("no_secrets_logged")
def test_right_name_from_a_rogue_ca(
    connect: Connect, trust: str, tmp_path: Path, rogue_ca: CertificateAuthority
) -> None:
    cert = rogue_ca.issue("localhost", ip_addresses=["127.0.0.1"])
    with adversaries.running(adversaries.present(adversaries.server_context(cert, tmp_path))) as a:
        err, _ = attack(connect, a, trust)
    assert isinstance(err, UntrustedCertificateError)
    assert "rogue CA" in str(err)  # the issuer it does not trust is named
    assert_nothing_sent(a)


@pytest.mark.usefixtures("no_secrets_logged")
def test_valid_certificate_for_another_name(
    connect: Connect, server: PostgresServer, trust: str, tmp_path: Path
) -> None:
    cert = server.issue_certificate("other.example")
    with adversaries.running(adversaries.present(adversaries.server_context(cert, tmp_path))) as a:
        err, _ = attack(connect, a, trust)
    assert isinstance(err, HostnameMismatchError)
    assert_nothing_sent(a)


@pytest.mark.usefixtures("no_secrets_logged")
def test_reset_mid_handshake(connect: Connect, trust: str) -> None:
    with adversaries.running(adversaries.reset_mid_handshake) as adversary:
        err, _ = attack(connect, adversary, trust)
    assert not isinstance(err, SafePGError)  # a network failure, reported as psycopg does
    assert_nothing_sent(adversary)


@pytest.mark.usefixtures("no_secrets_logged")
def test_stall_is_bounded_by_connect_timeout(connect: Connect, trust: str) -> None:
    with adversaries.running(adversaries.stall) as adversary:
        err, elapsed = attack(connect, adversary, trust)
    assert "timeout" in str(err).lower()
    assert elapsed >= CONNECT_TIMEOUT - 0.5
    assert_nothing_sent(adversary)


@pytest.mark.usefixtures("no_secrets_logged")
def test_stepwise_stall_is_bounded_by_one_deadline(
    connect: Connect, trust: str, tmp_path: Path, rogue_ca: CertificateAuthority
) -> None:
    """Security review item 7: each step held just under its own timeout, then a rogue
    certificate. The probe, libpq and the diagnosis share one deadline: 1.5 x connect_timeout."""
    ctx = adversaries.server_context(rogue_ca.issue("localhost"), tmp_path)
    with adversaries.running(adversaries.just_in_time(ctx, CONNECT_TIMEOUT * 0.47)) as adversary:
        err, _ = attack(connect, adversary, trust, deadline=CONNECT_TIMEOUT * 1.5 + 0.5)
    assert isinstance(err, UntrustedCertificateError)
    assert_nothing_sent(adversary)


def test_error_response_before_tls_is_not_shown(
    connect: Connect, trust: str, caplog: pytest.LogCaptureFixture
) -> None:
    """CVE-2024-10977: an ErrorResponse before TLS is unauthenticated; never show its text."""
    with caplog.at_level(logging.DEBUG), adversaries.running(adversaries.error_before_tls) as a:
        err, _ = attack(connect, a, trust)
    assert isinstance(err, ProtocolViolationError)
    assert "evil.example" not in str(err)
    assert "unauthenticated" in str(err) or "authenticated" in str(err)
    assert "evil.example" not in caplog.text
    assert_nothing_sent(a)


# -- a real middlebox --------------------------------------------------------------------------


def test_tls_terminating_proxy_is_refused(
    server: PostgresServer, rogue_ca: CertificateAuthority, tmp_path: Path
) -> None:
    cert = rogue_ca.issue("localhost", ip_addresses=["127.0.0.1"])
    proxy = adversaries.tls_proxy(
        adversaries.server_context(cert, tmp_path), server.port, server.ca_path
    )
    with adversaries.running(proxy) as middlebox:
        # The proxy works: a client that trusts its CA gets through, and the proxy reads all.
        # (Only without SCRAM channel binding: with it, the server itself notices the proxy.)
        rogue_ca.write_cert(tmp_path / "rogue.pem")
        control = server.conninfo(
            host="localhost",
            port=middlebox.port,
            sslmode="verify-full",
            sslrootcert=str(tmp_path / "rogue.pem"),
        )
        with psycopg.connect(control, channel_binding="disable") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert middlebox.received, "the control connection should have gone through the proxy"
        with pytest.raises(psycopg.OperationalError, match="channel binding"):
            psycopg.connect(control, channel_binding="require")
        middlebox.settle()  # the control connections' relays have finished
        # safepg, trusting the real server's CA, is refused before sending anything.
        with pytest.raises(UntrustedCertificateError):
            safepg.connect(server.conninfo(host="localhost", port=middlebox.port))
    assert middlebox.received == []  # leaving the block joined every handler
