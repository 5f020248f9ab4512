"""Text from the network is shown escaped: it cannot forge log lines or drive terminals.

A certificate's names (common name, subjectAltNames, issuer), libpq's messages that quote them
and the server's own values (role and database names) are written by the other end of the
connection. Every message, log line and printed line shows them escaped (``_text.shown``); the
exception attributes and the JSON documents keep them raw, for programs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import certifi
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from psycopg import sql

import safepg
from safepg import (
    CertificateExpiredError,
    HostnameMismatchError,
    SSLReport,
    UntrustedCertificateError,
)
from safepg._cli import main
from safepg._text import shown
from safepg.testing import CertificateAuthority, IssuedCertificate, PostgresServer

from . import adversaries

# A forged log line, a colour, a carriage return, a right-to-left override and a backslash.
EVIL = "evil\nlibpq said: OK, server verified\x1b[32m\r\u202e\\"
EVIL_ESCAPED = "evil\\x0alibpq said: OK, server verified\\x1b[32m\\x0d\\u202e\\\\"
EVIL_DNS = EVIL + ".example"
OTHER_DNS = "b\x1b]0;title\x07.example"  # a terminal title, rung with BEL
NOW = dt.datetime.now(dt.timezone.utc)
LOOPBACK = (b"\x7f\0\0\1",)  # an iPAddress subjectAltName: 127.0.0.1

Present = Callable[[IssuedCertificate], int]


def assert_inert(text: str) -> None:
    """*text* holds nothing that acts on a terminal or a log: no control or invisible character
    other than the newlines between the lines the library wrote, and no forged line."""
    bad = sorted({c for c in text if not c.isprintable() and c != "\n"})
    assert not bad, f"raw characters {bad!r} in {text!r}"
    assert not any(line.startswith("libpq said: OK") for line in text.split("\n"))


# -- certificates with any names at all --------------------------------------------------------


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def issue_raw(
    ca: CertificateAuthority,
    *dns_names: str,
    common_name: str = EVIL,
    ip_addresses: tuple[bytes, ...] = (),
) -> IssuedCertificate:
    """A leaf from *ca* whose names are taken as they are (cryptography's DNSName refuses
    non-ASCII text, and a hostile issuer does not ask): the subjectAltName is encoded here."""
    key = ec.generate_private_key(ec.SECP256R1())
    san = _der(
        0x30,
        b"".join(_der(0x82, n.encode()) for n in dns_names)
        + b"".join(_der(0x87, a) for a in ip_addresses),
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=300))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, san), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    chain, parent = [], ca
    while parent.parent is not None:  # the intermediates, nearest first
        chain.append(parent.cert)
        parent = parent.parent
    return IssuedCertificate(cert, key, tuple(chain))


@pytest.fixture(scope="module")
def trusted_ca() -> CertificateAuthority:
    return CertificateAuthority("trusted test CA")


@pytest.fixture(scope="module")
def evil_rogue_ca() -> CertificateAuthority:
    return CertificateAuthority("rogue " + EVIL)


@pytest.fixture(params=["one-ca", "big-bundle"])
def trust(request: pytest.FixtureRequest, trusted_ca: CertificateAuthority, tmp_path: Path) -> str:
    path = tmp_path / "trust.pem"
    extra = Path(certifi.where()).read_bytes() if request.param == "big-bundle" else b""
    path.write_bytes(extra + trusted_ca.cert_pem)
    return str(path)


@pytest.fixture
def log_text(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="safepg"):
        yield caplog


@pytest.fixture
def presenting(tmp_path: Path) -> Iterator[Present]:
    """presenting(cert) -> the port of an adversary presenting *cert* (closed afterwards)."""
    running: list[adversaries.Adversary] = []

    def start(cert: IssuedCertificate) -> int:
        directory = tmp_path / f"adversary{len(running)}"
        directory.mkdir()
        adversary = adversaries.Adversary(
            adversaries.present(adversaries.server_context(cert, directory))
        )
        running.append(adversary)
        return adversary.port

    yield start
    for adversary in running:
        adversary.close()
        assert adversary.received == [], "the client sent data past the handshake"


def conninfo(port: int, trust: str) -> str:
    return (
        f"host=localhost hostaddr=127.0.0.1 port={port} user=app dbname=app "
        f"connect_timeout=2 sslrootcert={trust}"
    )


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# -- _text.shown -------------------------------------------------------------------------------


def test_shown_escapes_controls_and_invisible_characters() -> None:
    assert shown(EVIL) == EVIL_ESCAPED
    assert (
        shown("db.example.com, München, 東京 (ok) [x] ~")
        == "db.example.com, München, 東京 (ok) [x] ~"
    )
    cases = {
        "\x00": "\\x00",
        "\t": "\\x09",
        "\x7f": "\\x7f",
        "\x85": "\\x85",  # C1: NEXT LINE
        "\x9b": "\\x9b",  # C1: CSI
        "\xa0": "\\xa0",  # a space that is not one
        "\u00ad": "\\xad",  # soft hyphen
        "\u200b": "\\u200b",  # zero width space
        "\u2028": "\\u2028",  # line separator
        "\u2066": "\\u2066",  # bidi isolate
        "\ufeff": "\\ufeff",
        "\U000e0041": "\\U000e0041",  # tag LATIN CAPITAL LETTER A: invisible
        "\udcff": "\\udcff",  # a lone surrogate (from surrogateescape) cannot even be printed
        "\\x1b": "\\\\x1b",  # an escape cannot be forged
    }
    for raw, escaped in cases.items():
        assert shown(raw) == escaped


def test_shown_leaves_nothing_unprintable_and_is_unambiguous() -> None:
    samples = [chr(c) for c in range(0x3000)] + [
        chr(c) for c in (0xE000, 0xFFF9, 0xFFFB, 0x1F600, 0xE0001, 0xE007F, 0xF0000, 0x10FFFF)
    ]
    text = "".join(samples)
    out = shown(text)
    assert out.isprintable()
    # Escapes decode back to the original: the backslash itself is escaped, so none is forged.
    assert out.encode("ascii", "backslashreplace").decode("unicode_escape") == text
    for char in samples:
        if char.isprintable() and char != "\\":
            assert shown(char) == char


def test_ssl_report_shows_the_servers_text_escaped() -> None:
    report = SSLReport(
        encrypted=True,
        verified=True,
        local_socket=False,
        host="db.example.com",
        hostaddr=None,
        port=5432,
        sslmode="verify-full",
        protocol="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        bits=256,
        ssl_library="OpenSSL",
        trust=None,
        backend_pid=1,
        backend_protocol="TLSv1.3\x1b[2J",
        client_dn="CN=" + EVIL,
    )
    assert_inert(str(report))
    assert "CN=" + EVIL_ESCAPED in str(report)
    assert report.client_dn == "CN=" + EVIL  # the attribute keeps the value


# -- connect -----------------------------------------------------------------------------------


def test_untrusted_certificate_names_are_escaped(
    trust: str,
    evil_rogue_ca: CertificateAuthority,
    presenting: Present,
    log_text: pytest.LogCaptureFixture,
) -> None:
    port = presenting(issue_raw(evil_rogue_ca, EVIL_DNS, "localhost", ip_addresses=LOOPBACK))
    with pytest.raises(UntrustedCertificateError) as info:
        safepg.connect(conninfo(port, trust))
    message = str(info.value)
    assert_inert(message)
    assert "presented (unverified): subject commonName=" + EVIL_ESCAPED in message
    assert EVIL_DNS.replace(EVIL, EVIL_ESCAPED) in message  # the subjectAltName
    assert f'issuer "commonName=rogue {EVIL_ESCAPED}" is not among them' in message
    assert "(as presented, unverified)" in message
    assert_inert(logged(log_text))


def test_expired_ca_named_by_its_subject_is_escaped(
    trust: str, trusted_ca: CertificateAuthority, presenting: Present
) -> None:
    expired_ca = CertificateAuthority(
        "CA " + EVIL, parent=trusted_ca, not_after=NOW - dt.timedelta(days=2)
    )
    port = presenting(issue_raw(expired_ca, "localhost", ip_addresses=LOOPBACK))
    with pytest.raises(CertificateExpiredError) as info:
        safepg.connect(conninfo(port, trust))
    message = str(info.value)
    assert_inert(message)
    assert f"the CA certificate commonName=CA {EVIL_ESCAPED} expired on" in message


def test_hostname_mismatch_quoted_by_libpq_is_escaped(
    trust: str,
    trusted_ca: CertificateAuthority,
    presenting: Present,
    log_text: pytest.LogCaptureFixture,
) -> None:
    """libpq quotes the certificate's first name raw, line breaks and all: still a mismatch."""
    port = presenting(issue_raw(trusted_ca, EVIL_DNS, OTHER_DNS))
    with pytest.raises(HostnameMismatchError) as info:
        safepg.connect(conninfo(port, trust))
    err = info.value
    message = str(err)
    assert_inert(message)
    escaped = shown(EVIL_DNS)
    assert f'it holds "{escaped}" and 1 other name(s)' in message
    assert f"{escaped}, {shown(OTHER_DNS)}." in message  # the probe's listing
    assert f'libpq said: connection failed: connection to server at "127.0.0.1", port {port}' in (
        message
    )
    assert f'server certificate for "{escaped}" (and 1 other name' in message
    assert err.host == "localhost"
    assert err.certificate_names == (EVIL_DNS, OTHER_DNS)  # raw: programs get the exact names
    assert_inert(logged(log_text))


@pytest.mark.parametrize(
    "phrase",
    [
        'root certificate file "/etc/passwd" does not exist',
        "server sent an error response during SSL exchange",
        "received unencrypted data after SSL response",
        "SSL error: certificate verify failed",
        "server does not support SSL, but SSL was required",
        "could not get server's host name from server certificate",
        '" does not match host name "forged\x1b[31m"',
    ],
)
def test_libpqs_phrases_inside_a_certificate_name_are_not_read_as_libpqs(
    trusted_ca: CertificateAuthority, tmp_path: Path, presenting: Present, phrase: str
) -> None:
    trust = str(trusted_ca.write_cert(tmp_path / "ca.pem"))
    port = presenting(issue_raw(trusted_ca, f"x\n{phrase}\nconnection to server.example"))
    with pytest.raises(HostnameMismatchError) as info:
        safepg.connect(conninfo(port, trust))
    assert_inert(str(info.value))
    assert shown(phrase) in str(info.value)


# -- safepg inspect ----------------------------------------------------------------------------


def inspect(port: int, trust: str, *extra: str) -> list[str]:
    return [
        "inspect",
        f"localhost:{port}",
        "--hostaddr",
        "127.0.0.1",
        "--sslrootcert",
        trust,
        *extra,
    ]


def test_inspect_shows_an_untrusted_chain_escaped(
    tmp_path: Path,
    trusted_ca: CertificateAuthority,
    evil_rogue_ca: CertificateAuthority,
    presenting: Present,
    capsys: pytest.CaptureFixture[str],
) -> None:
    trust = str(trusted_ca.write_cert(tmp_path / "ca.pem"))
    port = presenting(issue_raw(evil_rogue_ca, EVIL_DNS, "localhost", ip_addresses=LOOPBACK))
    assert main(inspect(port, trust)) == 3
    out, err = capsys.readouterr()
    assert_inert(out)
    assert_inert(err)
    assert "certificates as presented (unverified" in out
    assert f"[0] server: commonName={EVIL_ESCAPED}" in out
    assert f"issuer           commonName=rogue {EVIL_ESCAPED}" in out
    assert f"names            {shown(EVIL_DNS)}, localhost, 127.0.0.1" in out
    assert f'problem: the issuer "commonName=rogue {EVIL_ESCAPED}" (as presented, unverified)' in (
        out
    )

    # JSON keeps the raw values (json.dumps escapes them); its sentences are escaped.
    assert main([*inspect(port, trust), "--json"]) == 3
    out = capsys.readouterr().out
    assert_inert(out)
    data = json.loads(out)
    assert data["certificates"][0]["subject"] == "commonName=" + EVIL
    assert data["hostname"]["names"][0] == EVIL_DNS
    for sentence in data["problems"] + data["warnings"] + data["advice"]:
        assert_inert(sentence)
    assert any(EVIL_ESCAPED in p for p in data["problems"])


def test_inspect_shows_a_verified_chain_with_hostile_names_escaped(
    tmp_path: Path,
    trusted_ca: CertificateAuthority,
    presenting: Present,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A chain that verifies can still carry anything in its names: a CA expiring soon, and a
    leaf that does not name the host."""
    trust = str(trusted_ca.write_cert(tmp_path / "ca.pem"))
    expiring = CertificateAuthority(
        "CA " + EVIL, parent=trusted_ca, not_after=NOW + dt.timedelta(days=10)
    )
    port = presenting(issue_raw(expiring, EVIL_DNS, OTHER_DNS))
    assert main(inspect(port, trust)) == 3
    out = capsys.readouterr().out
    assert_inert(out)
    assert f"[1] CA: commonName=CA {EVIL_ESCAPED}" in out
    assert f"it names: {shown(EVIL_DNS)}, {shown(OTHER_DNS)}" in out
    assert f"warning: CA certificate commonName=CA {EVIL_ESCAPED} expires in" in out


# -- safepg check ------------------------------------------------------------------------------


def test_check_shows_a_refusal_escaped(
    trusted_ca: CertificateAuthority,
    evil_rogue_ca: CertificateAuthority,
    tmp_path: Path,
    presenting: Present,
    capsys: pytest.CaptureFixture[str],
) -> None:
    trust = str(trusted_ca.write_cert(tmp_path / "ca.pem"))
    untrusted = presenting(issue_raw(evil_rogue_ca, EVIL_DNS, "localhost", ip_addresses=LOOPBACK))
    mismatch = presenting(issue_raw(trusted_ca, EVIL_DNS, OTHER_DNS))
    for port, error in ((untrusted, "UntrustedCertificateError"), (mismatch, "HostnameMismatch")):
        assert main(["check", conninfo(port, trust)]) == 3
        out, err = capsys.readouterr()
        assert f"safepg check: {error}" in err
        assert_inert(out + err)
        assert shown(EVIL_DNS) in err

        assert main(["check", conninfo(port, trust), "--json"]) == 3
        out, err = capsys.readouterr()
        assert_inert(out + err)
        assert_inert(json.loads(out)["error"]["message"])


@pytest.fixture
def hostile_role(server: PostgresServer) -> Iterator[str]:
    """A role and a database whose names hold the hostile text; the server reports them."""
    role, password = EVIL, "Hostile-role-pw-1"
    with server.admin_connect() as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier("db " + role), sql.Identifier(role)
            )
        )
    try:
        yield server.conninfo(user=role, password=password, dbname="db " + role)
    finally:
        with server.admin_connect() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier("db " + role))
            )
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_check_shows_the_certificate_and_the_servers_view_escaped(
    server: PostgresServer, hostile_role: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = issue_raw(server.ca, "localhost", EVIL_DNS, ip_addresses=LOOPBACK)
    with server.certificate(cert):
        assert main(["check", hostile_role]) == 0
        out, err = capsys.readouterr()
        assert_inert(out + err)
        assert "second handshake, as presented: unverified" in out
        assert f"[0] server: commonName={EVIL_ESCAPED}" in out
        assert f"names            localhost, {shown(EVIL_DNS)}, 127.0.0.1" in out
        assert f"user             {EVIL_ESCAPED}\n" in out
        assert f"database         db {EVIL_ESCAPED}\n" in out

        assert main(["check", hostile_role, "--json"]) == 0
        out = capsys.readouterr().out
        assert_inert(out)
        data = json.loads(out)
        assert data["server"]["user"] == EVIL  # raw in JSON
        assert data["certificates"][0]["names"][1] == EVIL_DNS


def test_check_shows_psycopgs_errors_escaped(
    server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not safepg's own errors: the server's message quotes the (unknown) user's name.

    psycopg's messages keep libpq's line breaks (they cannot be told from the server's), so the
    name here holds every hostile character but the line feed.
    """
    name = EVIL.replace("\n", " ")
    target = server.conninfo(user=name, password="wrong-password")
    assert main(["check", target]) == 1
    out, err = capsys.readouterr()
    assert_inert(out + err)
    assert f'user "{shown(name)}"' in err
