"""PEM is read as OpenSSL reads it, everywhere safepg reads PEM (`safepg._x509.read_pem`).

OpenSSL, which libpq uses to load ``sslrootcert``, loads ``CERTIFICATE``, ``X509 CERTIFICATE``
and ``TRUSTED CERTIFICATE`` blocks (the last with trust settings after the certificate). A reader
that knows only ``BEGIN CERTIFICATE`` lets a relabelled block through every check while libpq
trusts it. Here: the reader against OpenSSL itself (hand-made cases and a property), the bundle
checks and the override files refusing what they do not check, the fast path never narrowing to
a file wider than the full one, and the OS directory export.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ssl
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import safepg
from safepg import (
    ConfigurationError,
    UntrustedCertificateError,
    _bundles,
    _fastpath,
    _trust,
    _x509,
    providers,
)
from safepg._cli import main
from safepg.testing import CertificateAuthority, PostgresServer

from .conftest import CertificateShop

NOW = dt.datetime.now(dt.timezone.utc)
RDS_HOST = "mydb.abc123xyz.us-east-1.rds.amazonaws.com"
RDS_FILE = "rds-global-bundle.pem"
SHIPPED_RDS = Path(providers.shipped_path(RDS_FILE)).read_bytes()

# Trust settings (OpenSSL's X509_CERT_AUX) that follow the certificate in a TRUSTED CERTIFICATE.
TRUST_SERVER_AUTH = bytes.fromhex("300c300a06082b06010505070301")  # trust: serverAuth
REJECT_SERVER_AUTH = bytes.fromhex("300ca00a06082b06010505070301")  # reject: serverAuth


def der_of(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def block(label: str, data: bytes, width: int = 64, headers: str = "") -> bytes:
    b64 = base64.b64encode(data).decode()
    body = "".join(b64[i : i + width] + "\n" for i in range(0, len(b64), width))
    return f"-----BEGIN {label}-----\n{headers}{body}-----END {label}-----\n".encode()


def relabel(pem: bytes, label: str) -> bytes:
    """*pem*'s certificate, under another label (as the reviewer's attack did)."""
    return block(label, der_of(pem))


def trusted(pem: bytes, aux: bytes = TRUST_SERVER_AUTH) -> bytes:
    """*pem*'s certificate as a TRUSTED CERTIFICATE with trust settings *aux*."""
    return block("TRUSTED CERTIFICATE", der_of(pem) + aux)


# -- what OpenSSL loads ------------------------------------------------------------------------


def openssl_file(data: bytes, tmp_path: Path) -> set[str] | None:
    """The CA certificates OpenSSL loads from *data* as a file, as libpq loads sslrootcert
    (PEM_X509_INFO_read_bio); None if it refuses the file."""
    path = tmp_path / "openssl.pem"
    path.write_bytes(data)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        return None
    stats = context.cert_store_stats()
    assert stats["x509"] == stats["x509_ca"], "only CA certificates are used here"
    return {fingerprint(der) for der in context.get_ca_certs(binary_form=True)}


def openssl_cadata(data: bytes) -> set[str] | None:
    """What Python's cadata= loader (PEM_read_bio_X509: CERTIFICATE and X509 CERTIFICATE, no
    TRUSTED CERTIFICATE) loads from ASCII *data*; None if it refuses it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii"))
    except ssl.SSLError:
        return None
    return {fingerprint(der) for der in context.get_ca_certs(binary_form=True)}


def reader_view(data: bytes) -> tuple[set[str], set[str]] | None:
    """(plain, trusted) certificate fingerprints as safepg reads *data*; None if it refuses."""
    plain: set[str] = set()
    trusted_: set[str] = set()
    try:
        for b in _x509.read_pem(data):
            if b.label in _x509.CERTIFICATE_LABELS:
                plain.add(_x509.certificate(b).sha256)
            elif b.label == _x509.TRUSTED_LABEL:
                trusted_.add(_x509.certificate(b).sha256)
            elif b.label == "X509 CRL" or "PRIVATE KEY" in b.label:
                return None  # parsed by OpenSSL, not by safepg: never narrowed, never installed
    except _x509.PemError:
        return None
    return plain, trusted_


def agrees_with_openssl(data: bytes, tmp_path: Path) -> bool:
    """safepg's reader refuses *data*, or sees exactly the certificates OpenSSL loads from it,
    by both of its loaders. Returns whether the reader accepted it."""
    view = reader_view(data)
    if view is None:
        return False
    plain, trusted_ = view
    everything = plain | trusted_
    assert openssl_file(data, tmp_path) == (everything or None)
    if data.isascii():
        assert openssl_cadata(data) == (plain or None)
    return True


# Certificates for the cases: CAs only (OpenSSL's get_ca_certs lists CAs).
CAS = [CertificateAuthority(f"PEM test CA {i}") for i in range(4)]
A, B, C = (ca.cert_pem for ca in CAS[:3])
FA, FB, FC = (fingerprint(der_of(p)) for p in (A, B, C))
A_BODY = b"".join(A.splitlines(keepends=True)[1:-1])
B_BODY = b"".join(B.splitlines(keepends=True)[1:-1])


@pytest.mark.parametrize(
    ("case", "data", "expected"),
    [
        ("plain", A + B, ({FA, FB}, set())),
        ("x509-old-label", A + relabel(B, "X509 CERTIFICATE"), ({FA, FB}, set())),
        ("trusted", A + trusted(B), ({FA}, {FB})),
        ("unknown-label-skipped", A + relabel(B, "PUBLIC KEY"), ({FA}, set())),
        ("label-case-matters", A + relabel(B, "certificate"), ({FA}, set())),
        ("crlf", (A + B).replace(b"\n", b"\r\n"), ({FA, FB}, set())),
        ("trailing-space-tab-vt", A.replace(b"-----\n", b"-----  \t\x0b\n") + B, ({FA, FB}, set())),
        ("indented-begin-is-no-begin", A + b" " + B, ({FA}, set())),
        ("comments-between", b"# A\nSubject: CN=x\n" + A + b"junk -----\n" + B, ({FA, FB}, set())),
        ("byte-order-mark-before-a-comment", b"\xef\xbb\xbf# roots\n" + A, ({FA}, set())),
        (
            "begin-without-dashes",
            b"-----BEGIN CERTIFICATE\n" + A + B,
            ({FA, FB}, set()),
        ),
        ("blank-line-after-begin", A.replace(b"-----\n", b"-----\n\n", 1) + B, ({FA, FB}, set())),
        (
            "dash-ends-the-data",
            A.replace(b"\n-----END", b"\n-\n" + B_BODY + b"-----END"),
            ({FA}, set()),
        ),
        ("begin-inside-a-block", A.replace(b"-----END CERTIFICATE-----\n", b"") + B, ({FA}, set())),
        ("begin-after-254-bytes", A + b"x" * 254 + B, ({FA, FB}, set())),
        ("no-final-newline", A + B.rstrip(b"\n"), ({FA, FB}, set())),
        ("empty-lines-and-spaces-in-body", A.replace(b"\n", b" \n", 5) + B, ({FA, FB}, set())),
        (
            "headers-on-unknown-label",
            block("FOO", b"x", headers="Comment: x\n\n") + A,
            ({FA}, set()),
        ),
        # Refused: OpenSSL fails the whole file, or versions and platforms read it differently.
        ("headers-on-certificate", block("CERTIFICATE", der_of(A), headers="X: y\n\n"), None),
        (
            "encrypted-certificate",
            block("CERTIFICATE", der_of(A), headers="Proc-Type: 4,ENCRYPTED\n\n"),
            None,
        ),
        ("blank-line-in-body", A.replace(A_BODY[:65], A_BODY[:65] + b"\n"), None),
        ("end-label-mismatch", A.replace(b"END CERTIFICATE", b"END X509 CERTIFICATE"), None),
        ("no-end", A.replace(b"-----END CERTIFICATE-----\n", b""), None),
        ("bad-base64", A.replace(A_BODY[:4], b"!!!!"), None),
        ("empty-body", b"-----BEGIN FOO-----\n-----END FOO-----\n" + A, None),
        ("not-a-certificate", block("X509 CERTIFICATE", b"not a certificate") + A, None),
        ("nul-byte", A + b"\0\n" + B, None),
        ("byte-order-mark", b"\xef\xbb\xbf" + A + B, None),
        ("begin-ending-in-non-ascii", A.replace(b"-----\n", b"-----\xff\n", 1) + B, None),
        ("non-ascii-in-a-block", A.replace(b"-----END", b"\xc3\xa9\n-----END"), None),
        ("line-of-254-in-a-block", block("CERTIFICATE", der_of(A), width=254), None),
        ("crl", block("X509 CRL", b"\x30\x00") + A, None),
        ("private-key", block("EC PRIVATE KEY", b"\x30\x00") + A, None),
    ],
)
def test_reader_agrees_with_openssl(
    case: str, data: bytes, expected: tuple[set[str], set[str]] | None, tmp_path: Path
) -> None:
    assert reader_view(data) == expected
    agrees_with_openssl(data, tmp_path)


def test_a_line_of_254_characters_then_its_line_end_is_refused() -> None:
    """OpenSSL reads 254 bytes at a time: the line end of such a line comes as an empty line,
    which newer versions ignore and older ones take as the end of the headers."""
    b64 = base64.b64encode(der_of(A)).decode()
    body = b64[:254] + "\n" + "".join(b64[i : i + 64] + "\n" for i in range(254, len(b64), 64))
    data = f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n".encode()
    with pytest.raises(_x509.PemError, match="254 characters long or more"):
        _x509.read_pem(data)


def _der(tag: int, content: bytes) -> bytes:
    assert len(content) < 128
    return bytes([tag, len(content)]) + content


def test_a_tbs_certificate_of_four_elements_is_not_a_certificate() -> None:
    """The elements after tbsCertificate (signatureAlgorithm, signature) are not read as its
    subject: a certificate whose tbsCertificate ends early is refused."""
    name = _der(0x30, _der(0x31, _der(0x30, _der(0x06, b"\x55\x04\x03") + _der(0x0C, b"x"))))
    algorithm = _der(0x30, _der(0x06, b"\x2a\x86\x48\xce\x3d\x04\x03\x02"))
    validity = _der(0x30, _der(0x17, b"250101000000Z") + _der(0x17, b"350101000000Z"))
    tbs = _der(0x30, _der(0x02, b"\x01") + algorithm + name + validity)  # no subject, no key
    der = _der(0x30, tbs + algorithm + _der(0x03, b"\x00\x01"))
    with pytest.raises(ValueError, match="incomplete tbsCertificate"):
        _x509.parse_der(der)


def test_errors_name_the_block() -> None:
    data = A + B + block("X509 CERTIFICATE", der_of(C)).replace(b"\n-----END", b"!\n-----END")
    line = (A + B).count(b"\n") + 1
    with pytest.raises(_x509.PemError) as info:
        _x509.read_pem(data)
    assert str(info.value).startswith(f"block #3 (BEGIN X509 CERTIFICATE, line {line}): ")
    [_, _, third] = _x509.read_pem(A + B + trusted(C))
    assert str(third).startswith("block #3 (BEGIN TRUSTED CERTIFICATE, line ")
    assert _x509.certificate(third).der == der_of(C)  # the trust settings are not the certificate


# -- the property ------------------------------------------------------------------------------

_LABELS = st.sampled_from(
    ["CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE", "FOO", "CERTIFICATE ", "PUBLIC KEY"]
)
_JUNK = st.sampled_from(
    ["", "# comment", "Subject: CN=x", "-----", "-----END CERTIFICATE-----", " \t", "x" * 300]
)
_HEADERS = st.sampled_from(["", "", "", "\n", "Comment: x\n\n", "Proc-Type: 4,ENCRYPTED\n\n"])


@st.composite
def _blocks(draw: st.DrawFn) -> list[str]:
    label = draw(_LABELS)
    data = der_of(draw(st.sampled_from(CAS)).cert_pem)
    if label == "TRUSTED CERTIFICATE":
        data += draw(st.sampled_from([b"", b"\x30\x00", TRUST_SERVER_AUTH, REJECT_SERVER_AUTH]))
    b64 = base64.b64encode(data).decode()
    width = draw(st.sampled_from([64, 64, 64, 76, 63, 65, 17, 253, 254, 300]))
    lines = [b64[i : i + width] for i in range(0, len(b64), width)]
    if draw(st.integers(0, 9)) == 0:  # a stray character or line in the body
        at = draw(st.integers(0, len(lines)))
        lines.insert(
            at, draw(st.sampled_from(["", " ", "-", "a:b", "-----BEGIN CERTIFICATE-----"]))
        )
    end = label if draw(st.integers(0, 19)) else draw(_LABELS)
    head = draw(_HEADERS).split("\n")[:-1]
    begin = draw(st.sampled_from(["", "", "", " ", "x" * 254])) + f"-----BEGIN {label}-----"
    tail = draw(st.sampled_from(["", "", "", " ", "\t ", "\r"]))
    out = [begin + tail, *head, *lines]
    if draw(st.integers(0, 29)):  # sometimes no END line
        out.append(f"-----END {end}-----" + tail)
    return out


@st.composite
def pem_files(draw: st.DrawFn) -> bytes:
    parts: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            parts.append(draw(_JUNK))
        parts.extend(draw(_blocks()))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return (newline.join(parts) + draw(st.sampled_from(["", newline]))).encode()


_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=300, deadline=None, suppress_health_check=_HEALTH, database=None)
@given(data=pem_files())
def test_reader_property(data: bytes, tmp_path: Path) -> None:
    """Whatever the mix of labels, line ends, widths, headers and junk: safepg's reader sees the
    certificates OpenSSL loads, plain and trusted, or refuses the file."""
    event("read" if agrees_with_openssl(data, tmp_path) else "refused")


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=_HEALTH, database=None)
@given(data=pem_files())
def test_reader_property_10000(data: bytes, tmp_path: Path) -> None:
    event("read" if agrees_with_openssl(data, tmp_path) else "refused")


def test_reader_reads_real_bundles(tmp_path: Path) -> None:
    """The files safepg meets most (the OS store, certifi, the shipped ones) are read in full."""
    import certifi

    paths = [
        certifi.where(),
        *(providers.shipped_path(n) for b in providers.BUNDLES for n in b.files),
    ]
    os_store = _trust.os_store()
    if os_store is not None:
        paths.append(os_store.path)
    for path in paths:
        data = Path(path).read_bytes()
        certs = {c.sha256 for c in _x509.parse_pem(data)}
        context = ssl.create_default_context(cafile=path)
        loaded = {fingerprint(der) for der in context.get_ca_certs(binary_form=True)}
        assert loaded <= certs, path  # get_ca_certs lists only the CAs among them
        assert len(certs) == context.cert_store_stats()["x509"], path


# -- the fast path: never narrowed to a file wider than the full one ---------------------------


def test_fast_path_index_leaves_out_trusted_blocks(tmp_path: Path) -> None:
    pem = trusted(A, REJECT_SERVER_AUTH) + A + B + relabel(C, "X509 CERTIFICATE")
    assert {c.sha256 for c in _x509.parse_pem(pem)} == {FB, FC}
    path = tmp_path / "trust.pem"
    path.write_bytes(pem)
    index = _fastpath._index(str(path))
    assert index is not None
    assert set(index.by_fingerprint) == {FB, FC}
    # A certificate that shares its subject with a TRUSTED one is left out too.
    twin = CertificateAuthority(CAS[1].name)
    assert {c.sha256 for c in _x509.parse_pem(trusted(twin.cert_pem) + B + C)} == {FC}


@pytest.mark.parametrize(
    "extra",
    [block("X509 CRL", b"\x30\x00"), A.replace(b"END CERTIFICATE", b"END FOO"), b"\0"],
    ids=["crl", "broken-block", "nul"],
)
def test_fast_path_does_not_narrow_what_it_cannot_reproduce(extra: bytes) -> None:
    assert _x509.parse_pem(A + B + extra) == []


def test_server_distrusted_by_a_trusted_block_stays_refused_with_the_fast_path(
    server: PostgresServer, tmp_path: Path
) -> None:
    """The server's CA, first as a TRUSTED CERTIFICATE that rejects serverAuth, then plain:
    OpenSSL keeps the first and refuses the server. A narrowed file holding the plain copy
    would let it through."""
    ca = server.ca.cert_pem
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca + A + B + C)
    safepg.connect(server.conninfo(sslrootcert=str(bundle))).close()  # the control
    bundle.write_bytes(trusted(ca, REJECT_SERVER_AUTH) + ca + A + B + C)
    conninfo = server.conninfo(sslrootcert=str(bundle))
    for fast_path in (False, True, True):  # the second fast one uses what the first learned
        with pytest.raises(UntrustedCertificateError, match="rejected"):
            safepg.connect(conninfo, fast_path=fast_path).close()


# -- CA bundle checks: bundles check, bundles install, overrides -------------------------------


@pytest.fixture
def overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "bundles"
    directory.mkdir()
    monkeypatch.setenv("SAFEPG_BUNDLE_DIR", str(directory))
    return directory


def _bad_blocks(rogue_ca: CertificateAuthority) -> dict[str, tuple[bytes, str]]:
    """The reviewer's attack and its variants: (a block added to the RDS bundle, the error)."""
    old = CertificateAuthority("old rogue CA", not_after=NOW - dt.timedelta(days=1))
    line = SHIPPED_RDS.count(b"\n") + 1

    def where(label: str) -> str:
        return f"block #103 (BEGIN {label}, line {line}): "

    return {
        "trusted": (trusted(rogue_ca.cert_pem), where("TRUSTED CERTIFICATE") + "OpenSSL trusts"),
        "leaf": (
            relabel(rogue_ca.issue("leaf.example").cert_pem, "X509 CERTIFICATE"),
            where("X509 CERTIFICATE") + "(empty subject) is not a CA certificate",
        ),
        "expired": (
            relabel(old.cert_pem, "X509 CERTIFICATE"),
            where("X509 CERTIFICATE") + "CN=old rogue CA expired on",
        ),
        "crl": (block("X509 CRL", b"\x30\x00"), where("X509 CRL") + "a certificate revocation"),
        "key": (rogue_ca.issue("x").key_pem(), where("PRIVATE KEY") + "a private key"),
    }


@pytest.mark.parametrize("case", ["trusted", "leaf", "expired", "crl", "key"])
def test_bundle_check_refuses_relabelled_blocks(
    case: str, rogue_ca: CertificateAuthority, tmp_path: Path, overrides: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    extra, message = _bad_blocks(rogue_ca)[case]
    with pytest.raises(_bundles.BundleError) as info:
        _bundles.check_bundle(SHIPPED_RDS + extra)
    assert message in str(info.value)
    newer = tmp_path / "global-bundle.pem"
    newer.write_bytes(SHIPPED_RDS + extra)
    for command in ("check", "install"):
        assert main(["bundles", command, str(newer), "--replace", RDS_FILE]) == 3
        assert message in capsys.readouterr().err
    assert not (overrides / RDS_FILE).exists()


def test_relabelled_rogue_ca_is_checked_shown_and_installed_canonically(
    rogue_ca: CertificateAuthority, tmp_path: Path, overrides: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The reviewer's exact file: the shipped RDS bundle plus a rogue CA as X509 CERTIFICATE.
    The rogue CA is a valid CA, so it passes the checks: but it is counted and shown in the
    difference (it went unseen: "102 certificates", empty diff), and the file installed is the
    checked certificates, re-encoded."""
    newer = tmp_path / "global-bundle.pem"
    newer.write_bytes(SHIPPED_RDS + relabel(rogue_ca.cert_pem, "X509 CERTIFICATE"))
    assert main(["bundles", "check", str(newer), "--replace", RDS_FILE]) == 0
    out = capsys.readouterr().out
    assert "103 certificates" in out
    assert "+ CN=rogue CA" in out
    rogue = hashlib.sha256(der_of(rogue_ca.cert_pem)).hexdigest()
    install = ["bundles", "install", str(newer), "--replace", RDS_FILE]
    assert main(install) == 3  # the rogue CA is not named
    assert main([*install, "--allow-new-root", rogue]) == 0
    installed = (overrides / RDS_FILE).read_bytes()
    assert installed == SHIPPED_RDS + _x509.pem_encode(der_of(rogue_ca.cert_pem))
    assert _bundles.checked_override(str(overrides / RDS_FILE))


def test_install_writes_canonical_pem(tmp_path: Path, overrides: Path) -> None:
    """CRLF, other widths, comments, duplicates: what is installed is one canonical copy of
    each certificate checked, never the file's own bytes."""
    messy = (
        b"# RDS roots\r\n"
        + SHIPPED_RDS.replace(b"\n", b"\r\n")
        + block("CERTIFICATE", der_of(A), 76)
    )
    newer = tmp_path / "messy.pem"
    newer.write_bytes(messy + messy)
    allow = ["--allow-new-root", hashlib.sha256(der_of(A)).hexdigest()]
    assert main(["bundles", "install", str(newer), "--replace", RDS_FILE, *allow]) == 0
    assert (overrides / RDS_FILE).read_bytes() == SHIPPED_RDS + _x509.pem_encode(der_of(A))


@pytest.mark.parametrize(
    "edit",
    ["x509-rogue", "trusted-rogue", "crl", "comment", "crlf", "duplicate"],
)
def test_hand_edited_override_is_refused(
    edit: str, server: PostgresServer, certs: CertificateShop, rogue_ca: CertificateAuthority,
    overrides: Path,
) -> None:  # fmt: skip
    """An override with anything safepg would not have written is refused before libpq sees
    it. In the first case the server presents a certificate from the rogue CA for the RDS
    name: libpq would have accepted it ("verified")."""
    certs.present(RDS_HOST, ca=rogue_ca)
    conninfo = server.conninfo(host=RDS_HOST, hostaddr="127.0.0.1", sslrootcert=None)
    canonical = SHIPPED_RDS + server.ca.cert_pem
    pem = {
        "x509-rogue": SHIPPED_RDS + relabel(rogue_ca.cert_pem, "X509 CERTIFICATE"),
        "trusted-rogue": canonical + trusted(rogue_ca.cert_pem),
        "crl": canonical + block("X509 CRL", b"\x30\x00"),
        "comment": b"# newer RDS roots\n" + canonical,
        "crlf": canonical.replace(b"\n", b"\r\n"),
        "duplicate": canonical + server.ca.cert_pem,
    }[edit]
    path = overrides / RDS_FILE
    path.write_bytes(pem)
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match="override") as info:
        safepg.connect(conninfo).close()
    assert "Fix or remove it" in str(info.value)
    if edit in ("x509-rogue", "comment", "crlf", "duplicate"):  # certificates that pass checks
        assert f"safepg bundles install FILE --replace {RDS_FILE}" in str(info.value)


def test_canonical_override_is_used(
    server: PostgresServer, certs: CertificateShop, overrides: Path
) -> None:
    certs.present(RDS_HOST)
    (overrides / RDS_FILE).write_bytes(SHIPPED_RDS + server.ca.cert_pem)
    conninfo = server.conninfo(host=RDS_HOST, hostaddr="127.0.0.1", sslrootcert=None)
    with safepg.connect(conninfo) as conn:
        assert safepg.check(conn).verified


def test_openssl_cross_check_is_the_backstop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were safepg's reader to miss a block OpenSSL loads (here: made to), the bundle check
    still fails, because OpenSSL itself loads the file and is compared."""
    read_pem = _x509.read_pem
    monkeypatch.setattr(_x509, "read_pem", lambda data: read_pem(data)[:-1])
    with pytest.raises(_bundles.BundleError, match="OpenSSL loads a certificate safepg did not"):
        _bundles.check_bundle(SHIPPED_RDS + A)


# -- trust files named by the caller, and the OS directory export ------------------------------


def test_check_ca_file_reads_as_openssl(tmp_path: Path) -> None:
    only_old_label = tmp_path / "old-label.pem"
    only_old_label.write_bytes(relabel(A, "X509 CERTIFICATE"))
    _trust.check_ca_file(str(only_old_label), "a test")  # OpenSSL loads it: so does safepg
    broken = tmp_path / "broken.pem"
    broken.write_bytes(A + B.replace(B_BODY[:4], b"!!!!"))
    with pytest.raises(ConfigurationError, match=r"block #2 \(BEGIN CERTIFICATE, line \d+\)"):
        _trust.check_ca_file(str(broken), "a test")
    keys_only = tmp_path / "keys.pem"
    keys_only.write_bytes(CAS[0].issue("x").key_pem())
    with pytest.raises(ConfigurationError, match="holds no PEM certificate"):
        _trust.check_ca_file(str(keys_only), "a test")


def test_os_directory_export_is_canonical_and_leaves_out_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certdir = tmp_path / "certs"
    certdir.mkdir()
    (certdir / "a.pem").write_bytes(relabel(A, "X509 CERTIFICATE").replace(b"\n", b"\r\n"))
    (certdir / "b.pem").write_bytes(trusted(B))
    (certdir / "c.pem").write_bytes(C)
    (certdir / "c-distrusted.pem").write_bytes(trusted(C, REJECT_SERVER_AUTH))
    (certdir / "broken.pem").write_bytes(CAS[3].cert_pem + b"-----BEGIN CERTIFICATE-----\n")
    (certdir / "README").write_text("not a certificate")
    monkeypatch.setenv("SSL_CERT_DIR", str(certdir))
    src = safepg.resolve_trust(host="db.example.com")
    assert src.origin == "os-store"
    assert Path(src.path).read_bytes() == _x509.pem_encode(der_of(A))


def _names(blocks: Sequence[_x509.PemBlock]) -> list[str]:
    return [b.label for b in blocks]


def test_pem_encode_round_trips() -> None:
    for ca in CAS:
        der = der_of(ca.cert_pem)
        assert _x509.pem_encode(der) == ca.cert_pem  # cryptography writes the same form
        [only] = _x509.read_pem(_x509.pem_encode(der))
        assert (only.label, only.data, only.headers) == ("CERTIFICATE", der, b"")
    assert _names(_x509.read_pem(A + trusted(B))) == ["CERTIFICATE", "TRUSTED CERTIFICATE"]
